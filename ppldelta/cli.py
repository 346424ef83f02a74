"""Command line: ``ppldelta compare`` (with a CI quality gate), ``ppldelta demo``, and for models
``ppldelta reference build`` (score the original once into a reference file) and ``ppldelta eval``
(many quantized variants against one reference: one table, sorted by KLD, gates per variant).

Exit codes: 0 success (gate passed); 1 the quality gate failed (one line on stderr says why);
2 bad usage or unreadable/invalid input; 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import math
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
exit codes: 0 passed, 1 the quality gate failed, 2 bad usage or input (one line on stderr),
  130 interrupted."""


def _finite(text):
    """argparse type: a finite float (nan or inf would turn a gate off or make no sense)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def _parser():
    p = argparse.ArgumentParser(prog="ppldelta", description="How much quality did quantization cost?")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="compare per-token log-probs of an original and a quantized model",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_COMPARE_EPILOG)
    c.add_argument("original", help="file of the original model's per-token log-probs (FILE or FILE:KEY)")
    c.add_argument("quantized", nargs="?", help="file of the quantized model's per-token log-probs (FILE or "
                   "FILE:KEY); omitted when ORIGINAL is a per-token file of `ppldelta eval --save-tokens`")
    c.add_argument("--groups", help="file with one group label per token (e.g. prose/code; FILE or FILE:KEY)")
    c.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    c.add_argument("--expected", metavar="FORMAT", help="quantization format for the expected band, e.g. gguf-q4_k_m")
    c.add_argument("--confidence", type=_finite, default=0.95)
    c.add_argument("--fail-on", choices=QUALITIES[1:], metavar="QUALITY",
                   help="exit 1 when the quality is this or worse (good, acceptable, poor)")
    c.add_argument("--max-relative-delta", type=_finite, metavar="PCT",
                   help="exit 1 when the relative perplexity delta exceeds PCT percent")
    d = sub.add_parser("demo", help="the bundled real data (SmolLM2-135M variants): a table of all, the "
                       "full report of the 4-bit one")
    d.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    d.add_argument("--variant", action="append", help="only these variants (repeatable)")
    _model_parsers(sub)
    return p


_EVAL_EPILOG = """\
SOURCE is a reference file (ppldelta reference build), a llama.cpp --kl-divergence-base logits
  file (converted to a reference first), or the original model (a Hugging Face id or a local
  path; needs --text): its reference is built first and cached (--reference PATH, else
  --cache-dir, $PPLDELTA_CACHE_DIR, or ~/.cache/ppldelta, keyed by model, text, protocol and K).
QUANT: Hugging Face ids or local paths (quantization configs are read from them); the loading
  arguments apply to every model. A .gguf file (SOURCE or QUANT) runs through llama-cpp-python
  (pip install llama-cpp-python; the loading arguments do not apply), SOURCE under the llama.cpp
  protocol (--max-length is n_ctx, one --text FILE is read as llama-perplexity -f reads it). A
  llama.cpp logits file as QUANT (llama-perplexity --kl-divergence-base run on the quant, same
  text and -c) is compared as stored: uint16-decoded rows, floored 16 nats below the maximum. The
  tokens are the reference's own; --text is checked against them (a different tokenizer or text
  is refused).
Groups: several --text files (--text prose=wiki.txt --text code=src.txt) are joined with the
  protocol's separator into one token stream, each file a group (LABEL, else the file's name);
  the reference records them, and every table then adds a Δ PPL % per group (a token belongs to
  the file it comes from; windows may span two files, as in one long text).
The table has one row per variant, sorted by the KLD estimate (mean KL(original || variant)
  from the reference's top-K, nats). Text fits 100 columns: PPL, Δ PPL % and its CI, KLD mean
  and p99, same top-1, RMS Δp, bits per weight, the gate, then one verdict line per variant;
  markdown, html and json add the PPL ratio [CI], the certified KLD bounds [lower, upper], the
  expected band and the size.
size (a local QUANT): the bytes of its weight files (a folder's *.safetensors, else its *.bin /
  *.pt / *.pth, else its *.gguf; with --gguf-file that file; a file is its own size). Bits per
  weight = 8 x bytes / the parameter count of the variant's architecture unquantized (its class
  built from its config on the meta device: packed 4-bit / int8 tensors of bitsandbytes, quanto
  or GPTQ count as the weights they stand for, tied embeddings once), so scales, zero points and
  unquantized layers count in the bytes: the storage cost per weight. Unknown (a hub id, a model
  that cannot be rebuilt from its config): "-".
