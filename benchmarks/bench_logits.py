"""token_log_probs and kl_divergence against torch CPU (log_softmax + gather, kl_div), for
(rows x 32000) and (rows x 151936) logits in float32 and bfloat16, on one thread and on all
threads, measured in one run; plus GB/s and the fraction of this machine's single-thread read
bandwidth (a plain C read loop, benchmarks/_probe.py).

    python benchmarks/bench_logits.py            # 2048 rows (as in the issue)
    python benchmarks/bench_logits.py --rows 256 # quicker
"""
import argparse
import os
import sys
import timeit

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import ppldelta  # noqa: E402
from _probe import read_seconds  # noqa: E402


def best(fn, repeat=3):
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    print(f"ppldelta {ppldelta.__version__} ({ppldelta.simd()}), torch {torch.__version__}, {ncpu} CPUs")
    rows = []
    for V in (32000, 151936):
        a32 = torch.from_numpy(rng.normal(0, 3, (args.rows, V)).astype(np.float32))
        b32 = a32 + 0.3 * torch.from_numpy(rng.standard_normal((args.rows, V), dtype=np.float32))
        t = torch.from_numpy(rng.integers(0, V, args.rows))
        for dtype in (torch.float32, torch.bfloat16):
            a, b = a32.to(dtype), b32.to(dtype)
            nbytes = a.numel() * a.element_size()
            read = read_seconds([a.view(torch.int16).numpy() if dtype == torch.bfloat16 else a.numpy()])
            for threads in sorted({1, ncpu}):
                torch.set_num_threads(threads)
                ours_lp = best(lambda: ppldelta.token_log_probs(a, t, threads=threads))
                ref_lp = best(lambda: torch.log_softmax(a.float() if dtype != torch.float32 else a, -1)
                              .gather(-1, t[:, None]))
                ours_kl = best(lambda: ppldelta.kl_divergence(a, b, threads=threads))
                ref_kl = best(lambda: F.kl_div(torch.log_softmax(b.float(), -1), torch.log_softmax(a.float(), -1),
                                               log_target=True, reduction="none").sum(-1))
                r = dict(V=V, dtype=str(dtype).split(".")[1], threads=threads,
                         lp_gbs=nbytes / ours_lp / 1e9, lp_ratio=ref_lp / ours_lp, lp_bw=read / ours_lp,
                         kl_gbs=2 * nbytes / ours_kl / 1e9, kl_ratio=ref_kl / ours_kl, kl_bw=2 * read / ours_kl,
                         torch_lp_gbs=nbytes / ref_lp / 1e9, torch_kl_gbs=2 * nbytes / ref_kl / 1e9)
                rows.append(r)
                print(r, flush=True)
    print(f"\n{args.rows} rows; speed-up over torch at equal thread count, GB/s of logits read, "
          "fraction of single-thread read bandwidth (single-thread rows).\n")
    print("| vocab | dtype | threads | log-probs vs torch | GB/s | fraction of read BW | KLD vs torch | GB/s | fraction of read BW | torch GB/s (lp / KLD) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bw = (lambda x: f"{x:.2f}") if r["threads"] == 1 else (lambda x: "-")
        print(f"| {r['V']:,} | {r['dtype']} | {r['threads']} | {r['lp_ratio']:.1f}x | {r['lp_gbs']:.1f} | {bw(r['lp_bw'])} "
              f"| {r['kl_ratio']:.1f}x | {r['kl_gbs']:.1f} | {bw(r['kl_bw'])} | {r['torch_lp_gbs']:.2f} / {r['torch_kl_gbs']:.2f} |")
    print("\nPeak extra memory of ppldelta: the per-row outputs, O(rows); torch materialises "
          "(rows x vocab) log-softmax temporaries.")


if __name__ == "__main__":
    main()
