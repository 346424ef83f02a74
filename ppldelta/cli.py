"""Command line: ``ppldelta compare`` (with a CI quality gate), ``ppldelta demo``, and for models
``ppldelta reference build`` (score the original once into a reference file) and ``ppldelta eval``
(many quantized variants against one reference: one table, sorted by KLD, gates per variant).

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
    _model_parsers(sub)
    return p


_EVAL_EPILOG = """\
SOURCE is a reference file (ppldelta reference build), a llama.cpp --kl-divergence-base logits
  file (converted to a reference first), or the original model (a Hugging Face id or a local
  path; needs --text): its reference is built first and cached (--reference PATH, else
  --cache-dir, $PPLDELTA_CACHE_DIR, or ~/.cache/ppldelta, keyed by model, text, protocol and K).
QUANT: Hugging Face ids or local paths (quantization configs are read from them); the loading
  arguments apply to every model. The tokens are the reference's own; --text is checked
  against them (a different tokenizer or text is refused).
The table has one row per variant, sorted by the KLD estimate; KLD columns give the estimate
  and, in brackets, the certified lower and upper bounds.
exit codes: 0 passed, 1 a variant failed a gate, 2 bad usage or input (one line on stderr)."""


def _load_args(p):
    g = p.add_argument_group("loading (passed to from_pretrained)")
    g.add_argument("--torch-dtype", default="auto",
                   help="auto (default: keep the checkpoint's dtype), float32, bfloat16, float16")
    g.add_argument("--device-map", help="e.g. auto, cuda:0 (default: --device, else the CPU)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit)")
    g.add_argument("--gguf-file", help="a GGUF file inside the model's repository or folder")
    g.add_argument("--trust-remote-code", action="store_true")


def _build_args(p, text_required):
    p.add_argument("--text", metavar="FILE", required=text_required,
                   help="the evaluation text (a UTF-8 file, used verbatim)")
    p.add_argument("--protocol", default="sliding", help="sliding (default), hf, llama.cpp, gptq")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="top-K log-probs kept per token (default 32)")
    p.add_argument("--max-length", type=int, help="window / n_ctx / seqlen (default: the protocol's)")
    p.add_argument("--stride", type=int, help="sliding and hf only (default max_length // 2)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--device", help="where the model runs (default: the CPU, or --device-map)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_parsers(sub):
    r = sub.add_parser("reference", help="reference files: the original model scored once")
    rsub = r.add_subparsers(dest="reference_command", required=True)
    b = rsub.add_parser("build", help="score MODEL over --text and write its reference file",
                        description="MODEL: a Hugging Face id or local path, or a llama.cpp "
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
    e.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    e.add_argument("--expected", action="append", metavar="FMT|NAME=FMT",
                   help="quantization format for the expected band, for all variants or one (repeatable)")
    e.add_argument("--confidence", type=float, default=0.95)
    e.add_argument("--fail-on", choices=QUALITIES[1:], metavar="QUALITY",
                   help="exit 1 when a variant's quality is this or worse (good, acceptable, poor)")
    e.add_argument("--max-relative-delta", type=float, metavar="PCT",
                   help="exit 1 when a variant's relative perplexity delta exceeds PCT percent")
    _load_args(e)


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
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.text is not None and not os.path.isfile(args.text):
        raise ValueError(f"--text {args.text}: not a file")


def _is_reference_file(path) -> bool:
    from .reffile import MAGIC

    try:
        with open(path, "rb") as f:
            return os.path.isfile(path) and f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _build(args, source, out, overwrite=False):
    """Write the reference of ``source`` (a model or a llama.cpp logits file) to ``out``."""
    from .llamacpp import convert_logits_file, is_logits_file

    if is_logits_file(source):
        kw = {} if args.top_k is None else {"k": args.top_k}
        return convert_logits_file(source, out, resume=not overwrite, **kw)
    if _is_reference_file(source):
        raise ValueError(f"{source} is a reference file already (ppldelta eval reads it as it is)")
    if source.endswith((".ppldref", ".kld")) and not os.path.exists(source):
        raise ValueError(f"{source}: no such file")
    if args.text is None:
        raise ValueError(f"building the reference of {source} needs --text FILE")
    from .hf._reference import build_reference, load_model, load_tokenizer

    model = load_model(source, **_load_kwargs(args))
    tok = load_tokenizer(source, **_tok_kwargs(args))
    return build_reference(model, texts=args.text, out=out, tokenizer=tok, protocol=args.protocol,
                           max_length=args.max_length, stride=args.stride, k=args.top_k,
                           batch_size=args.batch_size, progress=not args.no_progress, resume=not overwrite)


def _reference_build(args) -> int:
    from .reffile import read_reference

    _check_options(args)
    try:
        out = _build(args, args.model, args.output, overwrite=args.overwrite)
    except ValueError as exc:
        if "holds a different reference" in str(exc):
            raise ValueError(f"{args.output} exists and holds a different reference: "
                             "--overwrite replaces it") from None
        raise
    ref = read_reference(out)
    n = len(ref.records)
    size = os.path.getsize(out)
    p = ref.header.get("protocol") or {}
    print(f"{out}: {n:,} scored tokens, K = {ref.k}, {size:,} bytes ({size / max(n, 1):.0f} B/token); "
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

    src = args.source
    if args.reference:
        out = args.reference
    else:
        local = os.path.exists(src)
        text_sha = None
        if args.text is not None:
            with open(args.text, "rb") as f:
                text_sha = hashlib.sha256(f.read()).hexdigest()
        key = {"source": os.path.abspath(src) if local else src,
               "fingerprint": _fingerprint(src) if local else None, "text": text_sha,
               "protocol": args.protocol, "max_length": args.max_length, "stride": args.stride,
               "k": args.top_k, "logits_file": is_logits_file(src),
               "load": {k: v for k, v in _load_kwargs(args).items() if k != "device_map"}}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        base = os.path.basename(os.path.normpath(src))
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
        out = os.path.join(_cache_dir(args), f"{slug[:60]}-{digest}.ppldref")
    try:
        return _build(args, src, out)
    except ValueError as exc:
        if "holds a different reference" not in str(exc) or args.reference:
            raise
        return _build(args, src, out, overwrite=True)  # a stale cache entry


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
    """The report of the quantized variant ``q`` (a model id or path) against the open reference."""
    from .hf._reference import evaluate_against_reference, load_model, load_tokenizer

    try:
        tok = load_tokenizer(q, **_tok_kwargs(args))
    except (OSError, ValueError, TypeError):  # a checkpoint without tokenizer files
        if args.text is not None:
            raise
        tok = None
    model = load_model(q, **_load_kwargs(args))
    try:
        return evaluate_against_reference(
            model, ref, texts=args.text, tokenizer=tok, batch_size=args.batch_size,
            progress=not args.no_progress, expected=expected, confidence=args.confidence, verify=False)
    finally:
        del model


def _eval(args) -> int:
    from .reffile import read_reference

    _check_options(args)
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    names = _variant_names(args.quantized)
    expected = _expected_for(args, names)
    ref_path = args.source if _is_reference_file(args.source) else _cached_reference(args)
    ref = read_reference(ref_path)
    ref.verify()  # once, not per variant
    rows = []
    for name, q in zip(names, args.quantized):
        try:
            rep = _evaluate_variant(args, q, ref, expected[name])
        except ValueError as exc:
            raise ValueError(f"{q}: {exc}") from None
        rows.append({"name": name, "source": q, "report": rep, "gate": _gate(rep.reference, args)})
    rows.sort(key=lambda r: (_kld_key(r["report"]), r["name"]))
    _emit_eval(rows, ref, ref_path, args.format)
    failed = [r for r in rows if r["gate"]]
    if failed:
        print("ppldelta: FAIL: " + "; ".join(f"{r['name']}: {r['gate']}" for r in failed), file=sys.stderr)
        return 1
    return 0


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
    if rep.kld is None:
        return "-"
    v = rep.kld.mean if key == "mean" else rep.kld.percentiles[key]
    b = _bounds(rep, key)
    return f"{v:.5f}" + (f" [{b[0]:.5f}, {b[1]:.5f}]" if b and None not in b else "")


def _eval_table(rows, md):
    head = ["variant", "PPL", "PPL ratio [CI]", "KLD mean [bounds]", "KLD p99 [bounds]", "same top-1 %",
            "RMS Δp %", "verdict", "gate"]
    out = []
    for r in rows:
        rep = r["report"]
        ratio, ci = rep.ppl_ratio.value, rep.ppl_ratio.ci
        out.append([r["name"], _num(rep.ppl.quantized.value, 3),
                    f"{ratio:.4f}" + ("" if ci[0] is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"),
                    _kld_cell(rep, "mean", md), _kld_cell(rep, "p99", md),
                    f"{rep.same_top1.pct:.2f}" if rep.same_top1 else "-",
                    f"{rep.delta_p.rms:.3f}", rep.verdict.headline, "FAIL" if r["gate"] else "pass"])
    if md:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                         + ["| " + " | ".join(x) + " |" for x in out])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *out)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 7, 8) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*x).rstrip() for x in [head] + out)


def _emit_eval(rows, ref, ref_path, fmt):
    from .io import to_json

    h = ref.header
    p = h.get("protocol") or {}
    meta = {"path": os.fspath(ref_path), "model": (h.get("model") or {}).get("name"), "k": ref.k,
            "protocol": {k: p.get(k) for k in ("name", "max_length", "stride", "bos")},
            "tokens_sha256": h.get("tokens_sha256"), "n_scored": int(len(ref.records))}
    if fmt == "json":
        text = to_json({"reference": meta, "variants": [
            {"name": r["name"], "source": r["source"],
             "gate": {"passed": r["gate"] is None, "reason": r["gate"]}, "report": r["report"].to_dict()}
            for r in rows]})
    else:
        md = fmt == "markdown"
        line = (f"reference {meta['path']} ({meta['model']}): {meta['n_scored']:,} scored tokens, "
                f"K = {meta['k']}, protocol {p.get('name')} max_length {p.get('max_length')}"
                + (f" stride {p['stride']}" if p.get("stride") is not None else ""))
        text = (f"{line}\n\n" if not md else f"{line}\n\n") + _eval_table(rows, md)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()


def main(argv=None) -> int:
    """Exit codes: 0 passed, 1 the quality gate failed, 2 bad usage or input (one line, no traceback)."""
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