--plot PATH.png: KLD mean (log scale; the certified bounds as error bars) against bits per
  weight (else file size, else the table's order), one labelled point per variant; needs
  matplotlib (pip install 'ppldelta[plot]').
--save-tokens DIR: DIR/NAME.npz per variant, the per-token arrays (original_log_probs,
  quantized_log_probs, kld, kld_lo, kld_hi, kld_reverse[_lo|_hi], delta_p, same_top1,
  top1_in_top5, top1_in_top10, target_positions; groups where the reference has them), in the
  reference's token order; e.g. ppldelta compare F.npz gives the same report, and
  ppldelta compare F.npz:original_log_probs F.npz:quantized_log_probs gives the same PPLs.
--choices FILE.jsonl: multiple-choice items, one {"context", "choices", "answer"} per line (an
  lm-eval multiple_choice task's file), scored as lm-eval's loglikelihood requests (context,
  " " + choice); the original's scores go into the reference (reference build, or the cached
  build of eval ORIGINAL), and eval adds each variant's acc change, flips and McNemar's p.
With a reference file as SOURCE, its protocol, window, stride, K, probes and groups are fixed:
  an option that says otherwise is refused. QUANT paths are checked before any model runs; a
  checkpoint that lacks weights the model needs (transformers would fill them at random) is
  refused.
exit codes: 0 passed, 1 a variant failed a gate, 2 bad usage or input (one line on stderr),
  130 interrupted (a reference build resumes when the same command runs again)."""


def _load_args(p):
    g = p.add_argument_group("loading (passed to from_pretrained)")
    g.add_argument("--torch-dtype", default="auto",
                   help="auto (default: keep the checkpoint's dtype), float32, bfloat16, float16")
    g.add_argument("--device-map", help="e.g. auto, cuda:0 (default: --device, else the CPU)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit)")
    g.add_argument("--gguf-file", help="a GGUF file inside the model's repository or folder")
    g.add_argument("--trust-remote-code", action="store_true")


def _build_args(p, text_required):
    p.add_argument("--text", metavar="[LABEL=]FILE", required=text_required, action="append",
                   help="the evaluation text (a UTF-8 file, used verbatim); repeat it for several texts, "
                   "each a group of the report (LABEL=FILE names it, default the file's name)")
    p.add_argument("--protocol", help="sliding (default; llama.cpp for a GGUF file), hf, llama.cpp, gptq")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="top-K log-probs kept per token (default 24)")
    p.add_argument("--probes", type=int, default=None, metavar="M",
                   help="tail tokens sampled per token for the KLD estimate (default 8; 0: none)")
    p.add_argument("--choices", metavar="FILE.jsonl",
                   help="multiple-choice items ({context, choices, answer} per line): the original's "
                   "scores go into the reference, each variant's flips into the table")
    p.add_argument("--max-length", type=int, help="window / n_ctx / seqlen (default: the protocol's)")
    p.add_argument("--stride", type=int, help="sliding and hf only (default max_length // 2)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--device", help="where the model runs (default: the CPU, or --device-map)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_parsers(sub):
    r = sub.add_parser("reference", help="reference files: the original model scored once")
    rsub = r.add_subparsers(dest="reference_command", required=True)
    b = rsub.add_parser("build", help="score MODEL over --text and write its reference file",
                        description="MODEL: a Hugging Face id or local path, a GGUF file (through "
                        "llama-cpp-python, llama.cpp protocol, --max-length = n_ctx), or a llama.cpp "
                        "--kl-divergence-base logits file (converted; --text not needed).")
    b.add_argument("model", help="the original model (id or path), or a llama.cpp logits file")
    _build_args(b, text_required=False)
    b.add_argument("-o", "--output", required=True, help="the reference file to write (e.g. base.ppldref)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing file (default: resume an interrupted build)")
    _load_args(b)
    e = sub.add_parser("eval", help="quantized variants against a reference (or an original model)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EVAL_EPILOG)
    e.add_argument("source", help="a reference file, a llama.cpp logits file, or the original model")
    e.add_argument("quantized", nargs="+", metavar="QUANT", help="quantized variants (ids or paths)")
    _build_args(e, text_required=False)
    e.add_argument("--reference", metavar="PATH", help="where to keep the reference built from SOURCE")
    e.add_argument("--cache-dir", help="folder of cached references (default ~/.cache/ppldelta)")
    e.add_argument("--format", choices=["text", "json", "markdown", "html"], default="text")
    e.add_argument("--plot", metavar="PATH.png", help="write a PNG of quality (KLD) against size")
    e.add_argument("--save-tokens", metavar="DIR", help="write DIR/NAME.npz of per-token results per variant")
    e.add_argument("--expected", action="append", metavar="FMT|NAME=FMT",
                   help="quantization format for the expected band, for all variants or one (repeatable; "
                        "a GGUF variant defaults to its file type's)")
    e.add_argument("--confidence", type=_finite, default=0.95)
    e.add_argument("--fail-on", choices=QUALITIES[1:], metavar="QUALITY",
                   help="exit 1 when a variant's quality is this or worse (good, acceptable, poor)")
    e.add_argument("--max-relative-delta", type=_finite, metavar="PCT",
                   help="exit 1 when a variant's relative perplexity delta exceeds PCT percent")
    _load_args(e)


def _gate(report, args) -> str | None:
    """Why the quality gate fails for ``report`` (None: it passes).  The threshold is compared
    with the unrounded relative delta, as the quality band is (the reference dict's is rounded
    to 4 decimals: 5.00004 % read 5.0 and passed --max-relative-delta 5)."""
    q = report.reference["quality"]
    o, qq = report.ppl.original.value, report.ppl.quantized.value
    rel = (qq - o) / o * 100 if math.isfinite(qq) else math.inf
    if args.fail_on and QUALITIES.index(q) >= QUALITIES.index(args.fail_on):
        return f"quality is {q!r} (relative perplexity delta {rel:.6g}%), fail-on {args.fail_on!r}"
    if args.max_relative_delta is not None and rel > args.max_relative_delta:
        return f"relative perplexity delta {rel:.6g}% exceeds --max-relative-delta {args.max_relative_delta}%"
    return None


def _inputs(args):
    """(original, quantized, extra analyze kwargs) from log-prob files or two llama.cpp logits files."""
    from .io import read_values
    from .llamacpp import compare_logits_files, is_logits_file

    if args.quantized is None:
        return _token_file(args.original)
    logits = [is_logits_file(p) for p in (args.original, args.quantized)]
    if all(logits):
        c = compare_logits_files(args.original, args.quantized)
        return c["base_log_probs"], c["quant_log_probs"], {"kld": c["kld"], "same_top1": c["same_top1"],
                                                            "kld_definition": c["kld_definition"]}
    if any(logits):
        a, b = (args.original, args.quantized) if logits[0] else (args.quantized, args.original)
        raise ValueError(f"{a} is a llama.cpp logits file and {b} is not: compare two logits "
                         "files of the same text, or two log-prob files")
    return read_values(args.original), read_values(args.quantized), {}


#: The per-token arrays of a ``ppldelta eval --save-tokens`` file that ``analyze`` takes, by keyword.
_TOKEN_FILE_KWARGS = {"kld": "kld", "kld_reverse": "kld_reverse", "same_top1": "same_top1",
                      "top1_in_top5": "top1_in_top5", "top1_in_top10": "top1_in_top10"}


def _token_file(path):
    """(original, quantized, extra analyze kwargs) from one per-token file of ``eval --save-tokens``
    (a .npz with original_log_probs, quantized_log_probs and the KLD columns with their bounds)."""
    import numpy as np

    from .io import read_values

    if not path.lower().endswith(".npz") or not os.path.isfile(path):
        raise ValueError(f"{path}: compare takes two log-prob files, or one .npz file saved by "
                         "`ppldelta eval --save-tokens`")
    try:
        with np.load(path, allow_pickle=False) as z:
            have = set(z.files)
    except Exception as exc:  # zip and format errors: bad input
        raise ValueError(f"{path}: cannot read as npz: {type(exc).__name__}: {exc}") from None
    need = {"original_log_probs", "quantized_log_probs"}
    if not need <= have:
        raise ValueError(f"{path}: not a per-token file of `ppldelta eval --save-tokens` (it lacks "
                         f"{', '.join(sorted(need - have))})")
    col = lambda key: read_values(f"{path}:{key}")  # noqa: E731
    extra = {kw: col(key) for kw, key in _TOKEN_FILE_KWARGS.items() if key in have}
    if "groups" in have:  # the reference's text groups (str), one per token
        try:
            with np.load(path, allow_pickle=False) as z:
                extra["groups"] = z["groups"]
        except ValueError as exc:  # an object array (pickled): not read
            raise ValueError(f"{path}:groups: {exc}") from None
    for kw in ("kld", "kld_reverse"):
        if {kw + "_lo", kw + "_hi"} <= have:
            extra[kw + "_bounds"] = (col(kw + "_lo"), col(kw + "_hi"))
    return col("original_log_probs"), col("quantized_log_probs"), extra


def _compare(args) -> int:
    from .analysis import analyze
    from .bands import expected_band
    from .io import _one_line, read_labels

    if not 0 < args.confidence < 1:  # the options first, before the data is read, and named as options
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.expected is not None:
        try:
            expected_band(args.expected)
        except ValueError as exc:
            raise ValueError(f"--expected: {_one_line(exc)}") from None
    orig, quant, extra = _inputs(args)
    stored = extra.pop("groups", None)  # a --save-tokens file's text groups; --groups overrides them
    groups = read_labels(args.groups) if args.groups else stored
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
    reason = _gate(report, args)
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
                  f"flips {fl.flips} ({fl.breakdown}),{' ' if md else chr(10) + ' ' * 16}McNemar p {_p_eq(fl.mcnemar_p)}")
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


# ---------------------------------------------------------------------------- reference build / eval
def _load_kwargs(args) -> dict:
    kw = {"torch_dtype": args.torch_dtype, "revision": args.revision, "gguf_file": args.gguf_file,
          "trust_remote_code": args.trust_remote_code, "device_map": args.device_map or args.device}
    return {k: v for k, v in kw.items() if v is not None}


def _tok_kwargs(args) -> dict:
    return {"revision": args.revision, "gguf_file": args.gguf_file, "trust_remote_code": args.trust_remote_code}


def _check_options(args):
    if args.no_progress:  # transformers' own bars too (loading weights)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - the command then fails on loading with a clear line
            pass
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.probes is not None and args.probes < 0:
        raise ValueError(f"--probes must be >= 0, got {args.probes}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for opt in ("max_length", "stride"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
    dev = str(args.device_map or args.device or "")
    if dev.startswith("cuda"):
        try:
            import torch
        except ImportError:
            raise ValueError(f"--device {dev}: running a model needs torch") from None

        if not torch.cuda.is_available():
            raise ValueError(f"--device{'-map' if args.device_map else ''} {dev}: this torch "
                             f"({torch.__version__}) sees no CUDA device")
    args.texts = _texts(args)  # read once; a missing file is refused before any model loads
    if getattr(args, "choices", None) is not None:
        from .choices import read_items

        read_items(args.choices)  # so is a bad items file


def _text_files(args) -> list:
    """[(LABEL or None, FILE)] of the --text options, each file checked to exist."""
    files = []
    for item in args.text or ():
        label, sep, path = item.partition("=")
        if os.path.isfile(item) or not sep:  # a path holding "=" is a path
            label, path = None, item
        if not os.path.isfile(path):
            raise ValueError(f"--text {item}: not a file")
        if label is not None and not label.strip():
            raise ValueError(f"--text {item}: empty LABEL")
        files.append((label, path))
    return files


def _texts(args):
    """(texts, groups) of the --text options: (None, None) without any; (FILE, None) for one
    unlabelled file (read as the producer reads a file: verbatim, or as llama-perplexity -f for
    a GGUF); else the files' texts as a list (joined with the protocol's separator) and one group
    label per file (its LABEL, else its name)."""
    files = _text_files(args)
    if not files:
        return None, None
    texts = []
    for _, path in files:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as exc:
            raise ValueError(f"--text {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if len(files) == 1 and files[0][0] is None:
        return files[0][1], None  # the producer reads the file itself (as llama-perplexity -f for a GGUF)
    return texts, [label if label is not None else os.path.basename(path) for label, path in files]


def _is_reference_file(path) -> bool:
    from .reffile import MAGIC

    try:
        with open(path, "rb") as f:
            return os.path.isfile(path) and f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _is_gguf(path) -> bool:
    """Whether ``path`` is a GGUF file (run through llama-cpp-python); a ``.gguf`` path that is no
    GGUF file is refused."""
    from .llamacpp import is_gguf_file

    if is_gguf_file(path):
        return True
    if str(path).lower().endswith(".gguf") and not os.path.isdir(path):
        raise ValueError(f"{path}: not a GGUF file" if os.path.exists(path) else f"{path}: no such file")
    return False


def _protocol(args, source) -> str:
    return args.protocol or ("llama.cpp" if _is_gguf(source) else "sliding")


def _load_gguf(path, n_ctx):
    from .llamacpp import load_gguf

    try:
        return load_gguf(path, n_ctx=n_ctx)
    except ImportError:
        raise ValueError(f"{path} is a GGUF file: running it needs llama-cpp-python "
                         "(pip install llama-cpp-python)") from None


def _close(llama):
    close = getattr(llama, "close", None)
    if callable(close):
        close()


def _build_gguf(args, source, out, overwrite):
    """The reference of a GGUF file under the llama.cpp protocol (--max-length is n_ctx)."""
    from .llamacpp import build_reference

    if _protocol(args, source) != "llama.cpp":
        raise ValueError(f"{source} is a GGUF file: it is scored under the llama.cpp protocol only "
                         f"(llama-perplexity's chunks), not --protocol {args.protocol}")
    if args.stride is not None:
        raise ValueError("--stride: the llama.cpp protocol scores non-overlapping chunks of --max-length "
                         "(n_ctx) tokens: leave --stride unset")
    texts, groups = args.texts
    if texts is None:
        raise ValueError(f"building the reference of {source} needs --text FILE")
    n_ctx = 512 if args.max_length is None else args.max_length
    llama = _load_gguf(source, n_ctx)
    try:
        return build_reference(llama, out, texts=texts, k=args.top_k, n_ctx=n_ctx, resume=not overwrite,
                               progress=not args.no_progress, probes=args.probes, groups=groups,
                               choices=args.choices)
    finally:
        _close(llama)


def _build(args, source, out, overwrite=False):
    """Write the reference of ``source`` (a model, a GGUF file or a llama.cpp logits file) to ``out``."""
    from .llamacpp import convert_logits_file, is_logits_file

    if _is_gguf(source):
        return _build_gguf(args, source, out, overwrite)
    if is_logits_file(source):
        if args.choices is not None:
            raise ValueError(f"--choices: {source} is a logits file; choice scores need the original model")
        for opt, v in (("--protocol", None if args.protocol == "llama.cpp" else args.protocol),
                       ("--max-length", args.max_length), ("--stride", args.stride)):
            if v is not None:
                raise ValueError(f"{opt} {v}: {source} is a llama.cpp logits file, whose chunks fix the "
                                 "protocol (llama.cpp) and the window (its n_ctx): leave the option out")
        return convert_logits_file(source, out, resume=not overwrite, k=args.top_k, probes=args.probes)
    if _is_reference_file(source):
        raise ValueError(f"{source} is a reference file already (ppldelta eval reads it as it is)")
    if source.endswith((".ppldref", ".kld")) and not os.path.exists(source):
        raise ValueError(f"{source}: no such file")
    texts, groups = args.texts
    if texts is None:
        raise ValueError(f"building the reference of {source} needs --text FILE")
    from .hf._reference import build_reference, load_model, load_tokenizer

    model = load_model(source, **_load_kwargs(args))
    tok = load_tokenizer(source, **_tok_kwargs(args))
    return build_reference(model, texts=texts, groups=groups, choices=args.choices, out=out, tokenizer=tok, protocol=_protocol(args, source),
                           max_length=args.max_length, stride=args.stride, k=args.top_k, probes=args.probes,
                           batch_size=args.batch_size, progress=not args.no_progress, resume=not overwrite)


def _check_output(args):
    """-o: a file path (not empty, not a folder), never one of the command's inputs; --overwrite
    replaces only a reference file (or its unfinished .part)."""
    out = args.output
    if not out or not os.path.basename(out):
        raise ValueError(f"-o {out!r}: name a file (e.g. base.ppldref)")
    if os.path.isdir(out):
        raise ValueError(f"-o {out}: is a directory; name a file in it (e.g. {os.path.join(out, 'base.ppldref')})")
    inputs = [args.model, args.choices] + [p for _, p in _text_files(args)]
    for p in inputs:
        if p and os.path.exists(p) and os.path.exists(out) and os.path.samefile(p, out):
            raise ValueError(f"-o {out}: is one of this command's inputs")
    if args.overwrite and os.path.isfile(out) and not _is_reference_file(out):
        raise ValueError(f"-o {out}: exists and is not a reference file; --overwrite replaces only a "
                         "reference file (remove it yourself if it should go)")


def _reference_build(args) -> int:
    from .reffile import read_reference

    _check_options(args)
    _check_output(args)
    try:
        out = _build(args, args.model, args.output, overwrite=args.overwrite)
    except ValueError as exc:
        if "holds a different reference" in str(exc):
            raise ValueError(f"{args.output} exists and holds a different reference: "
                             "--overwrite replaces it") from None
        raise ValueError(str(exc).replace("pass resume=False (or delete", "pass --overwrite (or delete")) from None
    ref = read_reference(out)
    n = len(ref.records)
    size = os.path.getsize(out)
    p = ref.header.get("protocol") or {}
    print(f"{out}: {n:,} scored tokens, K = {ref.k}, {ref.probes} probes, {size:,} bytes ({size / max(n, 1):.0f} B/token); "
          f"protocol {p.get('name')} max_length {p.get('max_length')}"
          + (f" stride {p['stride']}" if p.get("stride") is not None else ""))
    return 0


def _cache_dir(args):
    d = (args.cache_dir or os.environ.get("PPLDELTA_CACHE_DIR")
         or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ppldelta"))
    os.makedirs(d, exist_ok=True)
    return d


def _fingerprint(path):
    """What identifies a local model folder or file without reading it: names, sizes, mtimes."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    out = []
    for name in sorted(os.listdir(path)):
        st = os.stat(os.path.join(path, name))
        if not os.path.isdir(os.path.join(path, name)):
            out.append([name, st.st_size, st.st_mtime_ns])
    return out


