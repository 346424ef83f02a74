"""Command line: ``ppldelta compare`` (with a CI quality gate) and ``ppldelta demo``.

Exit codes: 0 success (gate passed); 1 the quality gate failed (one line on stderr says why);
2 bad usage or unreadable/invalid input.
"""
from __future__ import annotations

import argparse
import os
import sys

from ._core import QUALITIES

QUALITY_ORDER = list(QUALITIES)  # kept for old callers: the reference's quality words, best first
_COMPARE_EPILOG = """\
files: .npy, .npz, .pt/.pth, .safetensors, .json, .jsonl, or text with one number per line;
  only regular files are read (not devices or pipes).
  FILE:KEY picks one array of a .npz, .pt/.pth or .safetensors file, e.g. both.npz:original
  both.npz:quantized. Without a key a file must hold one array, or exactly one named like
  log-probs (log_probs, logprobs, lp, ...); otherwise it is refused as ambiguous.
  Two llama.cpp --kl-divergence-base logits files (recognised by their _logits_ magic) of the
  same tokens are compared as well: their target log-probs, plus KLD and same top-1.
--format json is strict JSON: a NaN or infinity is written as null, and a top-level
  "nonfinite" object maps its dotted path to "inf", "-inf" or "nan".
exit codes: 0 passed, 1 the quality gate failed, 2 bad usage or input (one line on stderr)."""


def _parser():
    p = argparse.ArgumentParser(prog="ppldelta", description="How much quality did quantization cost?")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="compare per-token log-probs of an original and a quantized model",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_COMPARE_EPILOG)
    c.add_argument("original", help="file of the original model's per-token log-probs (FILE or FILE:KEY)")
    c.add_argument("quantized", help="file of the quantized model's per-token log-probs (FILE or FILE:KEY)")
    c.add_argument("--groups", help="file with one group label per token (e.g. prose/code; FILE or FILE:KEY)")
    c.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    c.add_argument("--expected", metavar="FORMAT", help="quantization format for the expected band, e.g. gguf-q4_k_m")
    c.add_argument("--confidence", type=float, default=0.95)
    c.add_argument("--fail-on", choices=QUALITIES[1:], metavar="QUALITY",
                   help="exit 1 when the quality is this or worse (good, acceptable, poor)")
    c.add_argument("--max-relative-delta", type=float, metavar="PCT",
                   help="exit 1 when the relative perplexity delta exceeds PCT percent")
    d = sub.add_parser("demo", help="the bundled real data (SmolLM2-135M variants): a table of all, the "
                       "full report of the 4-bit one")
    d.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    d.add_argument("--variant", action="append", help="only these variants (repeatable)")
    return p


def _gate(result: dict, args) -> str | None:
    """Why the quality gate fails for the reference dict ``result`` (None: it passes)."""
    q = result["quality"]
    if args.fail_on and QUALITIES.index(q) >= QUALITIES.index(args.fail_on):
        return f"quality is {q!r} (relative perplexity delta {result['relative_delta_pct']}%), fail-on {args.fail_on!r}"
    if args.max_relative_delta is not None and result["relative_delta_pct"] > args.max_relative_delta:
        return (f"relative perplexity delta {result['relative_delta_pct']}% exceeds "
                f"--max-relative-delta {args.max_relative_delta}%")
    return None


def _inputs(args):
    """(original, quantized, extra analyze kwargs) from log-prob files or two llama.cpp logits files."""
    from .io import read_values
    from .llamacpp import compare_logits_files, is_logits_file

    logits = [is_logits_file(p) for p in (args.original, args.quantized)]
    if all(logits):
        c = compare_logits_files(args.original, args.quantized)
        return c["base_log_probs"], c["quant_log_probs"], {"kld": c["kld"], "same_top1": c["same_top1"]}
    if any(logits):
        a, b = (args.original, args.quantized) if logits[0] else (args.quantized, args.original)
        raise ValueError(f"{a} is a llama.cpp logits file and {b} is not: compare two logits "
                         "files of the same text, or two log-prob files")
    return read_values(args.original), read_values(args.quantized), {}


def _compare(args) -> int:
    from .analysis import analyze
    from .io import _one_line, read_labels

    orig, quant, extra = _inputs(args)
    groups = read_labels(args.groups) if args.groups else None
    try:
        report = analyze(orig, quant, groups=groups, confidence=args.confidence,
                         expected=args.expected, **extra)
    except Exception as exc:  # name the files the message is about (all of them if unclear)
        msg = _one_line(exc)
        files = [(args.original, "original_"), (args.quantized, "quantized_"), (args.groups, "group")]
        named = [f for f, word in files if f and word in msg] or [f for f, _ in files if f]
        kind = "" if isinstance(exc, (ValueError, TypeError)) else f"{type(exc).__name__}: "
        raise ValueError(f"{', '.join(named)}: {kind}{msg}") from None
    _emit(report, args.format)
    reason = _gate(report.reference, args)
    if reason:
        print(f"ppldelta: FAIL: {reason}", file=sys.stderr)
        return 1
    return 0


def _emit(report, fmt):
    from .io import to_json

    text = to_json(report.to_dict()) if fmt == "json" else report.to_markdown() if fmt == "markdown" else report
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `ppldelta compare ... | head -1`: the reader has gone, the gate still counts
        _quiet_stdout()


