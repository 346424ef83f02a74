"""Paired task outcomes: accuracy deltas, flips (Dutta et al. 2024) and McNemar's exact test."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ._adapt import as_array

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b successes in b + c at p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # P(X <= k) for X ~ Bin(n, 1/2), in log space for large n
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]
    m = max(logs)
    tail = math.exp(m) * sum(math.exp(v - m) for v in logs)
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class FlipReport:
    n: int
    original_accuracy: float
    quantized_accuracy: float
    accuracy_delta: float          # quantized - original, in accuracy units (0..1)
    flips: int                     # items whose outcome (or chosen answer) changed
    flip_pct: float
    right_to_wrong: int
    wrong_to_right: int
    mcnemar_p: float               # exact two-sided p-value of the accuracy change
    significant: bool              # mcnemar_p < alpha
    alpha: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def breakdown(self) -> str:
        """The flips by kind; for choice_flips a changed answer can also go from one wrong choice
        to another ("wrong->wrong": a flip, but neither right->wrong nor wrong->right)."""
        other = self.flips - self.right_to_wrong - self.wrong_to_right
        return (f"{self.right_to_wrong} right->wrong, {self.wrong_to_right} wrong->right"
                + (f", {other} wrong->wrong" if other else ""))

    def summary(self) -> str:
        return (f"acc {self.original_accuracy:.1%} -> {self.quantized_accuracy:.1%} "
                f"({self.accuracy_delta * 100:+.1f} pts), flips {self.flips}/{self.n} "
                f"({self.flip_pct:.1f} %: {self.breakdown}), McNemar p = {self.mcnemar_p:.3g}"
                + (" (significant)" if self.significant else ""))

    def __str__(self) -> str:
        return self.summary()


def _report(co, cq, changed, alpha) -> FlipReport:
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)) or \
            not 0 < alpha < 1:
        raise ValueError(f"alpha must be a significance level in (0, 1), got {alpha!r}")
    n = int(co.size)
    if n == 0:
        raise ValueError("no items")
    b = int(np.count_nonzero(co & ~cq))
    c = int(np.count_nonzero(~co & cq))
    p = _mcnemar_exact(b, c)
    flips = int(np.count_nonzero(changed))
    return FlipReport(n, float(co.mean()), float(cq.mean()), float(cq.mean() - co.mean()), flips,
                      100.0 * flips / n, b, c, p, bool(p < alpha), alpha)


def _outcomes(x, name) -> np.ndarray:
    """Pass/fail outcomes as bools: bools, 0/1 numbers, or the strings 'true'/'false'/'1'/'0'/
    'yes'/'no' (any case, as lm-eval logs them); anything else is a ValueError naming the index."""
    a = as_array(x, name).reshape(-1)
    if a.dtype.kind == "b":
        return a
    if a.dtype.kind in "iuf":
        bad = (a != 0) & (a != 1)  # NaN too
        out = a == 1
    else:
        vals = a.tolist()
        out = np.zeros(len(vals), dtype=bool)
        bad = np.zeros(len(vals), dtype=bool)
        for i, v in enumerate(vals):
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            if isinstance(v, str):
                t = v.strip().lower()
                out[i], bad[i] = t in _TRUE, t not in _TRUE | _FALSE
            elif isinstance(v, (bool, int, float)):
                out[i], bad[i] = v == 1, v not in (0, 1)
            else:
                bad[i] = True
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        v = a.reshape(-1)[i]
        v = v.item() if isinstance(v, np.generic) else v
        raise ValueError(f"{name}[{i}] = {v!r} is not a pass/fail outcome (a bool, 0/1, or "
                         "'true'/'false'/'yes'/'no')")
    return out


def _integers(x, name) -> np.ndarray:
    """Integer values (integer arrays, or floats with integral values such as pandas' 1.0);
    TypeError for bools and non-numbers, ValueError naming the index for 1.5, NaN, inf."""
    a = np.asarray(x) if np.isscalar(x) else as_array(x, name)
    if a.dtype.kind in "iu":
        return a.astype(object) if a.dtype == np.uint64 else a.astype(np.int64)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be integers, not {a.dtype}")
    bad = ~np.isfinite(a) | (a != np.round(a)) | (np.abs(a) >= 2.0 ** 63)  # int64 would wrap
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        where = f"[{i}]" if a.ndim else ""
        raise ValueError(f"{name}{where} = {a.reshape(-1)[i].item()!r} is not an integer")
    return a.astype(np.int64)


def paired_outcomes(original_correct, quantized_correct, *, alpha=0.05) -> FlipReport:
    """Pass/fail of each item under both models (HumanEval problems, exact-match answers,
    instruction checks): accuracy of each, the delta, flips and McNemar's exact test."""
    ao, aq = as_array(original_correct, "original_correct"), as_array(quantized_correct, "quantized_correct")
    co, cq = _outcomes(ao, "original_correct"), _outcomes(aq, "quantized_correct")
    if ao.shape != aq.shape:  # (2, 2) against (4,): not the same items
        raise ValueError(f"shape mismatch: original outcomes {ao.shape}, quantized {aq.shape}")
    return _report(co, cq, co != cq, alpha)


def choice_flips(original_scores, quantized_scores, answers, *, alpha=0.05) -> FlipReport:
    """Multiple-choice tasks (MMLU, C-Eval, HellaSwag style): per-question per-choice
    log-likelihoods (items x choices; pad missing choices with -inf) and the index of the right
    answer.  A flip is a question whose chosen answer changed, right or wrong."""
    so = np.asarray(as_array(original_scores, "original_scores"), dtype=np.float64)
    sq = np.asarray(as_array(quantized_scores, "quantized_scores"), dtype=np.float64)
    ans = _integers(answers, "answers").reshape(-1)
    if so.ndim != 2 or so.shape != sq.shape:
        raise ValueError(f"scores must both be (items, choices); got {so.shape} and {sq.shape}")
    if ans.shape[0] != so.shape[0]:
        raise ValueError(f"{ans.shape[0]} answers for {so.shape[0]} items")
    for name, sc in (("original_scores", so), ("quantized_scores", sq)):
        bad = np.isnan(sc) | (sc == np.inf)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"{name}[{i}, {j}] = {sc[i, j]}: not a log-likelihood (NaN or +inf)")
    bad = (ans < 0) | (ans >= so.shape[1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"answers[{i}] = {int(ans[i])} is not a choice index in [0, {so.shape[1]})")
    rows = np.arange(so.shape[0])
    idx = ans.astype(np.int64)  # in range now (uint64 ids came as Python ints)
    pad = (so[rows, idx] == -np.inf) & (sq[rows, idx] == -np.inf)
    if pad.any():
        i = int(np.flatnonzero(pad)[0])
        raise ValueError(f"answers[{i}] = {int(ans[i])} points at a padding column (-inf in both models' "
                         "scores): not one of that item's choices")
    po, pq = so.argmax(axis=1), sq.argmax(axis=1)
    return _report(po == ans, pq == ans, po != pq, alpha)


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples of which c
    passed; vectorised over arrays of n and c.  Computed as a stable product."""
    kk = _integers(k, "k")
    if kk.size != 1:
        raise ValueError(f"k must be one integer, got {kk.size} values")
    k = int(kk.reshape(-1)[0])
    n_arr, c_arr = np.broadcast_arrays(_integers(n, "n"), _integers(c, "c"))
    out = np.empty(n_arr.shape, dtype=np.float64)
    for idx in np.ndindex(n_arr.shape):
        ni, ci = int(n_arr[idx]), int(c_arr[idx])
        if not (0 <= ci <= ni) or k < 1 or k > ni:
            raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={ni}, c={ci}, k={k})")
        if ni - ci < k:
            out[idx] = 1.0
        else:
            out[idx] = 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return float(out) if out.ndim == 0 else out