def _cached_reference(args):
    """The reference of ``args.source`` (built or converted once, then reused)."""
    import hashlib
    import json

    from .llamacpp import is_logits_file
    from .reffile import file_sha256

    src = args.source
    if args.reference:
        out = args.reference
    else:
        local = os.path.exists(src)
        text_sha = None
        if args.text:
            text_sha = []
            for label, path in _text_files(args):  # the labels, their order and each file's bytes
                with open(path, "rb") as f:
                    text_sha.append([label, os.path.basename(path), hashlib.sha256(f.read()).hexdigest()])
        key = {"source": os.path.abspath(src) if local else src,
               "fingerprint": _fingerprint(src) if local else None, "text": text_sha,
               "protocol": _protocol(args, src), "max_length": args.max_length, "stride": args.stride,
               "k": args.top_k, "probes": args.probes, "logits_file": is_logits_file(src),
               "choices": None if args.choices is None else file_sha256(args.choices),
               "load": {k: v for k, v in _load_kwargs(args).items() if k != "device_map"}}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        base = os.path.basename(os.path.normpath(src))
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
        out = os.path.join(_cache_dir(args), f"{slug[:60]}-{digest}.ppldref")
    try:
        return _build(args, src, out)
    except ValueError as exc:
        if "holds a different reference" not in str(exc):
            raise
        if args.reference:
            raise ValueError(str(exc).replace("remove it or pass resume=False to overwrite",
                                              "remove it, or name another --reference")) from None
        return _build(args, src, out, overwrite=True)  # a stale cache entry


