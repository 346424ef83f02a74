"""Per-token statistics from logits, computed by the C row kernels (csrc/logits_*.c) in one
pass over each row: no (tokens x vocab) temporary, any vocabulary size, float32/float64/float16
and bfloat16 (torch tensors, or raw uint16 arrays with ``bf16=True``)."""
from __future__ import annotations

import os

import numpy as np

from . import _adapt, _core


def _threads(threads):
    if threads is None:
        return 1
    if threads == 0 or threads == -1:
        return os.cpu_count() or 1
    if threads < 0:
        raise ValueError("threads must be >= 1, or 0/-1 for all CPUs")
    return int(threads)


def token_log_probs(logits, targets, *, ignore_index=-100, bf16=False, threads=1):
    """log_softmax(logits)[..., target] as float64, shape ``targets.shape``.

    Equivalent to ``torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])`` to
    about 1e-6 for float32 logits (float64 logits are computed in float64).  Positions whose
    target equals ``ignore_index`` are not scored: they come back as NaN, so that they can never
    be averaged in silently (``ppldelta.perplexity`` would name them).  Drop them with
    ``lp[targets != ignore_index]``.  ``threads``: rows are split across threads (0 = all CPUs).
    """
    a, lead, bf16 = _adapt.as_rows(logits, "logits", bf16)
    t = _adapt.as_targets(targets, lead, a.shape[1], ignore_index)
    lp = _core.logits_stats(a, None, t, ignore_index=ignore_index, bf16=bf16,
                            threads=_threads(threads)).lp_a
    return lp.reshape(lead)


def kl_divergence(original_logits, quantized_logits, *, targets=None, ignore_index=-100,
                  reverse=False, topk=True, bf16=False, threads=1):
    """Per-token KL(P_original || P_quantized) in nats, from the two models' logits
    (shape (..., vocab)), in one pass over both rows.  Returns a dict of arrays of the leading
    shape:

    - ``kld``: KL(P||Q) (clamped at 0: tiny negatives are rounding), ``kld_reverse`` (with
      ``reverse=True``): KL(Q||P);
    - ``same_top1``: the two argmax tokens agree (llama.cpp's "same top p");
    - ``top1_in_top5`` / ``top1_in_top10`` (``topk=True``): the original's argmax is among the
      quantized model's 5 / 10 most likely tokens, and ``quantized_top1_in_original_top5`` /
      ``..._top10`` the other way round;
    - with ``targets``: ``original_log_probs``, ``quantized_log_probs`` (NaN where ignored),
      ``p_original``, ``p_quantized``, ``delta_p`` = p_quantized - p_original, and ``scored``:
      targets != ignore_index (``kld[scored]`` drops the ignored positions).
    """
    a, lead, bf16a = _adapt.as_rows(original_logits, "original_logits", bf16)
    b, lead_b, bf16b = _adapt.as_rows(quantized_logits, "quantized_logits", bf16)
    if lead != lead_b or a.shape[1] != b.shape[1]:
        raise ValueError(f"shape mismatch: original_logits {lead + (a.shape[1],)}, "
                         f"quantized_logits {lead_b + (b.shape[1],)}")
    if bf16a != bf16b or a.dtype != b.dtype:
        dt = np.result_type(np.float32, a.dtype if not bf16a else np.float32, b.dtype if not bf16b else np.float32)
        a = _widen(a, bf16a, dt)
        b = _widen(b, bf16b, dt)
        bf16a = bf16b = False
    t = _adapt.as_targets(targets, lead, a.shape[1], ignore_index) if targets is not None else None
    r = _core.logits_stats(a, b, t, ignore_index=ignore_index, bf16=bf16a, topk=topk,
                           threads=_threads(threads))
    lp_a, lp_b, kld, kld_rev, same, rank, rank_a = (r.lp_a, r.lp_b, r.kld, r.kld_rev, r.same_top1,
                                                    r.rank_b, r.rank_a)
    out = {"kld": kld.reshape(lead), "same_top1": same.reshape(lead)}
    if reverse:
        out["kld_reverse"] = kld_rev.reshape(lead)
    if topk:
        out["top1_in_top5"] = (rank < 5).reshape(lead)
        out["top1_in_top10"] = (rank < 10).reshape(lead)
        out["quantized_top1_in_original_top5"] = (rank_a < 5).reshape(lead)
        out["quantized_top1_in_original_top10"] = (rank_a < 10).reshape(lead)
    if t is not None:
        out["original_log_probs"] = lp_a.reshape(lead)
        out["quantized_log_probs"] = lp_b.reshape(lead)
        with np.errstate(invalid="ignore"):
            out["p_original"] = np.exp(out["original_log_probs"])
            out["p_quantized"] = np.exp(out["quantized_log_probs"])
        out["delta_p"] = out["p_quantized"] - out["p_original"]
        out["scored"] = (t != ignore_index).reshape(lead)
    return out


def _widen(x, is_bf16, dt):
    if is_bf16:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(dt)
    return x.astype(dt)
