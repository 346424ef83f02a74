"""Reference records per second (``refstats.summarize``'s fields: entropy, tail, lp_min, the top
K = 24 ids and log-probs, M = 8 tail probes) from float32 logits rows: the C kernel
(``_core.summarize_rows``, csrc/summarize.c) against its NumPy twin (``refstats.summarize_rows``,
float64) and torch on the CPU (float32 ``log_softmax`` + ``topk`` + the entropy: fewer outputs,
in float32), all on one thread, measured in one run; plus the C kernel on every CPU, and the
fraction of this machine's single-thread read bandwidth (benchmarks/_probe.py) the one-thread
kernel reaches (the row is read twice: the second read mostly hits the cache).

    python benchmarks/bench_summarize.py              # 256 rows (NumPy: 32)
    python benchmarks/bench_summarize.py --rows 64    # quicker

Measured on a shared 2-core Intel Xeon VM (AVX-512, 480 MiB L3, load average 8 from other jobs:
absolute numbers are a fraction of an idle core's and vary by +-30 % between runs; each row's
numbers come from the same run), ppldelta's default SIMD path avx512, 256 rows (NumPy: 32):

| vocab | C kernel rows/s | NumPy twin rows/s | torch f32 rows/s | C / NumPy | C / torch | C, 2 threads | fraction of read BW |
|---|---|---|---|---|---|---|---|
| 32000 | 4477 | 373 | 1954 | 12.0x | 2.29x | 3433 | 0.03 |
| 49152 | 2850 | 374 | 1108 | 7.6x | 2.57x | 2935 | 0.03 |
| 151936 | 1129 | 97.8 | 326 | 11.5x | 3.46x | 1016 | 0.08 |

(The second thread gains nothing on a machine whose two cores are already busy.  The NumPy
twin on 32 rows keeps its float64 temporaries in the cache; on 64 rows of 32000 it ran 26x
slower than the kernel.)  The kernel is bound by its float64 exp (an own polynomial without FMA,
so that every SIMD path gives the same bits: with FMA on AVX-512 it measured 20-30 % faster) and
by the format's sequential running sum for the probes (overlapped with the next chunk's exps),
not by memory: the "fraction of read BW" is of this VM's single-thread read rate, from L3 here.
"""
import argparse
import os
import sys
import timeit

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import ppldelta  # noqa: E402
from ppldelta import _core, refstats  # noqa: E402
from _probe import read_seconds  # noqa: E402

K, M = 24, 8


def best(fn, repeat=3):
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def torch_summary(x):
    ls = torch.log_softmax(x, -1)
    top = torch.topk(ls, K, dim=-1)
    return top, -(ls.exp() * ls).sum(-1)


def numpy_summary(x):
    out = np.zeros(x.shape[0], refstats.RECORD_DTYPE(K, M))
    refstats.summarize_rows(x.astype(np.float64), K, out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"ppldelta {ppldelta.__version__} ({_core.simd()}), torch {torch.__version__}, {ncpu} CPUs")
    lines = []
    for V in (32000, 49152, 151936):
        x = rng.normal(0, 3, (args.rows, V)).astype(np.float32)
        xn = x[:max(1, args.rows // 8)]
        xt = torch.from_numpy(x)
        read = read_seconds([x])
        c1 = best(lambda: _core.summarize_rows(x, K, M, threads=1))
        cn = best(lambda: _core.summarize_rows(x, K, M, threads=ncpu))
        nn = best(lambda: numpy_summary(xn))
        tt = best(lambda: torch_summary(xt))
        n = args.rows
        r = dict(V=V, c=n / c1, numpy=xn.shape[0] / nn, torch=n / tt, c_all=n / cn, bw=read / c1)
        print(r, flush=True)
        lines.append(f"| {V} | {r['c']:.0f} | {r['numpy']:.3g} | {r['torch']:.0f} | "
                     f"{r['c'] / r['numpy']:.1f}x | {r['c'] / r['torch']:.2f}x | {r['c_all']:.0f} | {r['bw']:.2f} |")
    print(f"\n{args.rows} rows (NumPy: {max(1, args.rows // 8)}), float32, K = {K}, M = {M}; one thread "
          f"but the 'C, {ncpu} threads' column.\n")
    print(f"| vocab | C kernel rows/s | NumPy twin rows/s | torch f32 rows/s | C / NumPy | C / torch | "
          f"C, {ncpu} threads | fraction of read BW |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
