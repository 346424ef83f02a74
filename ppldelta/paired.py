"""The paired per-token inputs of ``analyze`` and ``Accumulator.update``, read and checked once,
and their moments in one C pass.

``read`` takes the arguments as the user gave them: log-probs of both models (or the two models'
logits at the targets, through ppldelta.logits), the optional per-token arrays (``PER_TOKEN``),
group labels; positions whose target is ``ignore_index`` are dropped from all of them and
counted.  ``moments`` is the one call into ``_core.paired_moments``: it validates both log-prob
inputs (the messages of perplexity_delta) and returns, in one pass over both, the count, the
exactly rounded sums, the sums of squares and products, the Δp sums, the -inf counts, the exact
per-group sums and the bootstrap block sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _adapt, _core

PER_TOKEN = ("kld", "kld_reverse", "same_top1", "top1_in_top5", "top1_in_top10")
# the other direction of the top-k agreement, reported when the statistics come from logits
CROSS = {"q_top1_in_base_top5": "quantized_top1_in_original_top5",
         "q_top1_in_base_top10": "quantized_top1_in_original_top10"}
# per-token (lower, upper) bounds of an estimated KLD (ppldelta.refstats), by the estimate's name
BOUNDS = ("kld_lo", "kld_hi", "kld_reverse_lo", "kld_reverse_hi")


def bounds(kld, kld_bounds, kld_reverse, kld_reverse_bounds) -> dict:
    """The per-token arrays of ``kld_bounds=(lo, hi)`` / ``kld_reverse_bounds`` by BOUNDS name
    (each needs its estimate)."""
    out = {}
    for name, est, pair in (("kld", kld, kld_bounds), ("kld_reverse", kld_reverse, kld_reverse_bounds)):
        if pair is None:
            continue
        if est is None:
            raise ValueError(f"{name}_bounds needs {name} (the estimate the bounds belong to)")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"{name}_bounds must be a pair (lower, upper) of per-token arrays")
        out[name + "_lo"], out[name + "_hi"] = pair
    return out


@dataclass
class Paired:
    """One call's inputs: ``lp`` the two log-prob inputs as the C pass reads them (lists stay
    lists), ``lo``/``lq`` their flat float64 values, ``extras`` the checked per-token arrays by
    name (PER_TOKEN, then CROSS), ``names``/``codes`` the groups (None without), ``n_ignored``
    the positions dropped for ignore_index."""

    lp: tuple
    lo: np.ndarray
    lq: np.ndarray
    extras: dict
    names: list | None
    codes: np.ndarray | None
    n_ignored: int

    @property
    def n(self) -> int:
        return int(self.lo.size)


def read(original_log_probs, quantized_log_probs, *, groups=None, per_token=None,
         original_logits=None, quantized_logits=None, targets=None, ignore_index=-100,
         reverse=False) -> Paired:
    """Read and check the inputs of analyze / Accumulator.update (see ppldelta.analyze).  The
    log-probs are validated by the C pass first, so their errors read as perplexity_delta's."""
    keep, per_token = None, dict(per_token or {})
    if original_logits is not None or quantized_logits is not None:
        if original_logits is None or quantized_logits is None:
            raise ValueError("pass both original_logits and quantized_logits")
        from .logits import kl_divergence

        if any(per_token.get(k) is not None for k in BOUNDS):
            raise ValueError("KLD bounds belong to KLD estimates, not to logits (full vocabulary)")
        kl = kl_divergence(original_logits, quantized_logits, targets=targets,
                           ignore_index=ignore_index, reverse=reverse)
        per_token = {k: kl.get(k) for k in PER_TOKEN}
        per_token.update({k: kl[v] for k, v in CROSS.items()})
        if targets is not None:
            keep = kl["scored"].reshape(-1)
            if not keep.any():
                raise ValueError(f"every target is ignore_index ({ignore_index}): no token to score")
            if original_log_probs is None:
                original_log_probs = kl["original_log_probs"]
            if quantized_log_probs is None:
                quantized_log_probs = kl["quantized_log_probs"]
    if original_log_probs is None or quantized_log_probs is None:
        raise ValueError("log-probs are required (or logits together with targets)")
    lp = tuple(x if isinstance(x, (list, tuple)) else _adapt.as_array(x, name) for x, name in (
        (_adapt.scored(original_log_probs, "original_log_probs", keep), "original_log_probs"),
        (_adapt.scored(quantized_log_probs, "quantized_log_probs", keep), "quantized_log_probs")))
    try:
        # contiguous: NumPy's SIMD exp differs from its strided loop in the last bit
        lo, lq = (np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1)) for x in lp)
        if lo.size != lq.size or lo.size == 0:
            raise ValueError
        n = lo.size
        extras = {k: _adapt.as_per_token(v, k, n, keep) for k, v in per_token.items() if v is not None}
        names, codes = _adapt.group_codes(groups, n, keep) if groups is not None else (None, None)
        for k in ("kld", "kld_reverse"):
            if k + "_lo" in extras and (extras[k + "_lo"] > extras[k + "_hi"]).any():
                i = int(np.flatnonzero(extras[k + "_lo"] > extras[k + "_hi"])[0])
                raise ValueError(f"{k}_bounds: lower bound above the upper bound at index {i}")
    except (TypeError, ValueError) as exc:
        err = exc
    else:
        err = None
    if err is not None:  # the log-probs' own errors come first, in perplexity_delta's words
        moments(lp)
        raise err
    return Paired(lp, lo, lq, extras, names, codes, 0 if keep is None else int(keep.size - n))


def moments(lp, codes=None, n_groups=0, block_size=0):
    """``_core.paired_moments`` of the two log-prob inputs ``lp`` (validating them): the one
    read of both inputs by the C core."""
    return _core.paired_moments(*lp, codes=codes, n_groups=n_groups, block_size=block_size)
