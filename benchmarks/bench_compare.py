"""Stage 1 of ``refstats.compare`` (the O(K + M) values per row that ``finish`` reads) from a
quantized model's logits rows against stored records (K = 24 ids, 8 probes, M = 64): the fused C
kernel (``_core.compare_rows``, csrc/compare.c: two reads of each row, in place) against the
float64 NumPy stage 1 it replaced (``parts_rows``, now the tests' oracle in
tests/test_compare_kernel.py; timed as compare ran it: float64 copies of row chunks) and the
torch twin on the CPU (``hf._ref_torch._parts_torch`` on the rows as a float64 tensor), at vocab
32000 and 151936, float32 and bfloat16 rows, measured in one run: speed-up ratios, plus the
fraction of this machine's single-thread read bandwidth (benchmarks/_probe.py) the one-thread
kernel reaches.  NumPy and torch run on one thread; the kernel on 1 and 2.

    python benchmarks/bench_compare.py              # 64 rows (NumPy and torch: 32)
    python benchmarks/bench_compare.py --rows 16    # quicker

Measured on a 2-core Intel Xeon VM (AVX-512, quiet: load 0.5, 2026-11-27), 64 rows (NumPy,
torch: 32), ppldelta's default SIMD path avx512, K = 24, 8 probes, M = 64:

| vocab | dtype | C, 1 thread ms/row | C / NumPy | C / torch | C 2 threads / NumPy | 2 threads / 1 | fraction of read BW |
|---|---|---|---|---|---|---|---|
| 32000 | float32 | 0.0768 | 17.8x | 19.5x | 33.8x | 1.90x | 0.067 |
| 32000 | bf16 | 0.0758 | 13.3x | 18.1x | 23.4x | 1.76x | 0.037 |
| 151936 | float32 | 0.313 | 21.7x | 53.6x | 42.0x | 1.93x | 0.070 |
| 151936 | bf16 | 0.331 | 21.1x | 51.2x | 42.8x | 2.03x | 0.034 |

Against the previous kernel (the same file before the chunk loops were vectorised and the filters
started from the groups' extremes: scalar threshold filters that start empty, sorting 320
candidates at a time), measured alternately in one run, 32 rows, one thread: 4.1-4.8x (float32)
and 3.9x (bf16) at 32000, 3.1-3.4x at 151936 on the AVX-512 path; 3.2-3.4x and 2.2-2.3x on the
AVX2 path (which had no vector loops but the exps before).  The time is now half the float64
exps and sums (the same bits on every path, as the bounds' error model wants), half the first
read of the row and its conversion to float64; a float32 exp, or pass 1 on float32 values as
they are, would be the next steps.
"""
import argparse
import os
import sys
import timeit

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import ppldelta  # noqa: E402
from ppldelta import _core, refstats  # noqa: E402
from ppldelta.hf import _ref_torch  # noqa: E402
from _probe import read_seconds  # noqa: E402
from test_compare_kernel import parts_rows  # noqa: E402  (the NumPy stage 1, kept as the oracle)

K, P = 24, 8
M = refstats.tail_m(K)


def best(fn, repeat=3):
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def numpy_stage1(a, bf, ids, pids):
    """Stage 1 as refstats.compare ran it before the kernel: float64 copies of row chunks."""
    step = max(1, refstats.ROW_BUDGET // a.shape[1])
    f64 = (lambda c: (c.astype(np.uint32) << 16).view(np.float32).astype(np.float64)) if bf else \
        (lambda c: c.astype(np.float64))
    return refstats.concat_parts([parts_rows(f64(a[r:r + step]), ids[r:r + step], M, pids[r:r + step])
                                  for r in range(0, a.shape[0], step)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"ppldelta {ppldelta.__version__} ({_core.simd()}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    lines = []
    for V in (32000, 151936):
        x = rng.normal(0, 3, (args.rows, V)).astype(np.float32)
        ids = np.stack([rng.permutation(V)[:K] for _ in range(args.rows)]).astype(np.int32)
        pids = rng.integers(0, V, (args.rows, P)).astype(np.int32)
        for name in ("float32", "bf16"):
            bf = name == "bf16"
            a = (x.view(np.uint32) >> 16).astype(np.uint16) if bf else x
            nn = max(1, args.rows // 2)
            at = torch.from_numpy(a[:nn].view(np.int16)).view(torch.bfloat16) if bf else torch.from_numpy(a[:nn])
            read = read_seconds([a])
            c1 = best(lambda: _core.compare_rows(a, ids, M, pids, bf16=bf, threads=1)) / args.rows
            c2 = best(lambda: _core.compare_rows(a, ids, M, pids, bf16=bf, threads=2)) / args.rows
            tn = best(lambda: numpy_stage1(a[:nn], bf, ids[:nn], pids[:nn])) / nn
            tt = best(lambda: _ref_torch._parts_torch(at.double(), ids[:nn], M, pids[:nn])) / nn
            r = dict(V=V, dtype=name, c1_ms=c1 * 1e3, c2_ms=c2 * 1e3, numpy_ms=tn * 1e3, torch_ms=tt * 1e3,
                     bw=read / args.rows / c1)
            print(r, flush=True)
            lines.append(f"| {V} | {name} | {c1 * 1e3:.3g} | {tn / c1:.1f}x | {tt / c1:.1f}x | "
                         f"{tn / c2:.1f}x | {c1 / c2:.2f}x | {r['bw']:.3f} |")
    print(f"\n{args.rows} rows (NumPy, torch: {max(1, args.rows // 2)}), K = {K}, {P} probes, M = {M}.\n")
    print("| vocab | dtype | C, 1 thread ms/row | C / NumPy | C / torch | C 2 threads / NumPy | "
          "2 threads / 1 | fraction of read BW |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
