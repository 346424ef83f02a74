"""ppldelta.analyze: the reference dict plus what perplexity alone hides, for paired per-token
log-probs in memory (ppldelta.Accumulator: the same for streams).

The flow: ``paired.read`` (the inputs, checked once) -> ``paired.moments`` (one C pass over both
log-prob inputs: exact sums, squares and products, Δp sums, exact per-group sums, bootstrap
block sums) -> ``report.Moments``, with the per-token values that percentiles need (Δp, KLD)
and the per-group bootstrap blocks -> ``report.build``.  The statistics and the report's schema
are documented in ppldelta.report.
"""
from __future__ import annotations

import math

import numpy as np

from . import paired
from .report import PCTS_DP, PCTS_KLD, DistMoments, GroupMoments, Moments, Report, Sample  # noqa: F401
from .report import block_lengths, block_sums, build, check_confidence


def _default_block(n):
    return int(min(512, max(1, round(math.sqrt(n)))))


def analyze(original_log_probs, quantized_log_probs, *, groups=None, original_logits=None,
            quantized_logits=None, targets=None, ignore_index=-100, kld=None, kld_reverse=None,
            same_top1=None, top1_in_top5=None, top1_in_top10=None, reverse_kld=False,
            confidence=0.95, n_bootstrap=None, block_size=None, seed=0, expected=None,
            protocol=None, kld_bounds=None, kld_reverse_bounds=None, kld_definition=None) -> Report:
    """Analyse paired per-token log-probs of an original and a quantized model.

    Per-token KL divergence and top-token agreement come either precomputed (``kld``,
    ``same_top1``, ``top1_in_top5``, ``top1_in_top10``: one value per token) or from the two
    models' logits (``original_logits``, ``quantized_logits``, shape (tokens, vocab), with
    ``targets``; then the log-probs may be None and are taken from the logits).  Positions whose
    target is ``ignore_index`` are dropped from every per-token input given per position (and
    counted in ``n_ignored``); ``groups`` dict selections then index positions.
    ``groups``: one label per token (compared as ``str(label)``), or
    {name: slice | (start, stop) | indices}.
    ``expected``: a format name for the expected band (see ppldelta.expected_band).
    ``block_size``: bootstrap block length in tokens (default sqrt(n), at most 512).
    ``kld_bounds`` / ``kld_reverse_bounds``: (lower, upper) per-token bounds of ``kld`` /
    ``kld_reverse`` when those are estimates (ppldelta.refstats.compare): the report gains
    bounds on the mean and each percentile; ``kld_definition`` names what ``kld`` measures
    (default 'full vocabulary', or 'reference top-K estimate' with bounds).
    """
    check_confidence(confidence, n_bootstrap)
    p = paired.read(original_log_probs, quantized_log_probs, groups=groups,
                    per_token=dict(zip(paired.PER_TOKEN, (kld, kld_reverse, same_top1, top1_in_top5,
                                                          top1_in_top10)),
                               **paired.bounds(kld, kld_bounds, kld_reverse, kld_reverse_bounds)),
                    original_logits=original_logits, quantized_logits=quantized_logits, targets=targets,
                    ignore_index=ignore_index, reverse=reverse_kld)
    n, x = p.n, p.extras
    bs = block_size or _default_block(n)
    m = paired.moments(p.lp, p.codes, len(p.names or ()), bs)
    with np.errstate(all="ignore"):  # -inf log-probs: inf and NaN where the report expects them
        dp = np.exp(p.lq) - np.exp(p.lo)
        dists = {k: DistMoments(float(np.sum(x[k])), float(np.sum(x[k] * x[k])), Sample(x[k]))
                 for k in ("kld", "kld_reverse") + paired.BOUNDS if k in x}
        d = p.lo - p.lq if p.names else None  # nll_q - nll_o, for the groups' bootstrap blocks
    groups_m = None
    if p.names:
        groups_m = []
        for g, name in enumerate(p.names):
            cnt = int(m.group_n[g])
            if cnt == 0:  # a dict group whose positions were all ignored
                continue
            sel = p.codes == g
            groups_m.append(GroupMoments(
                name, cnt, float(m.group_sum_o[g]), float(m.group_sum_q[g]),
                block_sums(d[sel], min(bs, max(1, cnt // 2))), g,
                float(np.sum(x["kld"][sel])) if "kld" in x else None,
                int(np.count_nonzero(x["same_top1"][sel])) if "same_top1" in x else None))
    return build(Moments(
        n, m.sum_o, m.sum_q, m.sum_oo, m.sum_qq, m.sum_oq, m.sum_dp, m.sum_dp2, m.sum_dp4, Sample(dp),
        (m.block_d, block_lengths(n, bs)), bs, dists.get("kld"), dists.get("kld_reverse"),
        {k: int(np.count_nonzero(v)) for k, v in x.items() if not k.startswith("kld")}, groups_m,
        p.n_ignored, *(((dists[k + "_lo"], dists[k + "_hi"]) if k + "_lo" in dists else None)
                       for k in ("kld", "kld_reverse")), kld_definition), confidence=confidence, n_bootstrap=n_bootstrap, seed=seed, expected=expected,
        protocol=protocol)
