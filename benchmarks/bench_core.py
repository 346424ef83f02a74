"""ppldelta.perplexity_delta against the pure-Python reference, NumPy, math.fsum and torch, and
against this machine's single-thread read bandwidth, all measured in one run.

    python benchmarks/bench_core.py            # n = 10 .. 10^8 (about two minutes)
    python benchmarks/bench_core.py --quick    # n <= 10^6

Prints ratios (this machine is shared: absolute times are noisy, ratios within one run are
what to compare) and a markdown table for the README.
"""
import argparse
import math
import os
import sys
import timeit

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import ppldelta  # noqa: E402
from _probe import read_seconds  # noqa: E402
from oracle import reference_delta as reference  # noqa: E402  (the reference formula, verbatim)

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    torch = None


def best(fn, budget=0.3, repeat=5):
    number = 1
    while True:
        t = timeit.timeit(fn, number=number)
        if t > budget / repeat or number > 1e6:
            break
        number *= 4
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [10, 1_000, 100_000, 1_000_000] + ([] if args.quick else [10_000_000, 100_000_000])
    rng = np.random.default_rng(0)
    print(f"ppldelta {ppldelta.__version__}, SIMD path {ppldelta.simd()}, numpy {np.__version__}"
          + (f", torch {torch.__version__} (1 thread)" if torch else ""))
    rows = []
    for n in sizes:
        o = (-rng.exponential(2.0, n)).astype(np.float32)
        q = (o - rng.exponential(0.05, n)).astype(np.float32)
        t_ppl = best(lambda: ppldelta.perplexity_delta(o, q))
        r = {"n": n, "ppldelta": t_ppl}
        if n <= 1_000_000:
            lo, lq = o.tolist(), q.tolist()
            r["ref_list"] = best(lambda: reference(lo, lq))
            r["ppl_list"] = best(lambda: ppldelta.perplexity_delta(lo, lq))
            r["ref_array"] = best(lambda: reference(o, q))
        r["np_mean32"] = best(lambda: (np.mean(o), np.mean(q)))
        r["np_mean64"] = best(lambda: (np.mean(o, dtype=np.float64), np.mean(q, dtype=np.float64)))
        if n <= 10_000_000:
            r["fsum"] = best(lambda: (math.fsum(o), math.fsum(q)), repeat=3)
        if torch is not None:
            to, tq = torch.from_numpy(o), torch.from_numpy(q)
            r["torch64"] = best(lambda: (to.double().mean(), tq.double().mean()))
        r["read"] = read_seconds([o, q]) if n >= 100_000 else float("nan")
        rows.append(r)
        gbs = 8 * n / t_ppl / 1e9
        frac = r["read"] / t_ppl
        print(f"n={n:>11,}  ppldelta {t_ppl * 1e6:11.1f} us  {gbs:6.1f} GB/s"
              + (f"  {frac:4.2f} of read bandwidth" if n >= 100_000 else ""), flush=True)

    def ratio(r, k):
        return f"{r[k] / r['ppldelta']:.1f}x" if k in r else "-"

    print("\nSpeed-up of ppldelta.perplexity_delta (two float32 arrays; list rows: two lists) "
          "over each alternative, measured in this run; higher is better.\n")
    print("| n | reference (lists) | reference (arrays) | ppldelta on lists vs reference | np.mean(float32) "
          "| np.mean(dtype=float64) | math.fsum | torch .double().mean() | GB/s | fraction of read bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lists = f"{r['ref_list'] / r['ppl_list']:.1f}x" if "ppl_list" in r else "-"
        bw = f"{r['read'] / r['ppldelta']:.2f}" if r["read"] == r["read"] else "-"
        print(f"| {r['n']:,} | {ratio(r, 'ref_list')} | {ratio(r, 'ref_array')} | {lists} | "
              f"{ratio(r, 'np_mean32')} | {ratio(r, 'np_mean64')} | {ratio(r, 'fsum')} | "
              f"{ratio(r, 'torch64')} | {8 * r['n'] / r['ppldelta'] / 1e9:.1f} | {bw} |")


if __name__ == "__main__":
    main()