def _check_fixed_by_reference(args, ref):
    """With a reference file as SOURCE, its protocol, window, stride, K, probes and text groups are
    what they are: an option given that says otherwise is refused, not silently ignored."""
    p = ref.header.get("protocol") or {}
    given = {"--protocol": (args.protocol, p.get("name")), "--max-length": (args.max_length, p.get("max_length")),
             "--stride": (args.stride, p.get("stride")), "--top-k": (args.top_k, ref.k),
             "--probes": (args.probes, ref.probes)}
    for opt, (mine, theirs) in given.items():
        if mine is not None and mine != theirs:
            raise ValueError(f"{opt} {mine}: the reference {args.source} has {theirs} (its protocol, window, "
                             "K and probes are fixed when it is built: leave the option out, or build another "
                             "reference)")
    labels = args.texts[1]
    names = ((ref.header.get("groups") or {}).get("names"))
    if labels is not None and names is not None and list(labels) != list(names):
        raise ValueError(f"--text: the groups are {', '.join(labels)} here and {', '.join(names)} in the "
                         f"reference {args.source} (give the files in its order, with its labels)")


def _variant_names(paths):
    names = [os.path.basename(os.path.normpath(p)) if os.path.exists(p) else p for p in paths]
    if len(set(names)) < len(names):
        names = list(paths)
    return names