def _quiet_stdout():
    """Point stdout at /dev/null so that nothing (not even the exit-time flush) reports EPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _demo(args) -> int:
    import textwrap

    from .analysis import analyze
    from .flips import choice_flips
    from .demo import ORIGINAL_NOTE, OWN_MODEL_NOTE, featured, load_demo
    from .io import to_json
    from .report import _p_eq

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
    flips = ({v: choice_flips(data.mc_scores["original"], data.mc_scores[v], data.mc_answers) for v in variants}
             if data.mc_answers is not None else {})
    meta = data.meta
    show = featured(variants)
    if args.format == "json":
        print(to_json({"meta": meta, "note": ORIGINAL_NOTE, "featured": show,
                       "reports": {v: r.to_dict() for v, r in reports.items()},
                       "flips": {v: f.to_dict() for v, f in flips.items()}}))
        return 0
    md = args.format == "markdown"
    h2 = "## " if md else ""
    print(f"{'# ' if md else ''}ppldelta demo: {meta['model']} and quantized variants of it")
    print(f"{len(data.original):,} tokens ({', '.join(f'{k} {v:,}' for k, v in meta['token_counts'].items())}); "
          f"sliding window {meta['protocol']['max_length']}/{meta['protocol']['stride']}")
    print(("" if md else "\n".join(textwrap.wrap(ORIGINAL_NOTE, 100))) if not md else ORIGINAL_NOTE)
    print()
    print(_summary_table(reports, data.domains, md, flips))
    print()
    print("verdict: how large the loss is (the reference's 1/5/10 % thresholds, once the 95 % CI excludes no "
          "change) and where the CI lies against the published range for the variant's format ("
          + ", ".join(f"{v}: {r.expected.format}" for v, r in reports.items() if r.expected) + ")."
          if md else "\n".join(textwrap.wrap(
              "verdict: how large the loss is (the reference's 1/5/10 % thresholds, once the 95 % CI "
              "excludes no change) and where the CI lies against the published range for the variant's "
              "format (" + ", ".join(f"{v}: {r.expected.format}" for v, r in reports.items()
                                     if r.expected) + ").", 100)))
    print(f"\n{h2}Full report for {show}" + (" (4-bit, groups of 128: the common setting; "
                                             "--variant picks others)" if show == "rtn4_g128" else "") + "\n")
    print(reports[show].to_markdown() if md else reports[show])
    if flips:
        print(f"\n{h2}Multiple-choice cloze ({len(data.mc_answers)} items): flips vs original")
        for v, fl in flips.items():
            print(f"{'- ' if md else '  '}{v:<13} acc {fl.original_accuracy:.1%} -> {fl.quantized_accuracy:.1%}, "
                  f"flips {fl.flips} ({fl.right_to_wrong} right->wrong, {fl.wrong_to_right} wrong->right), "
                  f"McNemar p {_p_eq(fl.mcnemar_p)}")
    print(f"\n{h2}" + (OWN_MODEL_NOTE.replace("\n  ", "\n\n    ") if md else OWN_MODEL_NOTE))
    return 0


def _demo_format(variant: str) -> str | None:
    from .demo import expected_format

    return expected_format(variant)


def _num(x, nd=2, sign=False):
    """Compact: fixed decimals below 10,000, else 2 significant digits, as 3.8e6 (never rounds twice)."""
    if abs(x) < 1e4:
        return f"{x:{'+' if sign else ''},.{nd}f}"
    return f"{x:{'+' if sign else ''}.2g}".replace("e+0", "e").replace("e+", "e")


def _summary_table(reports, domains, md, flips=None):
    """One row per variant from unrounded values; text fits 100 columns (details in markdown/json)."""
    flips = flips or {}
    head = ["variant", "PPL", "Δ PPL %", "95 % CI, %", "KLD", "top-1 %", "verdict"]
    if md:
        head[4:] = ["mean KLD", "same top-1 %"] + [f"{g} Δ %" for g in domains] + ["suffers most", "cloze flips", "verdict", "why"]
    rows = []
    for v, r in reports.items():
        ratio, ci = r.ppl_ratio.value, r.ppl_ratio.ci
        row = [v, _num(r.ppl.quantized.value, 3), _num((ratio - 1) * 100, sign=True),
               "-" if ci[0] is None else f"{_num((ci[0] - 1) * 100, sign=True)}…{_num((ci[1] - 1) * 100, sign=True)}",
               f"{r.kld.mean:.4f}" if r.kld else "-", f"{r.same_top1.pct:.1f}" if r.same_top1 else "-"]
        if md:
            row += [_num((r.groups[x].ppl_ratio.value - 1) * 100, sign=True) for x in domains]
            row += [r.suffers_most + ("" if r.suffers_most_significant else " (not significant)"),
                    f"{flips[v].flips} ({flips[v].right_to_wrong} right->wrong)" if v in flips else "-",
                    r.verdict.headline, r.verdict.reason]
        else:
            row.append(r.verdict.headline)
        rows.append(row)
    if md:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 6) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r).rstrip() for r in [head] + rows)


def main(argv=None) -> int:
    """Exit codes: 0 passed, 1 the quality gate failed, 2 bad usage or input (one line, no traceback)."""
    from .io import _one_line

    args = _parser().parse_args(argv)
    try:
        code = _compare(args) if args.command == "compare" else _demo(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `ppldelta demo | head`: exit quietly
        _quiet_stdout()
        return 0
    except (ValueError, TypeError, OSError) as exc:
        print(f"ppldelta: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # exit 1 is the quality gate's: never let a traceback claim it
        if os.environ.get("PPLDELTA_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(f"ppldelta: error: {type(exc).__name__}: {_one_line(exc)} (an internal error: "
              "PPLDELTA_TRACEBACK=1 prints the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
