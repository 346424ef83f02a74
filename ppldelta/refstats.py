"""Per-token statistics against a stored reference: ``summarize`` turns the original model's full
logits rows into compact records (the target's log-prob, the entropy, the top-K ids and
log-probs, the tail mass, the smallest log-prob), and ``compare`` gives, from a quantized model's
full logits rows and those records, every per-token statistic of the two-full-rows path:
the exact ones (both log-probs, Δp, same top-1, top-5/10 agreement) and KL(P||Q), KL(Q||P) as a
point estimate with certified per-token lower and upper bounds.  The derivation of the bounds
and of their rounding margins is docs/reference-bounds.md.

``summarize`` runs the C kernel ``_core.summarize_rows`` (csrc/summarize.c: two reads per row,
float64); ``summarize_rows`` is its NumPy twin (the tests' oracle).  ``compare``'s stage 1 is
the C kernel ``_core.compare_rows`` (csrc/compare.c: the rows read in place, three times, two
of them from cache, no float64 copy; its NumPy form is the tests' oracle,
tests/test_compare_kernel.py); the torch twins for
accelerator tensors are ppldelta/hf/_ref_torch.py, which share the second stage (``finish``:
the bounds from O(K) values per token) with this module.
"""
from __future__ import annotations

import numpy as np

from . import _adapt, _core

DEFAULT_K = 24
#: Tail probes per record (``summarize``): 36 + 8 (K + probes) = 292 bytes per token by default.
DEFAULT_PROBES = 8
#: Elements of one (rows x vocab) float64 temporary per row chunk.
ROW_BUDGET = 1 << 21
_U = 2.0 ** -53            # float64 unit roundoff
_EXP_REL = 2.0 ** -48      # relative error allowed for one float64 exp (16 ulp; libm and NumPy: < 4)
_F32_REL = 2.0 ** -24 + 2.0 ** -46  # float32 rounding of a log-prob, relative to the stored value
_F32_ABS = 2.0 ** -149     # float32 subnormal spacing
TAIL_VARIANCE = True       # the estimate's second-order tail term (False: p proportional to q)

KEYS = ("original_log_probs", "quantized_log_probs", "delta_p", "same_top1", "top1_in_top5",
        "top1_in_top10", "q_top1_in_base_top5", "q_top1_in_base_top10", "kld", "kld_lo", "kld_hi",
        "kld_reverse", "kld_reverse_lo", "kld_reverse_hi", "kld_sampling_var")


def RECORD_DTYPE(k: int, probes: int = 0) -> np.dtype:  # noqa: N802  (the name of the design)
    """The record of one scored token for a reference with K = ``k`` stored log-probs and
    ``probes`` tail probes (little-endian, packed: 36 + 8 k + 8 probes bytes; no probe fields
    when ``probes`` is 0, the layout of format version 1)."""
    k, m = int(k), int(probes)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if m < 0:
        raise ValueError(f"probes must be >= 0, got {m}")
    fields = [("token", "<i4"), ("lp", "<f8"), ("entropy", "<f8"), ("tail", "<f8"),
              ("lp_min", "<f8"), ("ids", "<i4", (k,)), ("lps", "<f4", (k,))]
    if m:
        fields += [("pids", "<i4", (m,)), ("plps", "<f4", (m,))]
    return np.dtype(fields, align=False)


def n_probes(records) -> int:
    """The number of tail probes per record of ``records`` (0 for records without probes)."""
    dt = records.dtype
    return dt["pids"].shape[0] if "pids" in dt.names else 0


_WEYL = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, rounded to odd
#: A reference header's ``probe_offsets`` entry: how the probes' offsets were chosen
#: (``probe_offsets``); a file without it (written before) used 1/2 for every token.
PROBE_OFFSETS = "weyl(position + 1): ((position + 1) * 0x9E3779B97F4A7C15 mod 2^64) >> 11, times 2^-53"