def _expected_for(args, names) -> dict:
    out, default = {}, None
    for e in args.expected or ():
        name, sep, fmt = e.partition("=")
        if sep:
            if name not in names:
                raise ValueError(f"--expected {e}: no variant named {name!r} (have {', '.join(names)})")
            out[name] = fmt
        else:
            default = e
    from .bands import expected_band

    for fmt in {*out.values(), default} - {None}:
        expected_band(fmt)  # an unknown format is refused before any model is loaded
    return {n: out.get(n, default) for n in names}


def _evaluate_variant(args, q, ref, expected):
    """(report, choice flips or None) of the quantized variant ``q`` (a model id or path, or a GGUF
    file) against the open reference."""
    from .hf._reference import evaluate_against_reference, load_model, load_tokenizer

    from .llamacpp import evaluate_logits_file, is_logits_file

    if is_logits_file(q):  # a llama-perplexity --kl-divergence-base file of the quant: its stored rows
        return evaluate_logits_file(q, ref, progress=not args.no_progress, expected=expected,
                                    confidence=args.confidence, verify=False), None
    if _is_gguf(q):  # through llama-cpp-python, its context the reference's window
        from .llamacpp import choice_flips, expected_format
        from .llamacpp import evaluate_against_reference as evaluate_gguf

        llama = _load_gguf(q, int((ref.header.get("protocol") or {}).get("max_length") or 512))
        try:
            expected = expected or expected_format(llama)  # the file's type: Q8_0, Q4_K_M, ...
            rep = evaluate_gguf(llama, ref, texts=args.texts[0], progress=not args.no_progress, expected=expected,
                                confidence=args.confidence, verify=False)
            return rep, (None if args.choices is None else
                         choice_flips(llama, ref, args.choices, progress=not args.no_progress))
        finally:
            _close(llama)

    try:
        tok = load_tokenizer(q, **_tok_kwargs(args))
    except (OSError, ValueError, TypeError):  # a checkpoint without tokenizer files
        if args.text or args.choices is not None:
            raise
        tok = None
    model = load_model(q, **_load_kwargs(args))
    try:
        rep = evaluate_against_reference(
            model, ref, texts=args.texts[0], tokenizer=tok, batch_size=args.batch_size,
            progress=not args.no_progress, expected=expected, confidence=args.confidence, verify=False)
        if args.choices is None:
            return rep, None
        from .hf._choices import choice_flips

        return rep, choice_flips(model, ref, args.choices, tokenizer=tok, batch_size=args.batch_size,
                                 progress=not args.no_progress)
    finally:
        del model


