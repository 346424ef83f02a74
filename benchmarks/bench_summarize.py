"""Reference records per second (``refstats.summarize``'s fields: entropy, tail, lp_min, the top
K = 24 ids and log-probs, M = 8 tail probes) from float32 logits rows: the C kernel
(``_core.summarize_rows``, csrc/summarize.c) against its NumPy twin (``refstats.summarize_rows``,
float64) and two torch programs on the CPU, both in float32 (torch's fast form): "torch" is
``log_softmax`` + ``topk`` + the entropy (fewer outputs than the record), "torch record" adds
the rest of the record (lp_min, the tail mass outside the top K, the probes by ``cumsum`` +
``searchsorted``: the same job as the kernel).  All on one thread, measured in one run; plus the
C kernel on every CPU, and the fraction of this machine's single-thread read bandwidth
(benchmarks/_probe.py) the one-thread kernel reaches (the row is read twice: the second read
mostly hits the cache).

    python benchmarks/bench_summarize.py              # 2048 rows (NumPy: 64)
    python benchmarks/bench_summarize.py --rows 256   # quicker

Measured on a shared 2-core Intel Xeon VM (AVX-512, 2 MiB L2, 480 MiB L3; absolute numbers vary
by +-30 % between runs, each row's numbers come from the same run), 2048 rows (a window of the
gptq protocol; bench_logits.py's shape), 2026-11-28:

| vocab | path | C kernel rows/s | NumPy twin rows/s | torch rows/s | torch record rows/s | C / NumPy | C / torch | C / torch record | C, 2 threads | fraction of read BW |
|---|---|---|---|---|---|---|---|---|---|---|
| 32000 | avx512 | 22850 | 1.17e+03 | 4198 | 2608 | 19.6x | 5.44x | 8.76x | 45155 | 0.17 |
| 49152 | avx512 | 16973 | 748 | 2603 | 1706 | 22.7x | 6.52x | 9.95x | 33383 | 0.19 |
| 151936 | avx512 | 5918 | 243 | 767 | 501 | 24.3x | 7.72x | 11.80x | 11712 | 0.21 |
| 32000 | avx2 | 16842 | 1.15e+03 | 4254 | 2688 | 14.6x | 3.96x | 6.26x | 33736 | 0.12 |
| 49152 | avx2 | 11978 | 758 | 2622 | 1696 | 15.8x | 4.57x | 7.06x | 23355 | 0.13 |
| 151936 | avx2 | 4270 | 250 | 852 | 451 | 17.1x | 5.01x | 9.47x | 8493 | 0.15 |

So against torch doing the same job the kernel keeps the logits kernels' 8-12x on AVX-512
(8.8-11.8x; AVX2 6.3-9.5x), and 5.4-7.7x against torch's lighter program.  The row count
matters for torch, not for the kernel: torch allocates (rows x vocab) temporaries, and glibc
serves those below 32 MiB (its largest mmap threshold) from reused heap memory but larger ones
by fresh mmaps whose pages fault in on first touch.  Per value, torch's light program ran 1.8x
faster at 256 x 32000 (32.8 MB) than at 1024 x 32000, and 1.8x faster at 52 x 151936 than at
256 x 151936; so at 256 rows the kernel was only 3.7x torch at 32000 (the earlier table, below)
against 6.6x at 49152 and 151936.  A real window (512-2048 rows x 32k-152k) is far above 32 MiB.
Earlier, 256 rows (NumPy: 32), before the "torch record" column:

| vocab | path | C kernel rows/s | NumPy twin rows/s | torch f32 rows/s | C / NumPy | C / torch | C, 2 threads | fraction of read BW |
|---|---|---|---|---|---|---|---|---|
| 32000 | avx512 | 24472 | 1.17e+03 | 6546 | 20.9x | 3.74x | 38146 | 0.11 |
| 49152 | avx512 | 17559 | 1.19e+03 | 2648 | 14.8x | 6.63x | 16549 | 0.15 |
| 151936 | avx512 | 5974 | 246 | 903 | 24.2x | 6.61x | 12096 | 0.21 |
| 32000 | avx2 | 16692 | 1.21e+03 | 4462 | 13.8x | 3.74x | 32947 | 0.07 |
| 49152 | avx2 | 12408 | 807 | 2573 | 15.4x | 4.82x | 24302 | 0.10 |
| 151936 | avx2 | 4253 | 244 | 879 | 17.4x | 4.84x | 8453 | 0.14 |

(`PPLDELTA_SIMD=avx2` for the avx2 rows.)  Against the kernel before (commit 111cb80), one thread, CPU time,
the median of 3 alternating runs, M = 8:

| rows | avx512 | avx2 |
|---|---|---|
| float32, 32000 | 1.15x | 1.39x |
| float32, 49152 | 1.21x | 1.42x |
| float32, 151936 | 1.09x | 1.50x |
| float64, 49152 | 1.21x | 1.36x |
| float16, 49152 | 11.5x | 8.3x |

What changed: pass 2 (bound by the exp) brings the next row into L2, a line per 8 values, for
pass 1 (bound by memory: the next row's first read had been a stall); AVX-512 reads float32 rows
as they are in pass 2 too (the top ids masked per lane, no float64 copy); AVX2 reads float32 in
pass 1 (8 lanes) and sums the probes' running sum by AVX-512's exact block shortcut instead of
one add at a time; float16 / bfloat16 rows are widened by vcvtph2ps / shifts (the scalar float16
conversion had been a libm ldexp per value).  Every path still gives the same bytes.

What bounds the kernel is the float64 exp: about 21 vector operations per 8 values (AVX-512 profile at
49152: the exp loop 49 % of the kernel, the running sum 18 %, the top-K selection 12 %, the first
read 17 %), against torch's and the logits kernels' float32 exp over 16 lanes.  The record keeps
the float64 exp on purpose: its error model (docs/reference-bounds.md, "Rounding": E1 =
(V + 64) 2^-52 per token) is what lets a reference file be the same bytes on every machine and
the bounds' rounding margins stay about 1e-12.  A float32 exp (about 1.8x on this kernel, from
the profile) would make each e carry about 2^-24 |d| of relative error from d = x - max alone, so
E1 would have to grow to a per-token 2^-24 (1 + H)-sized term and the margins to about 1e-4 nats
per token (estimated, not built), and every path would need an fmaf-exact float32 exp to keep the
same bytes.  So the fraction of read bandwidth stays at 0.17-0.21 (AVX-512), against the logits
kernels' 0.75-0.91 with their float32 exp (whose error budget, exp_poly.h, suits log-probs, not
certified bounds); the speed-up over torch doing the same job is the logits kernels' (above);
and the reference build's end-to-end rate is set by the model's forward anyway
(benchmarks/bench_gguf.py: 1.03x llama-perplexity's base run).
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


def torch_record(x, u):
    """Every field of the record in torch, float32 (its fast form): the top K, entropy, lp_min,
    the tail mass outside the top K and the M probes (the tail's running sum: cumsum, searchsorted)."""
    ls = torch.log_softmax(x, -1)
    top = torch.topk(ls, K, dim=-1)
    p = ls.exp()
    ent = -(p * ls).sum(-1)
    lp_min = ls.min(-1).values
    p.scatter_(1, top.indices, 0.0)
    cum = torch.cumsum(p, 1)
    tot = cum[:, -1:]
    pos = torch.searchsorted(cum, (torch.arange(M, dtype=torch.float32) + u[:, None]) / M * tot, right=True)
    pos = pos.clamp_(max=x.shape[1] - 1)
    return top, ent, lp_min, tot[:, 0].log(), pos, torch.gather(ls, 1, pos)


def numpy_summary(x):
    out = np.zeros(x.shape[0], refstats.RECORD_DTYPE(K, M))
    refstats.summarize_rows(x.astype(np.float64), K, out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"ppldelta {ppldelta.__version__} ({_core.simd()}), torch {torch.__version__}, {ncpu} CPUs")
    lines = []
    for V in (32000, 49152, 151936):
        x = rng.normal(0, 3, (args.rows, V)).astype(np.float32)
        xn = x[:max(1, min(64, args.rows // 8))]
        xt = torch.from_numpy(x)
        read = read_seconds([x])
        c1 = best(lambda: _core.summarize_rows(x, K, M, threads=1))
        cn = best(lambda: _core.summarize_rows(x, K, M, threads=ncpu))
        nn = best(lambda: numpy_summary(xn))
        tt = best(lambda: torch_summary(xt))
        u = torch.from_numpy(refstats.probe_offsets(np.arange(args.rows)).astype(np.float32))
        tr = best(lambda: torch_record(xt, u))
        n = args.rows
        r = dict(V=V, c=n / c1, numpy=xn.shape[0] / nn, torch=n / tt, torch_rec=n / tr, c_all=n / cn, bw=read / c1)
        print(r, flush=True)
        lines.append(f"| {V} | {r['c']:.0f} | {r['numpy']:.3g} | {r['torch']:.0f} | {r['torch_rec']:.0f} | "
                     f"{r['c'] / r['numpy']:.1f}x | {r['c'] / r['torch']:.2f}x | {r['c'] / r['torch_rec']:.2f}x | "
                     f"{r['c_all']:.0f} | {r['bw']:.2f} |")
    print(f"\n{args.rows} rows (NumPy: {max(1, min(64, args.rows // 8))}), float32, K = {K}, M = {M}; one thread "
          f"but the 'C, {ncpu} threads' column.\n")
    print(f"| vocab | C kernel rows/s | NumPy twin rows/s | torch f32 rows/s | torch f32 record rows/s | "
          f"C / NumPy | C / torch | C / torch record | C, {ncpu} threads | fraction of read BW |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
