"""Worker of tests/test_dist.py: runs ppldelta.hf entry points in one rank of a gloo process
group and saves what they return, as ``OUT/rank<r>.npz`` (per-token arrays) and
``OUT/rank<r>.json`` (reports).  The process group comes from torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT: ppldelta initialises it) or, with ``--init FILE``, is
initialised here (file://, the user-initialised path).

    python _dist_hf_worker.py MODE OUT [--init FILE --rank R --world W]

MODE: ``same`` (every protocol: score at batch sizes 1 and 2, compare_models with groups;
multiple-choice scores),
``fail`` (the last rank's model raises on its second forward), ``ref`` / ``ref-slow`` (build a
reference file; ``ref-slow`` sleeps after every window so the test can kill it),
``refeval`` (evaluate_against_reference)."""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ppldelta
from ppldelta import hf

V = 96
N_TOKENS = 420


def model(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def quantized():
    """The "quantized" model: the same weights, rounded to a coarse grid."""
    m = model()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.round(p * 16) / 16)
    return m


def ids(n=N_TOKENS):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, V, (n,), generator=g)


def groups(n=N_TOKENS):
    return np.where(np.arange(n) % 5 < 2, "code", "prose")


# (protocol, max_length, stride) for every protocol of ppldelta.protocols
CASES = {"sliding": (32, 12), "hf": (32, 12), "llama.cpp": (32, None), "gptq": (32, None),
         "window-mean": (32, 12)}


def run_same():
    """Every protocol: {name: array} and {name: report dict}."""
    assert set(CASES) == set(ppldelta.protocols.PROTOCOLS), "a protocol without a case"
    base, quant, x, g = model(), quantized(), ids(), groups()
    arrays, reports = {}, {}
    for name, (L, S) in CASES.items():
        for bs in (1, 2):
            lp, proto = hf.score(base, x, protocol=name, max_length=L, stride=S, batch_size=bs,
                                 progress=bs == 2, bos_token_id=1)
            arrays[f"score/{name}/{bs}"] = lp
            reports[f"score/{name}/{bs}"] = proto.to_dict()
        if ppldelta.protocols.SPECS[name].per_token:
            rep = hf.compare_models(base, quant, x, protocol=name, max_length=L, stride=S,
                                    batch_size=2, groups=g, progress=False, bos_token_id=1)
            reports[f"compare/{name}"] = json.loads(json.dumps(rep.to_dict(), default=str))
    # multiple-choice scores: each (item, choice) pair a window of its own length, sharded too
    from ppldelta.hf._choices import run_pairs

    g = np.random.default_rng(4)
    words = ["ab", "cde", "f", "ghij", "kl"]
    items = [{"context": " ".join(g.choice(words, int(g.integers(1, 6)))),
              "choices": [str(g.choice(words)) for _ in range(int(g.integers(2, 5)))], "answer": 0}
             for _ in range(9)]
    arrays["choices"] = run_pairs(base, items, lambda s: [3 + ord(c) % (V - 3) for c in s], 1, 64,
                                  batch_size=2)
    return arrays, reports


REF_CASES = {name: case for name, case in CASES.items() if ppldelta.protocols.SPECS[name].per_token}


def ref_path(out, name):
    return os.path.join(out, f"{name}.ppldref")


def run_ref(out, slow=0.0):
    """Build a reference for every per-token protocol into ``out`` (``slow``: seconds of sleep
    per forward, so that a test can kill the build part way); then evaluate the quantized model
    against the sliding one.  Returns ({}, {name: report dict})."""
    from ppldelta.hf._reference import build_reference, evaluate_against_reference

    base, x = Slow(model(), slow), ids()  # always the same class: the header names it
    reports = {}
    for name, (L, S) in REF_CASES.items():
        if slow and name != "sliding":  # the build that the test kills: one is enough
            break
        build_reference(base, input_ids=x, out=ref_path(out, name), protocol=name, max_length=L,
                        stride=S, k=8, batch_size=2, bos_token_id=1, progress=not slow)
    import inspect

    if not slow and "kld_bounds" in inspect.signature(ppldelta.analyze).parameters:
        rep = evaluate_against_reference(quantized(), ref_path(out, "sliding"), batch_size=2,
                                         groups=groups(), progress=False)
        d = json.loads(json.dumps(rep.to_dict(), default=str))
        notes = (d.get("protocol") or {}).get("notes") or {}
        if "reference" in notes:  # the path differs between runs; the name does not
            notes["reference"] = os.path.basename(notes["reference"])
        reports["refeval/sliding"] = d
    return {}, reports


class Slow(torch.nn.Module):
    """A model that sleeps before every forward."""

    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds
        self.config = inner.config

    def forward(self, input_ids, **kw):
        time.sleep(self.seconds)
        return self.inner(input_ids=input_ids, **kw)


class Boom(torch.nn.Module):
    """A model whose forward raises on its second call."""

    def __init__(self, inner, message):
        super().__init__()
        self.inner, self.message, self.calls = inner, message, 0
        self.config = inner.config

    def forward(self, input_ids, **kw):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError(self.message)
        return self.inner(input_ids=input_ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("out")
    ap.add_argument("--init")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--world", type=int)
    ap.add_argument("--kill-after", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)  # as the test's single-process run: the same kernels, bit for bit
    if a.init:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{a.init}", rank=a.rank, world_size=a.world)
    from ppldelta.hf import _dist

    _dist.context()  # initialises the group from torchrun's environment when there is none
    r, w = _dist.rank(), _dist.world()
    if a.mode == "same":
        arrays, reports = run_same()
    elif a.mode in ("ref", "ref-slow"):
        arrays, reports = run_ref(a.out, slow=0.3 if a.mode == "ref-slow" else 0.0)
    elif a.mode == "fail":
        m = model()
        if r == _dist_world_last():
            m = Boom(m, f"boom in rank {r}")
        t0 = time.perf_counter()
        try:
            hf.score(m, ids(), protocol="sliding", max_length=32, stride=8, progress=False)
        except Exception as e:  # noqa: BLE001
            print(f"RANK {r} RAISED {type(e).__name__}: {str(e).splitlines()[0]} "
                  f"after {time.perf_counter() - t0:.1f} s", flush=True)
            # not sys.exit: tearing down this worker's own gloo group at interpreter exit, with the
            # peer gone, can abort in torch ("terminate called without an active exception"; seen
            # once in a CI run), which is torch's teardown, not what this test checks
            os._exit(3)
        print(f"RANK {r} DID NOT RAISE", flush=True)
        sys.exit(0)
    else:
        raise SystemExit(f"unknown mode {a.mode}")
    np.savez(os.path.join(a.out, f"rank{r}.npz"), **arrays)
    with open(os.path.join(a.out, f"rank{r}.json"), "w") as f:
        json.dump({"world": w, "reports": reports}, f, sort_keys=True, default=str)


def _dist_world_last():
    from ppldelta.hf import _dist

    _dist.context()  # initialise from the environment if needed
    return _dist.world() - 1


if __name__ == "__main__":
    main()