def _eval(args) -> int:
    from .reffile import read_reference

    _check_options(args)
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.plot is not None:  # refused before any model runs
        if not args.plot.lower().endswith(".png"):
            raise ValueError(f"--plot {args.plot}: only PNG is written (name the file .png)")
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--plot {args.plot}: {folder} is not a writable folder")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'ppldelta[plot]'") from None
    for q in args.quantized:  # a missing local variant is refused before any model runs
        _check_variant(q)
    names = _variant_names(args.quantized)
    expected = _expected_for(args, names)
    files = _token_files(args.save_tokens, names) if args.save_tokens else {}
    ref_path = args.source if _is_reference_file(args.source) else _cached_reference(args)
    ref = read_reference(ref_path)
    ref.verify()  # once, not per variant
    if ref_path == args.source:
        _check_fixed_by_reference(args, ref)
    if args.choices is not None:  # refused before any variant runs
        from .choices import read_items, stored_scores
        from .llamacpp import is_logits_file

        logits_files = [q for q in args.quantized if is_logits_file(q)]
        if logits_files:
            raise ValueError(f"--choices: {logits_files[0]} is a llama.cpp logits file, which cannot score choices")
        if not ref.header.get("choices"):
            raise ValueError(f"--choices: {ref_path} holds no choice scores of the original "
                             "(build it with --choices FILE)")
        stored_scores(ref.header["choices"], read_items(args.choices))
    rows = []
    for name, q in zip(names, args.quantized):
        try:
            rep, flips = _evaluate_variant(args, q, ref, expected[name])
        except (ValueError, OSError) as exc:  # named by its variant (a hub error included), once
            msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            raise ValueError(msg if msg.startswith(q) else f"{q}: {msg}") from None
        per_token = rep.__dict__.pop("per_token", None) or {}  # saved now, not kept per variant
        row = {"name": name, "source": q, "report": rep, "gate": _gate(rep, args),
               "size": _size(q, per_token.get("n_weights"), args.gguf_file), "flips": flips}
        if files:
            row["tokens_file"] = _save_tokens(files[name], per_token)
        rows.append(row)
    rows.sort(key=lambda r: (_kld_key(r["report"]), r["name"]))
    _emit_eval(rows, ref, ref_path, args.format)
    plot_error = None
    if args.plot is not None:
        try:
            _plot_eval(rows, args.plot)
        except OSError as exc:  # the gate below still reports
            plot_error = f"--plot {args.plot}: {exc.strerror or exc}"
    failed = [r for r in rows if r["gate"]]
    if failed:
        print("ppldelta: FAIL: " + "; ".join(f"{r['name']}: {r['gate']}" for r in failed), file=sys.stderr)
    if plot_error:
        raise ValueError(plot_error)
    return 1 if failed else 0


_WEIGHT_FILES = ((".safetensors",), (".bin", ".pt", ".pth"), (".gguf",))  # the first kind a folder has
_WEIGHT_NAMES = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"), (None, None))
_TOKEN_ARRAYS = ("original_log_probs", "quantized_log_probs", "kld", "kld_lo", "kld_hi", "kld_reverse",
                "kld_reverse_lo", "kld_reverse_hi", "delta_p", "same_top1", "top1_in_top5", "top1_in_top10",
                "target_positions", "groups")


def _check_variant(q):
    """A QUANT that names a local path must exist, and must not be a reference file; a hub id
    (NAME or ORG/NAME) is left to the loader."""
    if os.path.exists(q):
        if _is_reference_file(q):
            raise ValueError(f"{q}: is a reference file; pass it as SOURCE (ppldelta eval {q} QUANT ...)")
        return
    hub_id = (q.count("/") <= 1 and not q.startswith((".", "/", "~")) and "\\" not in q
              and not q.lower().endswith((".gguf", ".kld", ".ppldref", ".safetensors", ".bin", ".pt", ".pth")))
    if not hub_id:
        raise ValueError(f"{q}: no such file or directory")


def _size(path, n_weights, gguf_file=None) -> dict:
    """{"bytes", "parameters", "bits_per_weight"} of a variant (None where unknown: a hub id, a
    llama.cpp logits file)."""
    from .llamacpp import is_logits_file

    nbytes = None
    if is_logits_file(path):
        pass
    elif os.path.isfile(path):
        nbytes = os.path.getsize(path)
    elif os.path.isdir(path):
        if gguf_file:
            f = os.path.join(path, gguf_file)
            nbytes = os.path.getsize(f) if os.path.isfile(f) else None
        else:
            nbytes = _weights_bytes(path)
    bpw = 8 * nbytes / n_weights if nbytes and n_weights else None
    return {"bytes": nbytes, "parameters": n_weights, "bits_per_weight": bpw}


def _weights_bytes(folder):
    """The bytes of the weight files transformers loads from ``folder``, by kind (safetensors,
    else .bin / .pt / .pth, else .gguf): the shards its index lists, else its one model file,
    else every file of the kind (a Mistral-style consolidated.safetensors beside
    model.safetensors is not counted)."""
    import json

    found = [e for e in os.scandir(folder) if e.is_file()]
    for (index, single), suffixes in zip(_WEIGHT_NAMES, _WEIGHT_FILES):
        p = os.path.join(folder, index or "")
        if index and os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return sum(os.path.getsize(os.path.join(folder, x)) for x in shards)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
        if single and os.path.isfile(os.path.join(folder, single)):
            return os.path.getsize(os.path.join(folder, single))
        sizes = [e.stat().st_size for e in found if e.name.lower().endswith(suffixes)]
        if sizes:
            return sum(sizes)
    return None