def probe_offsets(positions):
    """Each scored token's probe offset u in [0, 1) from its position in the token stream (the
    index of its target in ``input_ids``): u = ((position + 1) * 0x9E3779B97F4A7C15 mod 2^64) >> 11,
    times 2^-53 (the fractional parts of (position + 1) / golden ratio, a low-discrepancy sequence;
    exact in float64).  One offset per token, so that the probes' sampling errors are independent
    across tokens and their mean falls as 1/sqrt(tokens); one shared offset (the format's version
    2 files before ``probe_offsets`` was recorded: 1/2) correlates them, an error that more tokens
    do not remove (docs/reference-bounds.md, "Estimate")."""
    p = np.asarray(positions)
    if p.ndim != 1 or (p.size and (p.dtype.kind not in "iu" or p.min() < 0)):
        raise ValueError("positions must be a 1-D array of non-negative integers")
    x = (p.astype(np.uint64) + np.uint64(1)) * _WEYL  # modulo 2^64
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def probe_positions(cum, m, offsets=None):
    """Systematic sampling proportional to the tail's mass: per row of ``cum`` (the running sum,
    in id order, of e^{x_i - max} over the tail, zero on the stored top K), the first index whose
    running sum exceeds (j + u)/m of the row's total, j = 0..m-1, u the row's offset
    (``offsets``, from ``probe_offsets``; 1/2 without); -1 where the total is 0."""
    n, V = cum.shape
    tot = cum[:, -1]
    u = np.full((n, 1), 0.5) if offsets is None else np.asarray(offsets, dtype=np.float64).reshape(n, 1)
    thr = (np.arange(m) + u) / m * tot[:, None]
    pos = np.empty((n, m), dtype=np.int64)
    for r in range(n):
        pos[r] = np.searchsorted(cum[r], thr[r], side="right")
    return np.where((tot > 0)[:, None], np.minimum(pos, V - 1), -1)


def _check_scored(t, ignore_index):
    bad = np.flatnonzero(t == ignore_index)
    if bad.size:
        raise ValueError(f"targets[{int(bad[0])}] is ignore_index ({ignore_index}): a reference "
                         f"holds scored positions only (drop the ignored rows first)")


# ============================================================================ summarize

def _topk_sorted(x, k):
    """Per row of float64 ``x``: the ids of the k largest values by decreasing value, ties by
    smaller id (so ids[:, 0] is the first argmax)."""
    n, V = x.shape
    if k >= V:
        idx = np.broadcast_to(np.arange(V), (n, V)).copy()
    else:
        idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(x, idx, 1)
        v = vals.min(axis=1)
        # a tie at the boundary: the tokens kept must be the smallest ids among the tied ones
        fix = np.flatnonzero((x == v[:, None]).sum(1) > (vals == v[:, None]).sum(1))
        for r in fix:
            gt = np.flatnonzero(x[r] > v[r])
            eq = np.flatnonzero(x[r] == v[r])[:k - gt.size]
            idx[r] = np.concatenate([gt, eq])
    vals = np.take_along_axis(x, idx, 1)
    order = np.lexsort((idx, -vals), axis=-1)
    return np.take_along_axis(idx, order, 1)


def summarize_rows(x, k, out, offsets=None):
    """Fill the records ``out`` (all fields but token and lp) from float64 logits rows ``x``
    (``offsets``: the rows' probe offsets, ``probe_offsets``; 1/2 without)."""
    n, V = x.shape
    kk = min(k, V)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        m = x.max(axis=1)
        d = x - m[:, None]
        e = np.exp(d)
        ls = np.log(e.sum(axis=1))
        a = d - ls[:, None]
        p = np.exp(a)
        out["entropy"] = -np.where(p > 0, p * a, 0.0).sum(axis=1)
        out["lp_min"] = d.min(axis=1) - ls
        ids = _topk_sorted(x, kk)
        out["ids"][:, :kk] = ids
        out["lps"][:, :kk] = np.take_along_axis(a, ids, 1).astype(np.float32)
        if kk < k:
            out["ids"][:, kk:] = -1
            out["lps"][:, kk:] = -np.inf
        m = n_probes(out)
        if kk == V:
            out["tail"] = -np.inf
        else:
            np.put_along_axis(e, ids, 0.0, 1)
            out["tail"] = np.log(e.sum(axis=1)) - ls
        if m:
            pos = probe_positions(np.cumsum(e, axis=1), m, offsets) if kk < V else np.full((n, m), -1)
            out["pids"] = pos
            out["plps"] = np.where(pos >= 0, np.take_along_axis(a, np.maximum(pos, 0), 1), -np.inf)


