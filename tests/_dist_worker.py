"""Worker for the torch.distributed (gloo) test of ppldelta.distributed.all_reduce."""
import json

import numpy as np

import ppldelta


def data(seed=0, n=6000):
    rng = np.random.default_rng(seed)
    o = -rng.exponential(2.0, n)
    q = np.minimum(o - 0.05 + rng.normal(0, 0.2, n), 0)
    kld = rng.exponential(0.05, n)
    labels = np.where(np.arange(n) % 3 == 0, "code", "prose")
    return o, q, kld, labels


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    o, q, kld, labels = data()
    part = np.array_split(np.arange(o.size), world)[rank]
    acc = ppldelta.Accumulator(block_size=64)
    acc.update(o[part], q[part], kld=kld[part], groups=labels[part])
    merged = ppldelta.distributed.all_reduce(acc)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(merged.report(seed=3).to_dict(), f)
    dist.destroy_process_group()