def _token_files(folder, names) -> dict:
    """name -> DIR/NAME.npz (names made file-safe, kept distinct); the folder is made now."""
    os.makedirs(folder, exist_ok=True)
    out, taken = {}, set()
    for name in names:
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "variant"
        base, i = slug, 1
        while slug.lower() in taken:
            i += 1
            slug = f"{base}-{i}"
        taken.add(slug.lower())
        out[name] = os.path.join(folder, slug + ".npz")
    return out


def _save_tokens(path, per_token) -> str:
    import numpy as np

    from .io import atomic_write

    if not all(k in per_token for k in _TOKEN_ARRAYS[:2]):
        raise ValueError(f"{path}: the evaluation handed back no per-token arrays to save")
    with atomic_write(path) as f:
        np.savez(f, **{k: np.asarray(per_token[k], dtype=str if k == "groups" else None)
                       for k in _TOKEN_ARRAYS if per_token.get(k) is not None})
    return path


def _plot_eval(rows, path):
    from .io import atomic_write
    from .plot import quality_vs_size

    ax = quality_vs_size({r["name"]: r["report"] for r in rows}, {r["name"]: r["size"] for r in rows})
    with atomic_write(path) as f:
        ax.figure.savefig(f, format="png", dpi=110)


def _kld_key(rep):
    v = rep.kld.mean if rep.kld is not None else None
    return float("inf") if v is None or v != v else v


def _bounds(rep, key):
    """(lower, upper) of the KLD statistic ``key`` ("mean" or a percentile key), or None."""
    b = getattr(rep, "kld_bounds", None)
    if b is None:
        return None
    v = b.mean if key == "mean" else b.percentiles.get(key)
    return tuple(v) if v is not None else None


def _kld_cell(rep, key, md):
    """The KLD statistic ``key``: text 4 significant digits; otherwise 5 decimals and the bounds."""
    if rep.kld is None:
        return "-"
    v = rep.kld.mean if key == "mean" else rep.kld.percentiles[key]
    if not md:
        return f"{v:#.4g}" if v == v else "-"
    b = _bounds(rep, key)
    return f"{v:.5f}" + (f" [{b[0]:.5f}, {b[1]:.5f}]" if b and None not in b else "")


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e5 else f"{nbytes:,} B"


def _eval_table(rows, md):
    """(header, rows of cells): ``md`` False the compact text columns, else every column."""
    conf = rows[0]["report"].confidence if rows else 0.95
    if md:
        head = ["variant", "PPL", f"PPL ratio [{conf * 100:g} % CI]", "KLD mean [bounds]",
                "KLD p99 [bounds]", "same top-1 %", "RMS Δp %", "expected band", "size", "bits/weight",
                "verdict", "gate"]
    else:
        head = ["variant", "PPL", "Δ PPL %", f"{conf * 100:g} % CI, %", "KLD", "KLD p99", "top-1 %",
                "RMS Δp", "bits/w", "gate"]
    groups = _group_names(rows) if md else []
    head[-2:-2] = [f"{g} Δ %" for g in groups]
    mc = md and any(r.get("flips") for r in rows)
    if mc:
        head[-2:-2] = ["choice acc Δ pts, flips (right→wrong), McNemar p"]
    out = []
    for r in rows:
        rep, size = r["report"], r.get("size") or {}
        ratio, ci = rep.ppl_ratio.value, rep.ppl_ratio.ci
        bpw = size.get("bits_per_weight")
        top1 = "-" if not rep.same_top1 else f"{rep.same_top1.pct:.{2 if md else 1}f}"
        gate = "FAIL" if r["gate"] else "pass"
        if md:
            ex = rep.expected
            band = "-" if not ex else f"{ex.format}: {ex.band[0]:.3f}–{ex.band[1]:.3f}{'+' * ex.open_ended}"
            out.append([r["name"], _num(rep.ppl.quantized.value, 3),
                        f"{ratio:.4f}" + ("" if ci[0] is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"),
                        _kld_cell(rep, "mean", md), _kld_cell(rep, "p99", md), top1, f"{rep.delta_p.rms:.3f}",
                        band, _mb(size.get("bytes")), "-" if bpw is None else f"{bpw:.2f}"]
                       + [_group_cell(rep, g) for g in groups] + ([_flips_cell(r.get("flips"))] if mc else [])
                       + [rep.verdict.headline, gate])
        else:
            out.append([r["name"], _num(rep.ppl.quantized.value, 3), _num((ratio - 1) * 100, sign=True),
                        "-" if ci[0] is None else
                        f"{_num((ci[0] - 1) * 100, sign=True)}…{_num((ci[1] - 1) * 100, sign=True)}",
                        _kld_cell(rep, "mean", md), _kld_cell(rep, "p99", md), top1, f"{rep.delta_p.rms:.2f}",
                        "-" if bpw is None else f"{bpw:.2f}", gate])
    return head, out


def _flips_cell(f):
    if f is None:
        return "-"
    return f"{f.accuracy_delta * 100:+.1f}, {f.flips}/{f.n} ({f.right_to_wrong}), p {f.mcnemar_p:.3g}"


def _group_names(rows):
    """The group names of the variants' reports, in order of first appearance."""
    return list(dict.fromkeys(g for r in rows for g in (r["report"].groups or {})))


def _group_cell(rep, g, ci=True):
    """The group's relative perplexity delta, % [CI], or "-" (a variant without that group)."""
    x = (rep.groups or {}).get(g)
    if x is None:
        return "-"
    lo, hi = x.ppl_ratio.ci
    return _num((x.ppl_ratio.value - 1) * 100, sign=True) + (
        "" if lo is None or not ci else f" [{_num((lo - 1) * 100, sign=True)}, {_num((hi - 1) * 100, sign=True)}]")


def _text_table(head, body, left=(0,)):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:{'<' if i in left or i == len(head) - 1 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*x).rstrip() for x in [head] + body)