def summarize(logits, targets, k: int = DEFAULT_K, *, probes: int = DEFAULT_PROBES, positions=None,
              ignore_index=-100, bf16=False, threads=1):
    """The reference records (``RECORD_DTYPE(k, probes)``, one per row) of the original model's logits
    (shape (..., vocab); any float dtype, bfloat16 torch tensors, raw bfloat16 with ``bf16``) at
    ``targets`` (one token id per row).  Every row is a scored position: a target equal to
    ``ignore_index`` is an error.  ``lp`` is ppldelta.token_log_probs of the row (bit for bit);
    the other fields are float64 log-softmax values (``lps`` rounded to float32).  With ``k`` >
    vocab the extra slots hold id -1 and log-prob -inf.  ``probes`` tail tokens per row are
    sampled in proportion to their probability (``probe_positions``: deterministic) and stored
    with their log-probs (float32); they make the KL estimate unbiased (docs/reference-bounds.md).
    ``positions``: each row's token position in the stream (its target's index in ``input_ids``),
    which sets its probe offset (``probe_offsets``); default 0, 1, 2, ... (the producers pass the
    true positions, so a file does not depend on how its rows were batched)."""
    from .logits import _threads

    k = int(k)
    dt = RECORD_DTYPE(k, probes)
    a, lead, bf = _adapt.as_rows(logits, "logits", bf16)
    V = a.shape[1]
    t = _adapt.as_targets(targets, lead, V, ignore_index)
    _check_scored(t, ignore_index)
    out = np.zeros(t.size, dtype=dt)
    offsets = probe_offsets(np.arange(t.size) if positions is None else positions)
    if offsets.size != t.size:
        raise ValueError(f"positions has {offsets.size} values for {t.size} rows")
    if t.size == 0:
        return out
    # the C kernel validates the rows (NaN, +inf, all -inf) and gives the two-model path's log-probs
    out["lp"] = _core.logits_stats(a, None, t, ignore_index=ignore_index, bf16=bf,
                                   threads=_threads(threads)).lp_a
    out["token"] = t
    # the C kernel (csrc/summarize.c: two reads of each row, fused); summarize_rows is its NumPy twin
    for f, v in _core.summarize_rows(a, k, n_probes(out), offsets, bf16=bf, threads=_threads(threads)).items():
        if f in dt.names:
            out[f] = v
    return out


# ============================================================================ compare, stage 1

def tail_m(k: int) -> int:
    """How many of the largest and of the smallest tail log-probs of the quantized row the bounds
    read per token (more only tightens the bounds of rows whose tail is long and flat)."""
    return max(64, 2 * int(k))


def _pad(a, M, v):
    """``a`` (rows x m) padded with ``v`` to M columns (the torch twin's top / bot)."""
    if a.shape[1] >= M:
        return a
    return np.concatenate([a, np.full((a.shape[0], M - a.shape[1]), v)], axis=1)


def concat_parts(chunks):
    """One parts dict from the parts of row chunks (the torch twin's)."""
    first = chunks[0]
    return {k: (v if np.isscalar(v) else np.concatenate([c[k] for c in chunks]))
            for k, v in first.items()}


# ============================================================================ compare, stage 2

def _greedy(S, n_items, R, capw):
    """max (S sorted best first) of sum alloc_i S_i over 0 <= alloc_i <= capw, sum = R, over
    the first n_items items; items beyond the M held are valued at the last one held (a bound
    in the right direction, since the held items are the extreme ones)."""
    n, M = S.shape
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        R = np.clip(R, 0.0, n_items * capw)
        full = np.where(capw > 0, np.floor(R / np.where(capw > 0, capw, 1.0)), 0.0)
        full = np.minimum(full, np.maximum(n_items - 1, 0))
        frac = np.where(capw > 0, R - full * capw, 0.0)
        Sf = np.where(np.isfinite(S), S, 0.0)
        pre = np.concatenate([np.zeros((n, 1)), np.cumsum(Sf, axis=1)], axis=1)
        fi = full.astype(np.intp)
        held = np.minimum(fi, M)
        last = S[:, M - 1]
        sum_full = np.take_along_axis(pre, held[:, None], 1)[:, 0] + np.where(
            fi > M, (fi - M) * np.where(np.isfinite(last), last, 0.0), 0.0)
        part = np.take_along_axis(S, np.minimum(fi, M - 1)[:, None], 1)[:, 0]
        # an infinite item that receives mass makes the sum infinite
        uses_inf = np.zeros(n, dtype=bool)
        if (~np.isfinite(S)).any():
            first_inf = np.where(np.isfinite(S), M, np.arange(M)).min(axis=1)
            uses_inf = (first_inf < fi) | ((first_inf == np.minimum(fi, M - 1)) & (frac > 0))
            inf_val = np.take_along_axis(S, np.minimum(first_inf, M - 1)[:, None], 1)[:, 0]
        val = capw * sum_full + np.where(frac > 0, frac * np.where(np.isfinite(part), part, 0.0), 0.0)
        if uses_inf.any():
            val = np.where(uses_inf, inf_val, val)
    return val


