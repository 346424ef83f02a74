"""token_log_probs and kl_divergence against torch CPU (log_softmax + gather, kl_div), for
(rows x 32000) and (rows x 151936) logits in float32 and bfloat16, on one thread and on all
threads, measured in one run; then, on one thread, every SIMD path this CPU has against this
machine's single-thread read bandwidth, measured in the same run right before each kernel over
the same bytes (a plain C read loop, benchmarks/_probe.py): "fraction" = kernel GB/s / read GB/s.

    python benchmarks/bench_logits.py            # 2048 rows (as in the issue)
    python benchmarks/bench_logits.py --rows 512 # quicker
    python benchmarks/bench_logits.py --paths-only --paths avx512,avx2 --repeat 15

Measured here (2 shared cores of an Intel Xeon with AVX-512, load average 7-9 from other jobs):
`--paths-only --paths avx512,avx2 --rows 1024 --repeat 11`, float32, one thread, CPU time,
the range over 2-3 runs; "before" = the kernels before issue 10, run alternately with "after".
Read bandwidth of the same bytes in those runs: 17.4-18.6 GB/s.

| vocab | SIMD path | log-probs before | after | KLD before | after |
|---|---|---|---|---|---|
| 32,000 | avx512 | 0.45-0.47 (8.3 GB/s) | 0.75-0.81 (13.4-14.2 GB/s) | 0.47 | 0.76-0.80 (13.6-14.1 GB/s) |
| 151,936 | avx512 | 0.49 (8.8-9.0 GB/s) | 0.84-0.91 (15.5-16.1 GB/s) | 0.49 | 0.83-0.88 (15.3-15.5 GB/s) |
| 32,000 | avx2 | 0.36-0.37 | 0.61-0.67 | 0.32-0.33 | 0.54-0.60 |
| 151,936 | avx2 | 0.37-0.39 | 0.64-0.67 | 0.33-0.35 | 0.57-0.61 |

In cache (8 x 32000 floats, CPU time): avx512 log-probs 0.39 -> 0.25 ns per logit, KLD 0.72 ->
0.54 ns per pair; sse2 (its exp unchanged) 1.14 -> 0.99 and 2.42 -> 2.33.  Wall-clock figures
on this machine swing by 2x with the neighbours' load; the ratios above are CPU-time ratios.
What changed: one exp of 11 operations (AVX-512: no clamp, vscalefps; exp_poly.h has its
error budget), a max pass with four independent maxima (NaN found through the sums instead),
a KL pass without masks for chunks whose logits are all finite and within 2^16 of each other,
and the next chunk prefetched while a chunk's exps are computed.  bfloat16 rows stay at
0.25-0.45: two extra operations per value to widen them, in each pass.
"""
import argparse
import os
import sys
import time
import timeit

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import ppldelta  # noqa: E402
from ppldelta import _core  # noqa: E402
from _probe import read_seconds  # noqa: E402

PATHS = ("avx512", "avx2", "sse2", "scalar")


def best(fn, repeat=3):
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def cpu(fn):
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def data(rows, V, rng):
    a = rng.normal(0, 3, (rows, V)).astype(np.float32)
    b = a + 0.3 * rng.standard_normal((rows, V), dtype=np.float32)
    return a, b, rng.integers(0, V, rows)


def bf16_bits(x):
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated: fine for timing


def vs_torch(args, ncpu, rng):
    import torch
    import torch.nn.functional as F
    rows = []
    for V in (32000, 151936):
        a32, b32, t = (torch.from_numpy(x) for x in data(args.rows, V, rng))
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
    print(f"\n{args.rows} rows, SIMD path {ppldelta.simd()}; speed-up over torch at equal thread count, GB/s "
          "of logits read, fraction of single-thread read bandwidth (single-thread rows).\n")
    print("| vocab | dtype | threads | log-probs vs torch | GB/s | fraction of read BW | KLD vs torch | GB/s | fraction of read BW | torch GB/s (lp / KLD) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bw = (lambda x: f"{x:.2f}") if r["threads"] == 1 else (lambda x: "-")
        print(f"| {r['V']:,} | {r['dtype']} | {r['threads']} | {r['lp_ratio']:.1f}x | {r['lp_gbs']:.1f} | {bw(r['lp_bw'])} "
              f"| {r['kl_ratio']:.1f}x | {r['kl_gbs']:.1f} | {bw(r['kl_bw'])} | {r['torch_lp_gbs']:.2f} / {r['torch_kl_gbs']:.2f} |")
    print("\nPeak extra memory of ppldelta: the per-row outputs, O(rows); torch materialises "
          "(rows x vocab) log-softmax temporaries.\n")


def per_path(args, rng):
    """One thread, every SIMD path: GB/s of logits read and the fraction of the read bandwidth
    measured over the same bytes just before (best of args.repeat each)."""
    have = []
    for p in args.paths.split(","):
        try:
            _core._set_simd(p)
            have.append(p)
        except ValueError:
            pass
    print(f"{args.rows} rows, one thread (CPU time); fraction = kernel GB/s / read GB/s of the same bytes "
          f"(best of {args.repeat})\n")
    print("| vocab | dtype | SIMD path | read GB/s | log-probs GB/s | fraction | KLD GB/s | fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for V in (32000, 151936):
        a, b, t = data(args.rows, V, rng)
        for dtype in ("float32", "bfloat16"):
            x, y, kw = (a, b, {}) if dtype == "float32" else (bf16_bits(a), bf16_bits(b), {"bf16": True})
            for p in have:
                if p == "sse2" and dtype != "float32":
                    continue  # no bfloat16 kernel there: it is the portable one
                _core._set_simd(p)
                rows = x if p != "scalar" else x[: max(1, args.rows // 8)]  # the float64 kernel is slow
                yy, tt = y[: len(rows)], t[: len(rows)]
                # read and kernel timed alternately, best of each, in CPU time of this thread: the
                # machine is shared, and wall time would measure the neighbours
                read, lp, kl_read, kl = (min(v) for v in zip(*[(
                    cpu(lambda: read_seconds([rows], repeat=1)),
                    cpu(lambda: ppldelta.token_log_probs(rows, tt, **kw)),
                    cpu(lambda: read_seconds([rows, yy], repeat=1)),
                    cpu(lambda: ppldelta.kl_divergence(rows, yy, topk=False, **kw)))
                    for _ in range(args.repeat)]))
                print(f"| {V:,} | {dtype} | {p} | {rows.nbytes / read / 1e9:.1f} | {rows.nbytes / lp / 1e9:.1f} "
                      f"| {read / lp:.2f} | {2 * rows.nbytes / kl / 1e9:.1f} | {kl_read / kl:.2f} |", flush=True)
    _core._set_simd(have[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--paths-only", action="store_true", help="only the per-path bandwidth table (no torch)")
    ap.add_argument("--paths", default=",".join(PATHS), help="SIMD paths of that table (those this CPU has)")
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    print(f"ppldelta {ppldelta.__version__} ({ppldelta.simd()}), {ncpu} CPUs")
    if not args.paths_only:
        vs_torch(args, ncpu, rng)
    per_path(args, rng)


if __name__ == "__main__":
    main()
