"""Reference records per second (``refstats.summarize``'s fields: entropy, tail, lp_min, the top
K = 24 ids and log-probs, M = 8 tail probes) from float32 logits rows: the C kernel
(``_core.summarize_rows``, csrc/summarize.c) against its NumPy twin (``refstats.summarize_rows``,
float64) and torch on the CPU (float32 ``log_softmax`` + ``topk`` + the entropy: fewer outputs,
in float32), all on one thread, measured in one run; plus the C kernel on every CPU, and the
fraction of this machine's single-thread read bandwidth (benchmarks/_probe.py) the one-thread
kernel reaches (the row is read twice: the second read mostly hits the cache).

    python benchmarks/bench_summarize.py              # 256 rows (NumPy: 32)
    python benchmarks/bench_summarize.py --rows 64    # quicker

Measured on a shared 2-core Intel Xeon VM (AVX-512, 2 MiB L2, 480 MiB L3, load average 2 from
other jobs: absolute numbers vary by +-30 % between runs; each row's numbers come from the same
run), ppldelta's default SIMD path avx512, 256 rows (NumPy: 32):

| vocab | C kernel rows/s | NumPy twin rows/s | torch f32 rows/s | C / NumPy | C / torch | C, 2 threads | fraction of read BW |
|---|---|---|---|---|---|---|---|
| 32000 | 21866 | 1.04e+03 | 5360 | 21.1x | 4.08x | 20171 | 0.10 |
| 49152 | 15881 | 1.13e+03 | 3109 | 14.1x | 5.11x | 20578 | 0.21 |
| 151936 | 5252 | 245 | 1016 | 21.4x | 5.17x | 5155 | 0.17 |

(The second thread gains little on a machine whose two cores are already busy.)  Against the
previous kernel (a degree-13 float64 exp without FMA, every row converted to float64, the probes'
running sum one add at a time), in one run on 128 rows: 2.1-2.3x with probes (M = 8), 2.2-2.5x
without.  What is left is compute, not memory: the float64 exp (about 20 vector operations per 8
values, every path the same bits, the error model's 16 ulp kept), then the top-K filter; the
"fraction of read BW" is of this VM's single-thread read rate (17-28 GB/s, from L3 here).  A
float32 exp (as the logits kernels') would be the next step, at the price of a wider
reference-side error bound in refstats.finish.
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