def _waterfill(qtop, btop, Qbeyond, qbT, P, cap):
    """p_i = min(cap, lam q_i) with sum p_i = P over the tail (q held by decreasing value in
    ``qtop``, the rest summing to ``Qbeyond``; caps beyond the held items dropped: a
    relaxation).  Returns (W, C, Y): W = min sum p log(p/q) (the forward tail's KL-part lower
    bound), C = max sum q log p (its reverse counterpart), Y = sum p b (b = log q)."""
    n, M = qtop.shape
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        suf = np.concatenate([np.cumsum(qtop[:, ::-1], axis=1)[:, ::-1], np.zeros((n, 1))], axis=1)
        Qu = suf + Qbeyond[:, None]                        # (n, M + 1): mass of the uncapped, r = 0..M
        r = np.arange(M + 1)
        rem = P[:, None] - r * cap[:, None]
        lam = rem / Qu
        nxt = np.concatenate([qtop, np.zeros((n, 1))], axis=1)
        ok = (lam * nxt <= cap[:, None]) | (r == M)
        rs = np.argmax(ok, axis=1)
        qc = np.concatenate([np.zeros((n, 1)), np.cumsum(qtop, axis=1)], axis=1)
        bfin = np.where(np.isfinite(btop), btop, 0.0)
        bc = np.concatenate([np.zeros((n, 1)), np.cumsum(bfin, axis=1)], axis=1)
        qbc = np.concatenate([np.zeros((n, 1)), np.cumsum(qtop * bfin, axis=1)], axis=1)
        g = lambda a: np.take_along_axis(a, rs[:, None], 1)[:, 0]  # noqa: E731
        remr, Qur, Qc, Bc, QBc = g(rem), g(Qu), g(qc), g(bc), g(qbc)
        rsf = rs.astype(np.float64)
        logcap = np.log(cap)
        loglam = np.log(remr / Qur)
        has_rem = remr > 0
        inf_mass = has_rem & (Qur <= 0)
        W = np.where(rs > 0, cap * (rsf * logcap - Bc), 0.0) + np.where(has_rem, remr * loglam, 0.0)
        C = np.where(Qc > 0, logcap * Qc, 0.0) + np.where(Qur > 0, Qur * loglam, 0.0) + (qbT - QBc)
        Y = cap * Bc + np.where(Qur > 0, remr / Qur, 0.0) * (qbT - QBc)
        W = np.where(inf_mass, np.inf, W)
    return W, C, Y


def _row_var(x, mask):
    """Per row, the sample variance (divisor count - 1) of ``x`` where ``mask``; 0 below 2 values."""
    cnt = mask.sum(1)
    mu = np.where(mask, x, 0.0).sum(1) / np.maximum(cnt, 1)
    return np.where(cnt > 1, (np.where(mask, x - mu[:, None], 0.0) ** 2).sum(1) / np.maximum(cnt - 1, 1), 0.0)


