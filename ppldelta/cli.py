"""Command line: ``ppldelta compare`` (with a CI quality gate) and ``ppldelta demo``.

Exit codes: 0 success (gate passed); 1 the quality gate failed (one line on stderr says why);
2 bad usage or unreadable/invalid input.
"""
from __future__ import annotations

import argparse
import json
import sys

QUALITY_ORDER = ["excellent", "good", "acceptable", "poor"]


def _parser():
    p = argparse.ArgumentParser(prog="ppldelta", description="How much quality did quantization cost?")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="compare per-token log-probs of an original and a quantized model")
    c.add_argument("original", help="file of the original model's per-token log-probs")
    c.add_argument("quantized", help="file of the quantized model's per-token log-probs")
    c.add_argument("--groups", help="file with one group label per token (e.g. prose/code)")
    c.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    c.add_argument("--expected", metavar="FORMAT", help="quantization format for the expected band, e.g. gguf-q4_k_m")
    c.add_argument("--confidence", type=float, default=0.95)
    c.add_argument("--fail-on", choices=QUALITY_ORDER[1:], metavar="QUALITY",
                   help="exit 1 when the quality is this or worse (good, acceptable, poor)")
    c.add_argument("--max-relative-delta", type=float, metavar="PCT",
                   help="exit 1 when the relative perplexity delta exceeds PCT percent")
    d = sub.add_parser("demo", help="the full report on the bundled real data (SmolLM2-135M variants)")
    d.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    d.add_argument("--variant", action="append", help="only these variants (repeatable)")
    return p


def _gate(result: dict, args) -> str | None:
    q = result["quality"]
    if args.fail_on and QUALITY_ORDER.index(q) >= QUALITY_ORDER.index(args.fail_on):
        return f"quality is {q!r} (relative perplexity delta {result['relative_delta_pct']}%), fail-on {args.fail_on!r}"
    if args.max_relative_delta is not None and result["relative_delta_pct"] > args.max_relative_delta:
        return (f"relative perplexity delta {result['relative_delta_pct']}% exceeds "
                f"--max-relative-delta {args.max_relative_delta}%")
    return None


def _compare(args) -> int:
    from . import analyze
    from .io import read_labels, read_values

    orig = read_values(args.original)
    quant = read_values(args.quantized)
    groups = read_labels(args.groups) if args.groups else None
    report = analyze(orig, quant, groups=groups, confidence=args.confidence, expected=args.expected)
    _emit(report, args.format)
    reason = _gate(report.reference, args)
    if reason:
        print(f"ppldelta: FAIL: {reason}", file=sys.stderr)
        return 1
    return 0


def _emit(report, fmt):
    if fmt == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif fmt == "markdown":
        print(report.to_markdown())
    else:
        print(report)


def _demo(args) -> int:
    from . import analyze
    from .demo import load_demo

    data = load_demo()
    variants = args.variant or list(data.variants)
    unknown = set(variants) - set(data.variants)
    if unknown:
        print(f"ppldelta: unknown variant(s) {sorted(unknown)}; have {list(data.variants)}", file=sys.stderr)
        return 2
    reports = {}
    for v in variants:
        reports[v] = analyze(
            data.original, data.log_probs[v], groups=data.groups, kld=data.kld[v],
            same_top1=data.top1[v], top1_in_top5=data.top5[v], top1_in_top10=data.top10[v],
            expected=_demo_format(v),
        )
    meta = data.meta
    if args.format == "json":
        print(json.dumps({"meta": meta, "reports": {v: r.to_dict() for v, r in reports.items()}}, indent=2))
        return 0
    md = args.format == "markdown"
    print(f"{'# ' if md else ''}ppldelta demo: {meta['model']} and quantized variants")
    print(f"{len(data.original):,} tokens ({', '.join(f'{k} {v:,}' for k, v in meta['token_counts'].items())}); "
          f"protocol: sliding window {meta['protocol']['max_length']}/{meta['protocol']['stride']}\n")
    print(_summary_table(reports, data.domains, md))
    print()
    worst = max(reports, key=lambda v: reports[v].reference["relative_delta_pct"])
    print(f"{'## ' if md else ''}Full report for the most damaged variant, {worst}\n")
    print(reports[worst].to_markdown() if md else reports[worst])
    if data.mc_answers is not None:
        from . import choice_flips

        print(f"\n{'## ' if md else ''}Multiple-choice cloze ({len(data.mc_answers)} items): flips vs original")
        for v in variants:
            fl = choice_flips(data.mc_scores["original"], data.mc_scores[v], data.mc_answers)
            print(f"  {v:<14} {fl.summary()}")
    return 0


def _demo_format(variant: str) -> str | None:
    bits = variant.split("_")[0]
    return {"rtn8": "gptq-8", "rtn4": "gptq-4", "rtn3": "gguf-q3_k_m", "rtn2": "gguf-q2_k",
            "int8": "gguf-q8_0"}.get(bits.replace("dynamic", ""), None)


def _summary_table(reports, domains, md):
    head = ["variant", "PPL", "rel. delta %", "95% CI", "quality", "mean KLD", "same top-1 %"] + \
           [f"{d} rel. %" for d in domains] + ["suffers most", "band"]
    rows = []
    for v, r in reports.items():
        d = r.to_dict()
        ci = d["ppl_ratio"]["ci"]
        rows.append([v, f"{d['reference']['quantized_perplexity']:.3f}",
                     f"{d['reference']['relative_delta_pct']:.2f}",
                     f"[{(ci[0] - 1) * 100:.2f}, {(ci[1] - 1) * 100:.2f}]",
                     d["reference"]["quality"],
                     f"{d['kld']['mean']:.4f}" if d.get("kld") else "-",
                     f"{d['same_top1']['pct']:.1f}" if d.get("same_top1") else "-"]
                    + [f"{d['groups'][g]['reference']['relative_delta_pct']:.2f}" for g in domains]
                    + [d.get("suffers_most") or "-",
                       f"{d['expected']['format']}: {d['expected']['verdict']}" if d.get("expected") else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    if md:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head)] + [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _compare(args) if args.command == "compare" else _demo(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"ppldelta: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # pragma: no cover - `ppldelta demo | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