def _eval_html(title, line, head, body, doc) -> str:
    """One self-contained HTML document: the reference line, the table, the JSON document."""
    import html

    from .io import to_json

    esc = html.escape
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in x) + "</tr>\n" for x in body)
    data = to_json(doc).replace("<", "\\u003c")  # cannot close the script element
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>body{{font-family:sans-serif;margin:1.5em}}"
            "table{border-collapse:collapse}th,td{border:1px solid #bbb;padding:3px 8px}"
            "td{text-align:right;font-variant-numeric:tabular-nums}td:first-child,td:nth-last-child(-n+2)"
            "{text-align:left}</style>\n</head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n<p>{esc(line)}</p>\n<table>\n<thead><tr>{th}</tr></thead>\n"
            f"<tbody>\n{trs}</tbody>\n</table>\n"
            f"<script type=\"application/json\" id=\"ppldelta-eval\">\n{data}\n</script>\n</body>\n</html>")


def _emit_eval(rows, ref, ref_path, fmt):
    import textwrap

    from .io import to_json
    from .report import md_cell

    h = ref.header
    p = h.get("protocol") or {}
    meta = {"path": os.fspath(ref_path), "model": (h.get("model") or {}).get("name"), "k": ref.k,
            "protocol": {k: p.get(k) for k in ("name", "max_length", "stride", "bos")},
            "tokens_sha256": h.get("tokens_sha256"), "n_scored": int(len(ref.records))}
    doc = {"reference": meta, "variants": [
        {"name": r["name"], "source": r["source"], "gate": {"passed": r["gate"] is None, "reason": r["gate"]},
         "size": r.get("size") or {"bytes": None, "parameters": None, "bits_per_weight": None},
         **({"tokens_file": r["tokens_file"]} if "tokens_file" in r else {}),
         "flips": r["flips"].to_dict() if r.get("flips") else None, "report": r["report"].to_dict()}
        for r in rows]}
    line = (f"reference {meta['path']}" + (f" ({meta['model']})" if meta["model"] else "")
            + f": {meta['n_scored']:,} scored tokens, "
            f"K = {meta['k']}, protocol {p.get('name')} max_length {p.get('max_length')}"
            + (f" stride {p['stride']}" if p.get("stride") is not None else ""))
    if fmt == "json":
        text = to_json(doc)
    elif fmt in ("markdown", "html"):
        head, body = _eval_table(rows, True)
        if fmt == "html":
            text = _eval_html("ppldelta eval", line, head, body, doc)
        else:
            text = "\n".join([line, "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                             + ["| " + " | ".join(md_cell(c) for c in x) + " |" for x in body])
            text += "".join(f"\n\nper-token results of {r['name']}: {r['tokens_file']}" for r in rows
                            if "tokens_file" in r)
    else:
        head, body = _eval_table(rows, False)
        w = max([len(r["name"]) for r in rows] + [0])
        verdicts = [f"  {r['name']:<{w}}  {r['report'].verdict.headline}"
                    + (f" ({r['report'].expected.format})" if r["report"].expected else "") for r in rows]
        files = [f"  {r['name']:<{w}}  {r['tokens_file']}" for r in rows if "tokens_file" in r]
        flips = [textwrap.fill(r["flips"].summary(), 100, initial_indent=f"  {r['name']:<{w}}  ",
                               subsequent_indent=" " * (w + 4)) for r in rows if r.get("flips")]
        n_items = next((r["flips"].n for r in rows if r.get("flips")), 0)
        groups = _group_names(rows)
        per_group = [textwrap.fill(", ".join(f"{g} {_group_cell(r['report'], g, ci=False)}" for g in groups), 100,
                                   initial_indent=f"  {r['name']:<{w}}  ", subsequent_indent=" " * (w + 4))
                     for r in rows]
        text = "\n".join(textwrap.wrap(line, 100, break_long_words=False, break_on_hyphens=False)
                         + ["", _text_table(head, body), "",
                            "KLD: mean and p99 of the top-K estimate, nats (the p99 runs high where the tail is "
                            "flat); bounds,", "ratio CIs, sizes: --format markdown/html/json", "verdict:"] + verdicts
                         + (["Δ PPL % per group (CIs: --format markdown/html/json):"] + per_group if groups else [])
                         + ([f"multiple choice ({n_items} items, acc: the larger log-likelihood), flips vs the "
                             "original:"] + flips if flips else [])
                         + ([f"(the reference holds the original's scores of {h['choices'].get('n_items')} "
                             f"multiple-choice items from {h['choices'].get('source')}: --choices FILE adds flips)"]
                            if h.get("choices") and not flips else [])
                         + (["per-token results (ppldelta compare F:original_log_probs F:quantized_log_probs):"]
                            + files if files else []))
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()


def main(argv=None) -> int:
    """Exit codes: 0 passed, 1 the quality gate failed, 2 bad usage or input (one line, no traceback),
    130 interrupted."""
    from .io import _one_line

    args = _parser().parse_args(argv)
    try:
        run = {"compare": _compare, "demo": _demo, "reference": _reference_build, "eval": _eval}[args.command]
        code = run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `ppldelta demo | head`: exit quietly
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("ppldelta: interrupted (a reference build resumes where it stopped when the same command "
              "runs again)", file=sys.stderr)
        return 130
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