def _probe_estimates(rec, parts, pt, l, lf, bS, qS, PT, QT, s2, F_old, R_old):
    """The KL estimates from the tail probes (docs/reference-bounds.md, "Estimate"): with
    c = log(P_T / Q_T) and δ_i = a_i - b_i - c, the tail's normalised distributions satisfy
    E_p̂[e^{-δ}] = 1 exactly, so KL(p̂ || q̂) = E_p̂[δ + β(e^{-δ} - 1)] for any β fixed without
    the probes: the probes are a sample of p̂, and the mean over them estimates it without bias.
    β = v / (e^v - 1) is the variance-minimising β where δ is normal with variance v (1 for Q close
    to P, towards 0 where Q puts mass that P does not and e^{-δ} is heavy tailed), with
    v = s2 (1 + s2) from ``s2``, the stored tokens' sample variance of l - b: inflated, since the
    stored tokens understate the tail's variance and a β too large costs far more than one too
    small (docs/reference-bounds.md).  KL(q̂ || p̂) = E_p̂[e^{-δ}(-δ)] would
    need the rare tail tokens where Q is far above P, so its estimate is the second-order
    Var_p̂(δ)/2 with the probes' sample variance.  Rows without probes (no tail, or no tail mass
    in Q) keep the second-order estimates ``F_old`` / ``R_old`` (and the reverse one where a probe
    has q = 0).  Also returns the estimated sampling variance of
    each forward estimate (P_T^2 times the probes' sample variance / M; 0 without probes): its
    sum over tokens, divided by n^2, is the variance of the mean KLD estimate."""
    pv = rec["pids"] >= 0
    cnt = pv.sum(1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c = np.log(PT / QT)
        d = np.where(pv, rec["plps"].astype(np.float64) - parts["bP"] - c[:, None], 0.0)
        v = s2 * (1 + s2)
        beta = np.where(v >= 700, 0.0, np.where(v > 0, v / np.expm1(np.clip(v, 0.0, 700.0)), 1.0))[:, None]
        fwd = np.where(pv, d + np.where(beta > 0, beta * np.expm1(-d), 0.0), 0.0)
        use = (cnt > 0) & (PT > 0) & (QT > 0)
        m = np.maximum(cnt, 1)
        stored_f = (pt * (np.where(lf, l, 0.0) - bS)).sum(1)
        stored_r = -(qS * (np.where(lf, l, 0.0) - bS)).sum(1)
        F = stored_f + PT * c + PT * fwd.sum(1) / m
        R = stored_r - QT * c + QT * _row_var(d, pv) / 2
        s2 = _row_var(fwd, pv)
        var = np.where(use & np.isfinite(s2), PT * PT * s2 / m, 0.0)
    return np.where(use, F, F_old), np.where(use & np.isfinite(R), R, R_old), var


def finish(parts, records):
    """Stage 2 of ``compare``: the per-token dict from the stage-1 parts and the records (all
    NumPy float64 on the host; the same code for the CPU and the torch paths)."""
    rec = records
    V, M = parts["V"], parts["M"]
    n = rec.shape[0]
    K = rec["ids"].shape[1]
    E1 = (V + 64) * 2.0 ** -52 + 2.0 ** -140
    valid = rec["ids"] >= 0
    l = np.where(valid, rec["lps"].astype(np.float64), -np.inf)
    H, T, lpmin = rec["entropy"], rec["tail"], rec["lp_min"]
    bS = parts["bS"]
    out = {}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lf = l > -np.inf
        dl = np.where(lf, _F32_REL * np.abs(l) + E1 * (2 + np.abs(l)) + _F32_ABS, 0.0)
        pt = np.exp(l)
        pp = np.where(lf, np.exp(l + dl) * (1 + _EXP_REL), 0.0)
        pm = np.where(lf, np.exp(l - dl) * (1 - _EXP_REL), 0.0)
        ap, am = np.where(lf, l + dl, -np.inf), np.where(lf, l - dl, -np.inf)
        last = np.maximum(valid.sum(axis=1) - 1, 0)
        cap = np.take_along_axis(pp, last[:, None], 1)[:, 0]
        cap_pt = np.take_along_axis(pt, last[:, None], 1)[:, 0]
        dmin = E1 * (2 + np.abs(lpmin))
        floor = np.where(lpmin > -np.inf, np.exp(lpmin - dmin) * (1 - _EXP_REL), 0.0)
        dT = E1 * (2 + np.abs(T))
        PT = np.where(T > -np.inf, np.exp(T), 0.0)
        PTp = np.where(T > -np.inf, np.exp(T + dT) * (1 + _EXP_REL), 0.0)
        PTm = np.where(T > -np.inf, np.exp(T - dT) * (1 - _EXP_REL), 0.0)
        nT = parts["nT"].astype(np.float64)
        ninfT = parts["ninfT"]
        nfinT = nT - ninfT
        top, bot = parts["top"], parts["bot"]
        QT, Qb, qbT, sbT, HQ = parts["QT"], parts["Qbeyond"], parts["qbT"], parts["sbT"], parts["HQ"]
        bSf = np.where(valid & lf & np.isfinite(bS), bS, 0.0)
        qS = np.where(valid, np.exp(bS), 0.0)

        # --- rounding margins (docs/reference-bounds.md, "Rounding"): first-order bounds x 8
        bmax = parts["bmax"]
        logn = np.log(np.maximum(nT, 1.0) / np.where(PTp > 0, PTp, 1.0))
        ZP = (pp * (1 + np.abs(np.where(lf, l, 0))) ** 2).sum(1) + PTp * (1 + np.maximum(logn, 0)) ** 2 + 1
        ZQ = parts["zq"] + (pp * (1 + np.abs(bSf)) ** 2).sum(1) + PTp * (1 + bmax) ** 2 + \
            (qS * (1 + np.abs(np.where(lf, l, 0))) ** 2).sum(1) + QT * (2 + np.abs(np.where(lpmin > -np.inf, lpmin, 0))) ** 2
        M64 = 8 * E1 * (ZP + ZQ)
        eH = 2 * E1 * ZP

        # --- KL(P||Q) = -H - sum_S p b - sum_T p b
        wsum = (pt * valid).sum(1)
        c = (pt * bSf).sum(1) / wsum
        w = c[:, None] - bSf
        xs_ends = -c[:, None] * (1 - np.stack([PTm, PTp], 1))
        XS_hi = np.where(valid, np.maximum(pm * w, pp * w), 0).sum(1) + xs_ends.max(1)
        XS_lo = np.where(valid, np.minimum(pm * w, pp * w), 0).sum(1) + xs_ends.min(1)
        fl = np.minimum(floor, np.where(nT > 0, PTm / np.maximum(nT, 1), 0.0))
        capw = np.maximum(cap - fl, 0.0)
        G_min = fl * sbT + -_greedy(-bot, nT, PTp - nT * fl, capw)      # min sum_T p b
        G_min = np.where((ninfT > 0) & (nT > 0), -np.inf, G_min)  # P may hold mass there (PT may underflow)
        G_max = fl * sbT + _greedy(top, nfinT, PTm - nT * fl, capw)     # max sum_T p b
        F_hi = -H + XS_hi - G_min + eH + M64
        F_lo_lin = -H + XS_lo - G_max - eH - M64
        # per stored token, min over a in [am, ap] of e^a (a - b); a* = b - 1 is the minimum
        ga, gb = pm * (am - bSf), pp * (ap - bSf)
        inside = (bSf - 1 >= am) & (bSf - 1 <= ap)
        gmin = np.where(valid & lf, np.where(inside, -np.exp(bSf - 1), np.minimum(ga, gb)), 0.0)
        qtop = np.where(np.isfinite(top), np.exp(top), 0.0)
        W1, C1p, _ = _waterfill(qtop, top, Qb, qbT, PTm, cap)
        W2, C2p, _ = _waterfill(qtop, top, Qb, qbT, PTp, cap)
        W = np.where(PTp > 0, np.minimum(W1, W2), 0.0)
        # Q's tail mass below float64's range with finite tail tokens left (every q_i = e^b_i
        # rounds to 0; the water-fill would read them as none): the log-sum inequality instead,
        # sum_T p log(p/q) >= P (log P - c), Q_T <= n e^c with c = log n_fin + Q's top tail b
        qunder = (QT <= 0) & (Qb <= 0) & (nfinT > 0) & (PTp > 0) & np.isfinite(top[:, 0])
        with np.errstate(divide="ignore", invalid="ignore"):
            cq = np.log(np.maximum(nfinT, 1.0)) + np.where(np.isfinite(top[:, 0]), top[:, 0], 0.0)
            f = lambda P: np.where(P > 0, P * (np.log(P) - cq), 0.0)  # noqa: E731
            Wq = np.minimum(f(PTm), f(PTp))
            Wq = np.where((np.exp(cq - 1) >= PTm) & (np.exp(cq - 1) <= PTp), np.minimum(Wq, -np.exp(cq - 1)), Wq)
        W = np.where(qunder, Wq, W)
        F_lo_wf = gmin.sum(1) + W - M64 * (1 + np.abs(W))
        F_lo = np.maximum(np.maximum(F_lo_lin, F_lo_wf), 0.0)
        W_est, C_est, Y_est = _waterfill(qtop, top, Qb, qbT, PT, cap_pt)
        # second order: within the tail, p_i / q_i varies as the stored tokens' log-ratios do;
        # KL(p_tail || q_tail) ~ P_T Var(a - b) / 2 (docs/reference-bounds.md, "Estimate")
        ok = valid & lf & np.isfinite(bS)
        s2 = _row_var(np.where(ok, l - bSf, 0.0), ok)
        corr = s2 / 2 if TAIL_VARIANCE else 0.0
        if TAIL_VARIANCE:
            F_est = (pt * (np.where(lf, l, 0.0) - bSf)).sum(1) + np.where(PT > 0, W_est, 0.0) + PT * corr
        else:
            F_est = -H - (pt * bSf).sum(1) - np.where(PT > 0, Y_est, 0.0)
        R_est = -HQ - (qS * np.where(lf, l, 0.0)).sum(1) + np.where(QT > 0, -C_est, 0.0) + QT * corr
        svar = np.zeros(n)
        if "pids" in rec.dtype.names and rec["pids"].shape[1]:
            F_est, R_est, svar = _probe_estimates(rec, parts, pt, l, lf, bSf, qS, PT, QT, s2, F_est, R_est)
        # infinities: a stored token with p > 0 = q; tail mass forced onto q = 0 tokens
        f_inf = (valid & lf & (bS == -np.inf)).any(1) | ((ninfT > 0) & (lpmin > -np.inf)) | \
            (PTm > nfinT * cap * (1 + 1e-12))
        F_lo = np.where(f_inf, np.inf, F_lo)
        F_hi = np.where(f_inf, np.inf, np.maximum(F_hi, F_lo))
        out["kld"] = np.clip(np.where(f_inf, np.inf, F_est), F_lo, F_hi)
        out["kld_lo"], out["kld_hi"] = F_lo, F_hi
        out["kld_sampling_var"] = svar

        # --- KL(Q||P) = -H_Q - sum_S q a - sum_T q a
        qa_hi = -np.where(valid & (qS > 0), qS * np.where(lf, am, 0.0), 0.0).sum(1)
        qa_lo = -np.where(valid & (qS > 0), qS * np.where(lf, ap, 0.0), 0.0).sum(1)
        # tail: -sum q a <= -min sum q log p (a vertex: cap on the smallest q, floor elsewhere)
        qbot = np.where(np.isfinite(bot), np.exp(bot), 0.0)
        Rr = np.maximum(PTm - nT * fl, 0.0)
        mm = np.where(capw > 0, np.floor(Rr / np.where(capw > 0, capw, 1.0)), 0.0)
        short = mm >= M  # the greedy needs more items than held: fall back to a >= lp_min
        mi = np.minimum(mm, M - 1).astype(np.intp)
        pre = np.concatenate([np.zeros((n, 1)), np.cumsum(qbot, axis=1)], axis=1)
        q_full = np.take_along_axis(pre, mi[:, None], 1)[:, 0]
        q_part = np.take_along_axis(qbot, mi[:, None], 1)[:, 0]
        p_part = fl + (Rr - mm * capw)
        q_rest = np.maximum(QT - q_full - q_part, 0.0)
        logfl = np.log(fl)
        minC = np.where(q_full > 0, np.log(cap) * q_full, 0.0) + \
            np.where(q_part > 0, q_part * np.log(p_part), 0.0) + np.where(q_rest > 0, logfl * q_rest, 0.0)
        minC = np.where(short, np.where(QT > 0, QT * logfl, 0.0), minC)
        Z_hi = -minC
        Z_lo = -np.maximum(C1p, C2p)
        # P's tail mass below float64's range (PT, PTm, fl are 0): the bounds in log space
        # instead, every tail a_i in [lp_min, Tu].  A stored T of -inf with tail tokens left
        # proves no zero mass: each e_i = exp(x_i - max) below 2^-1075 rounds to 0, so it says
        # only a_i <= -745 (Tu = log n_T - 745)
        Tu = np.where(T > -np.inf, T + dT, np.where(nT > 0, np.log(np.maximum(nT, 1.0)) - 745.0, -np.inf))
        under = (Tu > -np.inf) & ~(PTm > 0)
        Z_lo = np.where(under, -QT * Tu * (1 - 1e-12), Z_lo)
        Z_hi = np.where(under, np.where(lpmin > -np.inf, -QT * (lpmin - dmin) * (1 + 1e-12), np.inf), Z_hi)
        R_hi = -HQ + qa_hi + np.where(QT > 0, Z_hi, 0.0) + M64
        R_hi = np.where((lpmin == -np.inf) & (nfinT > 0), np.inf, R_hi)  # q may sit on a p = 0 tail token
        R_lo = np.maximum(-HQ + qa_lo + np.where(QT > 0, Z_lo, 0.0) - M64 * (1 + np.abs(Z_lo)), 0.0)
        # infinities: q > 0 where p = 0, said by the log-probs (q = e^b may underflow to 0)
        r_inf = (valid & ~lf & (bS > -np.inf)).any(1) | ((QT > 0) & (Tu == -np.inf))
        R_lo = np.where(r_inf, np.inf, R_lo)
        R_hi = np.where(r_inf | np.isnan(R_hi), np.inf, np.maximum(R_hi, R_lo))
        out["kld_reverse"] = np.clip(np.where(r_inf, np.inf, R_est), R_lo, R_hi)
        out["kld_reverse_lo"], out["kld_reverse_hi"] = R_lo, R_hi

    # --- exact statistics
    ids0 = rec["ids"][:, 0]
    out["same_top1"] = parts["argmax_q"] == ids0
    out["top1_in_top5"] = parts["rank_q"] < 5
    out["top1_in_top10"] = parts["rank_q"] < 10
    if K >= 10:
        lps = rec["lps"]
        hit = rec["ids"] == parts["argmax_q"][:, None]
        pos = np.argmax(hit, axis=1)
        lp_at = np.take_along_axis(lps, pos[:, None], 1)
        rank_in = ((lps > lp_at) & (np.arange(K) < pos[:, None])).sum(1)
        l_last = np.take_along_axis(lps, last[:, None], 1)
        tied_tail = lpmin.astype(np.float32) >= l_last[:, 0]
        rank_out = np.where(tied_tail, (lps > l_last).sum(1), K)
        rank_a = np.where(hit.any(1), rank_in, rank_out)
        out["q_top1_in_base_top5"] = rank_a < 5
        out["q_top1_in_base_top10"] = rank_a < 10
    else:
        out["q_top1_in_base_top5"] = out["q_top1_in_base_top10"] = None
    return out


def check_records(records):
    """The records as a 1-D structured array with the fields of RECORD_DTYPE (any K)."""
    r = np.asarray(records)
    if r.dtype.names is None or set(r.dtype.names) not in (set(RECORD_DTYPE(1).names),
                                                           set(RECORD_DTYPE(1, 1).names)):
        raise TypeError("records must be a RECORD_DTYPE(k) structured array (ppldelta.refstats.summarize)")
    return r.reshape(-1)


def check_rows_fit(rec, n, V):
    """The quantized rows must pair with the records one to one and hold every stored id: the
    targets as int64 (ValueError otherwise)."""
    if n != rec.shape[0]:
        raise ValueError(f"quantized_logits has {n} rows, the reference {rec.shape[0]} records")
    if n == 0:
        raise ValueError("no rows to compare")
    t = rec["token"].astype(np.int64)
    if (t < 0).any() or (t >= V).any() or (rec["ids"] >= V).any():
        raise ValueError(f"the reference's token ids do not fit the quantized model's vocabulary ({V})")
    return t


def compare(quantized_logits, records, *, bf16=False, threads=1):
    """Per-token statistics of a quantized model's logits (shape (tokens, vocab), rows in the
    records' order) against the reference ``records`` (``summarize`` of the original's rows at
    the same targets).  Returns a dict of per-token arrays:

    - exact: ``original_log_probs`` (the records' lp), ``quantized_log_probs``
      (ppldelta.token_log_probs of the rows at the records' tokens, bit for bit), ``delta_p``,
      ``same_top1``, ``top1_in_top5``, ``top1_in_top10`` (the original's top-1 among the
      quantized row's 5/10 largest), ``q_top1_in_base_top5`` / ``_top10`` (the other way round,
      from the stored top K: K >= 10, else None; stored log-probs that are equal in float32 count
      as tied);
    - ``kld``, ``kld_lo``, ``kld_hi``: KL(P||Q) estimate and certified lower / upper bounds;
      ``kld_reverse``, ``kld_reverse_lo``, ``kld_reverse_hi``: the same for KL(Q||P)
      (docs/reference-bounds.md);
    - ``kld_sampling_var``: the tail probes' sampling variance of each ``kld`` estimate (0
      without probes); sqrt(sum) / n is the standard error of the mean KLD estimate.
    """
    from .logits import _threads

    rec = check_records(records)
    a, lead, bf = _adapt.as_rows(quantized_logits, "quantized_logits", bf16)
    n, V = a.shape
    t = check_rows_fit(rec, n, V)
    lq = _core.logits_stats(a, None, t, ignore_index=-(2 ** 63), bf16=bf, threads=_threads(threads)).lp_a
    # stage 1: the C kernel (csrc/compare.c) reads the rows in place, three reads per row (two from cache)
    ids = np.ascontiguousarray(rec["ids"], dtype=np.int32)
    pids = np.ascontiguousarray(rec["pids"], dtype=np.int32) if n_probes(rec) else None
    parts = _core.compare_rows(a, ids, tail_m(ids.shape[1]), pids, bf16=bf, threads=_threads(threads))
    out = finish(parts, rec)
    return assemble(out, rec["lp"].astype(np.float64), lq)


def assemble(out, lo, lq):
    """The per-token dict in KEYS order, with the log-probs and Δp."""
    with np.errstate(invalid="ignore"):
        dp = np.exp(lq) - np.exp(lo)
    res = {"original_log_probs": lo, "quantized_log_probs": lq, "delta_p": dp}
    res.update(out)
    return {k: res[k] for k in KEYS}
