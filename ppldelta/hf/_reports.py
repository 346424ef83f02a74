"""Reports: corpus perplexity of one model (evaluate_perplexity), the paired comparison of two
(compare_models) and the table over several variants (quantization_report).  They run models
through ``_run`` and leave every statistic to ``ppldelta.analysis.analyze`` (per-token arrays in,
report out)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import analysis
from ..bands import expected_band
from .. import protocols as _protocols
from .._core import perplexity
from . import _dist, _kl_torch
from ._load import is_model, load_model, load_texts, load_tokenizer, model_name, tokenize, versions
from ._run import Protocol, as_ids, make_protocol, resolve, score


@dataclass
class PerplexityResult:
    """Corpus perplexity (exp of the mean NLL over ``n_tokens`` scored tokens), how it was
    produced, and the per-token log-probs (float64) behind it."""

    perplexity: float
    n_tokens: int
    protocol: Protocol
    log_probs: np.ndarray = field(repr=False)

    def __str__(self):
        p = self.protocol
        extra = f", stride {p.stride}" if p.stride is not None else ""
        return (f"PPL = {self.perplexity:.4f} over {self.n_tokens:,} tokens "
                f"({p.name}, max_length {p.max_length}{extra})")


def evaluate_perplexity(model_name_or_path, quant_path=None, *, texts=None, tokenizer=None,
                        max_length=None, stride=None, protocol="sliding", join=None, device=None,
                        torch_dtype=None, progress=True, batch_size=1, add_special_tokens=None,
                        bos_token_id=None) -> PerplexityResult:
    """The usual ``evaluate_perplexity(model, quant_path)`` helper done right.

    ``model_name_or_path``: a hub name / local path, or an already-loaded model; ``quant_path``:
    load the model from there instead (the tokenizer still comes from ``model_name_or_path``).
    Models are loaded with ``AutoModelForCausalLM.from_pretrained(..., dtype=torch_dtype,
    device_map="auto" if CUDA else None)`` (float16 on GPU, float32 on CPU by default).
    ``texts``: a list of strings (joined with ``join``, default the protocol's ``"\\n\\n"``,
    WikiText-style), a path to a text file (used verbatim), a ``datasets`` split with a "text"
    column, or None for WikiText-2 raw test (needs ``datasets``).  A string with a line break or
    longer than 4096 characters is the text itself (used verbatim), not a path.  The joined text
    is tokenized once; ``add_special_tokens`` defaults to what the protocol's tool does (False
    for sliding; True for hf, gptq, llama.cpp, whose tools call the tokenizer with its defaults).
    The tokenizer's name and a SHA-256 of the token ids go into ``result.protocol.notes``: a
    different tokenizer version gives different ids, hence different numbers, and the hash tells
    the runs apart.  ``max_length`` / ``stride`` default to the protocol's (sliding: 1024 / 512;
    llama.cpp: n_ctx 512; gptq: seqlen 2048; the chunked protocols take no stride).
    ``bos_token_id`` (llama.cpp): by default BOS is written over each chunk's first token only
    if the tokenizer adds one, as llama.cpp does (see :func:`score`).
    """
    spec = _protocols.get(protocol)
    model = model_name_or_path
    if quant_path is not None or not is_model(model):
        model = load_model(quant_path or model_name_or_path, torch_dtype)
    tok = load_tokenizer(tokenizer, model_name_or_path)
    special = spec.add_special_tokens if add_special_tokens is None else bool(add_special_tokens)
    ids, _, tnotes = tokenize(texts, tok, spec.join if join is None else join, special)
    lp, proto = score(model, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                      protocol=spec.name, bos_token_id=bos_token_id, progress=progress, device=device,
                      tokenizer=tok)
    proto.notes.update(tnotes)
    proto.notes["model"] = str(quant_path if quant_path is not None else model_name(model))
    proto.notes["dtype"] = str(getattr(model, "dtype", None))
    proto.notes.update(versions())
    if not spec.per_token:
        return PerplexityResult(float(math.exp(-float(np.mean(lp)))), proto.n_scored, proto, lp)
    return PerplexityResult(float(perplexity(lp)), int(lp.size), proto, lp)


def compare_models(original, quantized, input_ids, *, groups=None, max_length=None, stride=None,
                   protocol="sliding", batch_size=1, progress=True, bos_token_id=None, device=None,
                   tokenizer=None, **analyze_kwargs):
    """Run ``original`` and ``quantized`` in lock step over the same windows of ``input_ids`` and
    analyse them with :func:`ppldelta.analyze` (KL divergence, top-token agreement, perplexity
    delta with a block-bootstrap interval, per-group results).

    For every scored token: both log-probs (the same computation as :func:`score`, bit for bit),
    KL(P_orig || P_quant), same_top1, top1_in_top5/10, computed from each window's logits right
    away (C kernels on the CPU, torch on an accelerator) in row chunks; no (tokens x vocab) array
    is ever kept.  ``groups``: one label per input token (the label of the predicted token is
    used), or None.  ``max_length`` / ``stride`` / ``protocol`` / ``bos_token_id`` /
    ``tokenizer`` as for :func:`score` (not ``"window-mean"``).
    """
    spec = _protocols.get(protocol)
    if not spec.per_token:
        raise ValueError(f"{spec.name} does not produce per-token values; use "
                         f"{', '.join(p for p in _protocols.PROTOCOLS if _protocols.SPECS[p].per_token)}")
    ids = as_ids(input_ids)
    n = int(ids.numel())
    spec, L, S, bos, bos_from = resolve(spec.name, max_length, stride, bos_token_id, original, tokenizer)
    windows = _protocols.plan(spec, n, L, S, bos)
    offs = _protocols.offsets(windows)
    m = int(offs[-1])
    cols = {"original_log_probs": np.empty(m), "quantized_log_probs": np.empty(m), "kld": np.empty(m),
            "same_top1": np.empty(m, bool), "top1_in_top5": np.empty(m, bool),
            "top1_in_top10": np.empty(m, bool)}

    def on_rows(k, r0, r1, chunks, targets):
        lo, lq = chunks
        if lo.shape[-1] != lq.shape[-1]:
            raise ValueError(f"vocabulary sizes differ: {lo.shape[-1]} vs {lq.shape[-1]}")
        st = _kl_torch.kl_stats(lo, lq)
        st["original_log_probs"] = _kl_torch.log_probs_rows(lo, targets)
        st["quantized_log_probs"] = _kl_torch.log_probs_rows(lq, targets)
        o = offs[k] + (r0 - windows[k].a)
        for key, arr in cols.items():
            arr[o:o + (r1 - r0)] = np.asarray(st[key])

    _dist.run_windows([original, quantized], ids, windows, batch_size=batch_size, device=device,
                      progress=progress, desc=f"compare ({spec.name})", on_rows=on_rows,
                      columns=list(cols.values()), offs=offs)
    proto = make_protocol(spec, windows, L, S, n, ids.numpy(), bos, bos_from, batch_size,
                          original=model_name(original), quantized=model_name(quantized))
    g = None
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.size != n:
            raise ValueError(f"groups has {g.size} labels for {n} input tokens (one per token)")
        g = g[_protocols.target_positions(windows)]
    return analysis.analyze(cols["original_log_probs"], cols["quantized_log_probs"], groups=g,
                            kld=cols["kld"], same_top1=cols["same_top1"],
                            top1_in_top5=cols["top1_in_top5"], top1_in_top10=cols["top1_in_top10"],
                            protocol=asdict(proto), **analyze_kwargs)


@dataclass
class QuantizationReport:
    """The quantization table (typical ranges per format) with measured ratios: one row per
    model, the original first."""

    rows: list
    protocol: Protocol
    groups: list | None = None

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            for r in self.rows:
                if r["name"] == key:
                    return r
            raise KeyError(key)
        return self.rows[key]

    def to_markdown(self) -> str:
        head = ["Variant", "Perplexity", "Relative delta", "PPL(Q)/PPL(orig)", "95 % CI",
                "Expected band", "Verdict"]
        if self.groups:
            head += [f"{g} delta" for g in self.groups]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            ci = r.get("ratio_ci") or [None, None]
            band = r.get("expected_band")
            cells = [r["name"], f"{r['perplexity']:.4f}",
                     "baseline" if r["baseline"] else f"{r['relative_delta_pct']:+.2f} %",
                     f"{r['ratio']:.4f}",
                     f"{ci[0]:.4f}-{ci[1]:.4f}" if ci[0] is not None else "",
                     (f"{r['expected']}: {band[0]:.4f}-{band[1]:.4f}{'+' if band[2] else ''}" if band else ""),  # as the ratio
                     r.get("verdict") or ""]
            if self.groups:
                gd = r.get("group_deltas_pct") or {}
                cells += [("" if r["baseline"] else f"{gd[g]:+.2f} %") if g in gd else "" for g in self.groups]
            lines.append("| " + " | ".join(cells) + " |")
        p = self.protocol
        lines.append("")
        lines.append(f"Protocol: {p.name}, max_length {p.max_length}, stride {p.stride}, "
                     f"{p.n_scored:,} scored tokens, tokens sha256 {p.notes.get('tokens_sha256', '')[:12]}.")
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()


def _variant_row(name, fmt, lp_q, rep):
    """One table row, read from the analyze report of the variant."""
    ref, e = rep.reference, rep.expected
    return {
        "name": name, "baseline": False, "perplexity": float(perplexity(lp_q)),
        "relative_delta_pct": ref["relative_delta_pct"], "absolute_delta": ref["absolute_delta"],
        "quality": ref["quality"], "ratio": float(rep.ppl_ratio.value),
        "ratio_ci": list(rep.ppl_ratio.ci), "expected": fmt,
        "expected_band": (e.band[0], e.band[1], e.open_ended) if e else None,
        "verdict": e.verdict if e else None,
        "group_deltas_pct": ({g: gd.reference["relative_delta_pct"] for g, gd in rep.groups.items()}
                             if rep.groups else None),
        "report": rep,
    }


def quantization_report(model, variants, texts, *, tokenizer=None, groups=None, max_length=1024,
                        stride=512, expected=None, progress=True, join="\n\n", batch_size=1,
                        device=None, torch_dtype=None, n_bootstrap=None) -> QuantizationReport:
    """Evaluate ``model`` and every ``variants[name]`` (a model or a path, loaded one at a time)
    on the same tokens (sliding protocol) and return the quantization table with measured ratios.

    ``texts``: as for :func:`evaluate_perplexity`.  ``groups``: one label per text (e.g. its
    domain) for per-group relative deltas.  ``expected``: {variant name: format} (e.g.
    ``"gptq-4"``) or one format for all, checked against ``ppldelta.expected_band`` (typical
    ranges per format).  Each row: name, perplexity, relative_delta_pct / absolute_delta /
    quality (as ``ppldelta.perplexity_delta``), ratio PPL(Q)/PPL(orig) with a block-bootstrap CI,
    the band and verdict, group_deltas_pct, and the full ``report`` (ppldelta.analyze).
    """
    # the formats first: a misspelt one failed after the original and a variant had run, and a
    # name that is not a variant's was ignored (no band, no verdict, no word)
    if isinstance(expected, dict):
        unknown = sorted(set(expected) - set(variants))
        if unknown:
            raise ValueError(f"expected names {unknown}, which are not variants ({sorted(variants)})")
    for fmt in (expected.values() if isinstance(expected, dict) else [] if expected is None else [expected]):
        expected_band(fmt)  # ValueError naming the known formats
    base = model if is_model(model) else load_model(model, torch_dtype)
    tok = load_tokenizer(tokenizer, model)
    texts_list, _, joinable = load_texts(texts)
    if groups is not None:
        groups = list(groups)
        if not joinable:
            raise ValueError("groups needs texts as a list (one label per text), not a file or a string")
        if len(groups) != len(texts_list):
            raise ValueError(f"groups has {len(groups)} labels for {len(texts_list)} texts")
    ids, text_idx, tnotes = tokenize(texts if groups is None else texts_list, tok, join, False,
                                     with_labels=groups is not None)
    lp_o, proto = score(base, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                        protocol="sliding", progress=progress, device=device)
    proto.notes.update(tnotes)
    proto.notes.update(versions())
    tok_groups = gnames = None
    if groups is not None:
        windows = _protocols.plan("sliding", len(ids), proto.max_length, proto.stride)
        lab = np.asarray([str(g) for g in groups], dtype=object)
        tok_groups = lab[text_idx[_protocols.target_positions(windows)]]
        gnames = list(dict.fromkeys(str(g) for g in groups))
    rows = [{"name": "original", "baseline": True, "perplexity": float(perplexity(lp_o)),
             "relative_delta_pct": 0.0, "absolute_delta": 0.0, "quality": None, "ratio": 1.0,
             "ratio_ci": [None, None], "expected": None, "expected_band": None, "verdict": None,
             "group_deltas_pct": None, "report": None}]
    for name, variant in variants.items():
        loaded = not is_model(variant)
        qm = load_model(variant, torch_dtype) if loaded else variant
        try:
            lp_q, _ = score(qm, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                            protocol="sliding", progress=progress, device=device)
        finally:
            if loaded:
                del qm
        fmt = expected.get(name) if isinstance(expected, dict) else expected
        rep = analysis.analyze(lp_o, lp_q, groups=tok_groups, expected=fmt, protocol=asdict(proto),
                               n_bootstrap=n_bootstrap)
        rows.append(_variant_row(name, fmt, lp_q, rep))
    return QuantizationReport(rows, proto, gnames)
