"""ppldelta.analyze: the reference dict plus what perplexity alone hides.

Statistics follow llama.cpp's ``--kl-divergence`` final block (same names, same meaning: a "±"
is the standard error of the mean, sqrt(var / (n - 1)); the ratio's and difference's errors
subtract the covariance of the paired per-token values; Δp is p_Q(target) - p_base(target) in
percentage points; percentiles interpolate linearly), plus a paired block bootstrap of
ln(PPL_Q / PPL_O) (blocks of consecutive tokens, resampling loop in C) that gives a confidence
interval which does not assume independent tokens, per-group results, and the expected band.
"""
from __future__ import annotations

import html
import math
import textwrap
from dataclasses import dataclass, field

import numpy as np

from . import _adapt, _core
from .bands import expected_band

PCTS_KLD = [("max", 100), ("p99.9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("median", 50),
            ("p10", 10), ("p5", 5), ("p1", 1), ("p0.1", 0.1), ("min", 0)]
PCTS_DP = [("max", 100), ("p99.9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("p75", 75),
           ("median", 50), ("p25", 25), ("p10", 10), ("p5", 5), ("p1", 1), ("p0.1", 0.1), ("min", 0)]


def _mean_unc(x):
    """llama.cpp's mean_and_uncertainty: mean and sqrt(var / (n - 1)) (None when n < 2)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _unc(x.size, float(np.sum(x)), float(np.sum(x * x)))


def _dist(x, pcts, scale=1.0):
    m, u = _mean_unc(x)
    out = {"mean": m * scale, "stderr": None if u is None else u * scale}
    vals = np.percentile(x, [p for _, p in pcts]) if np.isfinite(x).all() else _pct_inf(x, pcts)
    vals = vals * scale
    out.update({k: float(v) for (k, _), v in zip(pcts, vals)})
    return out


def _pct_inf(x, pcts):
    """numpy's 'linear' percentiles of data with +inf values (numpy itself gives NaN for
    0 * inf): a rank that is, or interpolates towards, an inf value is inf."""
    xs = np.sort(x)
    k = np.array([p for _, p in pcts]) / 100 * (xs.size - 1)
    lo, hi = np.floor(k).astype(np.intp), np.ceil(k).astype(np.intp)
    t, a, b = k - lo, xs[lo], xs[hi]
    with np.errstate(invalid="ignore"):  # numpy's lerp, in its two halves
        v = np.where(t == 0, a, np.where(t < 0.5, a + (b - a) * t, b - (b - a) * (1 - t)))
    v[np.isnan(v)] = np.inf
    return v


def _default_block(n):
    return int(min(512, max(1, round(math.sqrt(n)))))


def _blocks(d, block_size):
    """Per-block sums and token counts of d over blocks of consecutive tokens."""
    starts = np.arange(0, d.size, block_size)
    return np.add.reduceat(d, starts), np.diff(np.append(starts, d.size)).astype(np.float64)


def _bootstrap(d, block_size, n_boot, seed, confidence):
    """Paired block bootstrap of mean(d), d = nll_Q - nll_O per token, in token order."""
    num, den = _blocks(d, block_size)
    return _bootstrap_blocks(num, den, float(d.mean()), n_boot, seed, confidence)


def _bootstrap_blocks(num, den, mean, n_boot, seed, confidence):
    if num.size < 2 or n_boot < 1 or np.isnan(num).any():
        return {"ci": [None, None], "stderr": None, "p_value": None, "n_blocks": int(num.size)}
    if not np.isfinite(num).all():  # +inf: a token the quantized model gives probability 0
        return {"ci": [math.inf, math.inf], "stderr": None, "p_value": 1 / (int(n_boot) + 1),
                "n_blocks": int(num.size)}
    reps = _core.block_bootstrap(num, den, int(n_boot), int(seed) & (2 ** 64 - 1))
    a = (1 - confidence) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    # two-sided bootstrap test of mean(d) = 0: replicates re-centred on the null
    p = (np.count_nonzero(np.abs(reps - mean) >= abs(mean)) + 1) / (reps.size + 1)
    return {"ci": [float(lo), float(hi)], "stderr": float(np.std(reps, ddof=1)), "p_value": float(p),
            "n_blocks": int(num.size)}


def _verdict(ci):
    lo, hi = ci
    if lo is None:
        return "undetermined (too few tokens for a confidence interval)"
    if lo > 0:
        return "significant degradation"
    if hi < 0:
        return "significant improvement"
    return "no significant change"


def _label_codes(labels):
    """(names, codes) of per-token group labels, compared as str(label) (so 1 and "1" are one
    group, as in the report's keys), names in order of first appearance."""
    if labels.dtype.kind not in "biuUS":  # floats, objects, mixtures: compare their str()
        labels = np.array([str(v) for v in labels.tolist()], dtype=str)
    uniq, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first)  # names in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    names = [str(u) for u in uniq[order].tolist()]
    return names, rank[inv.reshape(-1)].astype(np.intp)


def _group_codes(groups, n, keep=None):
    """(names, codes) from per-token labels or {name: slice | (start, stop) | indices | mask}.
    With ``keep`` (scored positions of logits), dict selections index positions and per-position
    labels are dropped in step with the ignored targets."""
    n_pos = n if keep is None else keep.size
    if isinstance(groups, dict):
        codes = np.full(n_pos, -1, dtype=np.intp)
        names = []
        for i, (name, sel) in enumerate(groups.items()):
            if isinstance(sel, tuple) and len(sel) == 2:
                sel = slice(*sel)
            idx = np.arange(n_pos)[sel]
            if np.any(codes[idx] >= 0):
                raise ValueError(f"group {name!r} overlaps another group")
            codes[idx] = i
            if str(name) in names:
                raise ValueError(f"two groups are named {str(name)!r} (labels are compared as str())")
            names.append(str(name))
        if np.any(codes < 0):
            raise ValueError(f"{int(np.count_nonzero(codes < 0))} tokens belong to no group")
        return names, (codes if keep is None else codes[keep])
    labels = (np.asarray(groups) if isinstance(groups, (list, tuple))
              else _adapt.as_array(groups, "groups")).reshape(-1)
    if keep is not None and labels.size == n_pos:
        labels = labels[keep]
    if labels.size != n:
        raise ValueError(f"groups has {labels.size} labels for {n} tokens (one label per token, "
                         "or a dict of name -> slice/(start, stop)/indices)")
    return _label_codes(labels)


@dataclass
class Report:
    """Everything ppldelta.analyze measured.  ``to_dict()`` is JSON-ready; ``str()`` reads
    like llama.cpp's final block; ``_repr_html_`` renders in notebooks."""

    data: dict = field(repr=False)

    def __post_init__(self):  # one headline for every path that builds a report (analyze, Accumulator)
        self.data.setdefault("suffers_most_significant", _groups_apart(self.data))
        self.data.setdefault("verdict", _headline(self.data))

    @property
    def reference(self) -> dict:
        """The reference's five fields, unchanged (ppldelta.perplexity_delta)."""
        return self.data["reference"]

    def __getitem__(self, key):
        return self.data[key]

    def to_dict(self) -> dict:
        return self.data

    # ------------------------------------------------------------------ rendering
    def _lines(self):
        d = self.data
        r = d["reference"]
        pm = "\u00b1"

        def f(v, u=None, fmt="{:10.6f}"):
            s = fmt.format(v)
            return s + (f" {pm} " + fmt.format(u).strip() if u is not None else "")

        if d.get("verdict"):
            yield ("Verdict", None)
            yield ("verdict", d["verdict"]["headline"])
            yield ("why", d["verdict"]["reason"])
        yield ("Perplexity delta", None)
        for k in ("original_perplexity", "quantized_perplexity", "absolute_delta", "relative_delta_pct"):
            yield (k, f"{r[k]}")
        yield ("quality", r["quality"])
        yield ("tokens", f"{d['n_tokens']:,}")
        c = d["confidence"]
        rb = d["ppl_ratio"]
        ci = rb["ci"]
        if ci[0] is not None:
            yield (f"PPL ratio {c:.0%} CI (block bootstrap)",
                   f"[{ci[0]:.6f}, {ci[1]:.6f}]  ({d['significance']['verdict']}, p {_p_eq(d['significance']['p_value'])})")
        if d.get("expected"):
            e = d["expected"]
            yield (f"expected band ({e['format']})", f"{e['band'][0]:.4f}-{e['band'][1]:.4f}{'+' if e['open_ended'] else ''}: {e['verdict']}")
        yield ("llama.cpp statistics", None)
        yield ("Mean PPL(Q)", f(d["ppl"]["quantized"]["value"], d["ppl"]["quantized"]["stderr"]))
        yield ("Mean PPL(base)", f(d["ppl"]["original"]["value"], d["ppl"]["original"]["stderr"]))
        if d["correlation"] is not None:
            yield ("Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * d['correlation']:6.2f}%")
        yield ("Mean ln(PPL(Q)/PPL(base))", f(d["ln_ppl_ratio"]["value"], d["ln_ppl_ratio"]["stderr"]))
        yield ("Mean PPL(Q)/PPL(base)", f(rb["value"], rb["stderr"]))
        yield ("Mean PPL(Q)-PPL(base)", f(d["ppl_diff"]["value"], d["ppl_diff"]["stderr"]))
        if d.get("kld"):
            k = d["kld"]
            yield ("Mean    KLD", f(k["mean"], k["stderr"]))
            for key, _ in PCTS_KLD:
                yield (f"{key:<6}  KLD", f(k[key]))
        if d.get("kld_reverse"):
            yield ("Mean KLD(Q||base)", f(d["kld_reverse"]["mean"], d["kld_reverse"]["stderr"]))
        dp = d["delta_p"]
        yield ("Mean    \u0394p", f(dp["mean"], dp["stderr"], "{:8.3f}") + " %")
        for key, _ in PCTS_DP:
            yield (f"{key:<6}  \u0394p", f(dp[key], None, "{:8.3f}") + " %")
        yield ("RMS \u0394p", f(dp["rms"], dp["rms_stderr"], "{:8.3f}") + " %")
        if d.get("same_top1"):
            s = d["same_top1"]
            yield ("Same top p", f(s["pct"], s["stderr"], "{:6.3f}") + " %")
        for key in ("top1_in_top5", "top1_in_top10"):
            if d.get(key) is not None:
                yield (f"base top-1 in Q {key.split('_in_')[1].replace('top', 'top-')}", f"{d[key]:6.3f} %")
        for key in ("q_top1_in_base_top5", "q_top1_in_base_top10"):
            if d.get(key) is not None:
                yield (f"Q top-1 in base {key.split('_in_base_')[1].replace('top', 'top-')}", f"{d[key]:6.3f} %")
        if d.get("groups"):
            yield ("per group", None)
            for g, gd in d["groups"].items():
                gr = gd["reference"]
                gci = gd["ppl_ratio"]["ci"]
                cis = f" CI [{gci[0]:.4f}, {gci[1]:.4f}]" if gci[0] is not None else ""
                kl = f", KLD {gd['kld_mean']:.4f}" if gd.get("kld_mean") is not None else ""
                yield (f"{g} ({gd['n_tokens']:,} tokens)",
                       f"PPL {gr['original_perplexity']} -> {gr['quantized_perplexity']} "
                       f"({gr['relative_delta_pct']:+.2f} %, {gr['quality']}){cis}{kl}")
            yield ("suffers most", _suffers_most_line(d))

    def __str__(self):
        out = []
        for k, v in self._lines():
            # long values wrap under themselves, so the report fits 100 columns
            out.append(f"\n== {k} ==" if v is None else f"{k:<34}: " + ("\n" + " " * 36).join(
                textwrap.wrap(str(v), 64, break_on_hyphens=False) or [""]))
        return "\n".join(out).lstrip("\n")

    def to_markdown(self) -> str:
        out = []
        for k, v in self._lines():
            if v is None:
                out.append(f"\n**{k}**\n\n| statistic | value |\n|---|---|")
            else:
                out.append(f"| {k} | {v} |")
        return "\n".join(out).lstrip("\n")

    def _repr_html_(self):
        rows = []
        for k, v in self._lines():
            if v is None:
                rows.append(f"<tr><th colspan='2' style='text-align:left'>{html.escape(k)}</th></tr>")
            else:
                rows.append(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>")
        return "<table>" + "".join(rows) + "</table>"


_PER_TOKEN = ("kld", "kld_reverse", "same_top1", "top1_in_top5", "top1_in_top10")


def _as_f64(x, name="input"):
    """Flat float64 values of a per-token input, read through the one adapter."""
    a = _adapt.as_array(x, name)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} has dtype {a.dtype}: expected real numbers")
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _scored(x, name, keep):
    """x without the positions whose target is ignore_index, when it has one value per position
    (values per scored token are taken as they are)."""
    if x is None or keep is None or keep.all():
        return x
    a = _adapt.as_array(x, name)
    return a.reshape(-1)[keep] if a.size == keep.size else a


def _check_per_token(name, a, n):
    """One rule for analyze and Accumulator.update: NaN is a ValueError naming the index; a KL
    divergence may be +inf (it propagates to the mean and percentiles) but not -inf; the top-token
    agreements are flags (bool or 0/1)."""
    if a.size != n:
        raise ValueError(f"{name} has {a.size} values for {n} tokens")
    bad = np.isnan(a) | (a == -np.inf) if name.startswith("kld") else (a != 0) & (a != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if np.isnan(a[i]):
            raise ValueError(f"{name} contains NaN at index {i}")
        raise ValueError(f"{name}[{i}] = {float(a[i])!r} is not " + (
            "a KL divergence (>= 0)" if name.startswith("kld") else "a flag (a bool, 0 or 1)"))
    return a


def _prepare(original_log_probs, quantized_log_probs, groups, per_token, original_logits,
             quantized_logits, targets, ignore_index, reverse, chunk=False):
    """The inputs of analyze and Accumulator.update, read and checked in one place: log-probs
    (from the logits at the targets unless given), the per-token arrays, group labels, with the
    positions whose target is ignore_index dropped from all of them (and counted).  A ``chunk``
    (Accumulator.update) may have an original mean beyond exp's range: the total may not."""
    keep, cross = None, {}
    if original_logits is not None or quantized_logits is not None:
        if original_logits is None or quantized_logits is None:
            raise ValueError("pass both original_logits and quantized_logits")
        from .logits import kl_divergence

        kl = kl_divergence(original_logits, quantized_logits, targets=targets,
                           ignore_index=ignore_index, reverse=reverse)
        per_token = {"kld": kl["kld"], "kld_reverse": kl.get("kld_reverse"), "same_top1": kl["same_top1"],
                     "top1_in_top5": kl["top1_in_top5"], "top1_in_top10": kl["top1_in_top10"]}
        cross = {f"q_top1_in_base_top{k}": kl[f"quantized_top1_in_original_top{k}"] for k in (5, 10)}
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
    lp = []
    for x, name in ((original_log_probs, "original_log_probs"), (quantized_log_probs, "quantized_log_probs")):
        x = _scored(x, name, keep)
        lp.append(x if isinstance(x, (list, tuple)) else _adapt.as_array(x, name))
    overflow = None
    try:
        reference = _core.perplexity_delta(*lp)  # validates (messages of perplexity_delta)
    except ValueError as exc:  # raised after every check of the values passed
        if not (chunk and str(exc).startswith("the original model's perplexity overflows")):
            raise
        reference, overflow = None, exc
    lo, lq = (np.asarray(x, dtype=np.float64).reshape(-1) for x in lp)
    if overflow is not None and np.isneginf(lo).any():  # -inf: the total overflows too
        raise overflow
    n = lo.size
    extras = {k: _check_per_token(k, _as_f64(_scored(v, k, keep), k), n)
              for k, v in per_token.items() if v is not None}
    cross = {k: _as_f64(_scored(v, k, keep), k) for k, v in cross.items()}
    names, codes = _group_codes(groups, n, keep) if groups is not None else (None, None)
    return {"reference": reference, "lo": lo, "lq": lq, "n": n, "extras": extras, "cross": cross,
            "names": names, "codes": codes, "n_ignored": 0 if keep is None else int(keep.size - n)}


def analyze(original_log_probs, quantized_log_probs, *, groups=None, original_logits=None,
            quantized_logits=None, targets=None, ignore_index=-100, kld=None, kld_reverse=None,
            same_top1=None, top1_in_top5=None, top1_in_top10=None, reverse_kld=False,
            confidence=0.95, n_bootstrap=1000, block_size=None, seed=0, expected=None,
            protocol=None) -> Report:
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
    """
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    p = _prepare(original_log_probs, quantized_log_probs, groups,
                 dict(zip(_PER_TOKEN, (kld, kld_reverse, same_top1, top1_in_top5, top1_in_top10))),
                 original_logits, quantized_logits, targets, ignore_index, reverse_kld)
    lo, lq, n, extras = p["lo"], p["lq"], p["n"], p["extras"]
    nll_o, nll_q = -lo, -lq
    d = nll_q - nll_o  # +inf where the quantized log-prob is -inf (the original's is finite)
    bs = block_size or _default_block(n)
    boot = _bootstrap(d, bs, n_bootstrap, seed, confidence)
    dp = np.exp(lq) - np.exp(lo)
    data = {"reference": p["reference"], "n_tokens": int(n), "n_ignored": p["n_ignored"],
            "confidence": confidence, "protocol": protocol}
    with np.errstate(all="ignore"):
        data.update(_paired_stats(n, float(nll_o.sum()), float(nll_q.sum()), float((nll_o * nll_o).sum()),
                                  float((nll_q * nll_q).sum()), float((nll_o * nll_q).sum()), boot))
    data["bootstrap"] = {"n_bootstrap": int(n_bootstrap), "block_size": int(bs),
                         "n_blocks": boot["n_blocks"], "seed": seed}
    data["kld"] = _dist(extras["kld"], PCTS_KLD) if "kld" in extras else None
    if "kld_reverse" in extras:
        data["kld_reverse"] = _dist(extras["kld_reverse"], PCTS_KLD)
    data["delta_p"] = _delta_p_extra(_dist(dp, PCTS_DP, 100.0), n, float((dp * dp).sum()),
                                     float((dp ** 4).sum()))
    data["same_top1"] = _rate(n, float(extras["same_top1"].sum())) if "same_top1" in extras else None
    for key in ("top1_in_top5", "top1_in_top10"):
        data[key] = 100 * float(extras[key].mean()) if key in extras else None
    for key, arr in p["cross"].items():  # the other direction, when computed from logits
        data[key] = 100 * float(np.mean(arr))
    data["groups"] = None
    data["suffers_most"] = None
    if groups is not None:
        names, codes = p["names"], p["codes"]
        counts, sums_o = _core.segment_sums(codes, len(names), lo)
        _, sums_q = _core.segment_sums(codes, len(names), lq)
        gout = {}
        for g, name in enumerate(names):
            if counts[g] == 0:  # a dict group whose positions were all ignored
                continue
            sel = codes == g
            gb = _bootstrap(d[sel], min(bs, max(1, int(counts[g]) // 2)), n_bootstrap, seed + g + 1, confidence)
            gout[name] = _group_entry(
                name, int(counts[g]), float(sums_o[g]), float(sums_q[g]), gb,
                float(extras["kld"][sel].mean()) if "kld" in extras else None,
                100 * float(extras["same_top1"][sel].mean()) if "same_top1" in extras else None)
        data["groups"] = gout
        data["suffers_most"] = max(gout, key=lambda k: gout[k]["reference"]["relative_delta_pct"])
    data["expected"] = _expected(expected, data["ppl_ratio"]["value"], data["ppl_ratio"]["ci"])
    return Report(data)


def _reference_from_sums(so: float, sq: float, n: int, where: str = "") -> dict:
    """The reference's formulas on exactly rounded sums (so a group's dict equals
    perplexity_delta run on that group alone, errors included)."""
    ppl_orig = _exp(-(so / n))
    if math.isinf(ppl_orig):  # perplexity_delta's message
        raise ValueError(f"{where}the original model's perplexity overflows a float (mean log-prob "
                         f"{so / n:.17g}): original_log_probs contains -inf or its mean is below "
                         "-709.78, so a relative delta is undefined")
    ppl_quant = _exp(-(sq / n))
    absolute = ppl_quant - ppl_orig
    relative = (absolute / ppl_orig) * 100 if ppl_orig > 0 else 0.0
    quality = ("excellent" if relative < 1.0 else "good" if relative < 5.0
               else "acceptable" if relative < 10.0 else "poor")
    return {"original_perplexity": round(ppl_orig, 4), "quantized_perplexity": round(ppl_quant, 4),
            "absolute_delta": round(absolute, 4), "relative_delta_pct": round(relative, 4),
            "quality": quality}


def _fin(x):
    """x, or None where a standard error or correlation is undefined (inf or NaN)."""
    return x if x is not None and math.isfinite(x) else None


def _unc(n, s1, s2):
    """llama.cpp's mean_and_uncertainty from the count, sum and sum of squares (the uncertainty
    is None when n < 2 or the values are not all finite)."""
    m = s1 / n
    if n < 2 or not (math.isfinite(m) and math.isfinite(s2)):
        return m, None
    return m, math.sqrt(max(s2 / n - m * m, 0.0) / (n - 1))


def _exp(x):
    """math.exp, inf where it overflows (as C's exp)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _paired_stats(n, so, sq, soo, sqq, soq, boot):
    """llama.cpp's paired statistics from the moments of nll_o and nll_q (sums of values,
    squares and products) and a bootstrap result.  An infinite PPL(Q) (a -inf log-prob, or a
    mean beyond exp's range) gives inf values, and None for the errors that are then undefined."""
    mo, uo = _unc(n, so, soo)
    mq, uq = _unc(n, sq, sqq)
    cov = _fin(((soq / n) - mo * mq) / (n - 1)) if (uo is not None and uq is not None) else None
    ppl_o, ppl_q = _exp(mo), _exp(mq)
    ppl_o_unc = _fin(ppl_o * uo) if uo is not None else None
    ppl_q_unc = _fin(ppl_q * uq) if uq is not None else None
    cor = _fin(cov / (uo * uq)) if (cov is not None and uo and uq) else None
    ln_ratio = mq - mo
    ln_ratio_unc = _fin(math.sqrt(max(uq * uq + uo * uo - 2 * cov, 0.0))) if cov is not None else None
    ratio = _exp(ln_ratio)
    diff_unc = None
    if cov is not None and ppl_o_unc is not None and ppl_q_unc is not None:
        diff_unc = _fin(math.sqrt(max(ppl_q_unc * ppl_q_unc + ppl_o_unc * ppl_o_unc - 2 * ppl_o * ppl_q * cov, 0.0)))
    z_p = math.erfc(abs(ln_ratio) / ln_ratio_unc / math.sqrt(2)) if ln_ratio_unc else None
    return {
        "ppl": {"original": {"value": ppl_o, "stderr": ppl_o_unc},
                "quantized": {"value": ppl_q, "stderr": ppl_q_unc}},
        "correlation": cor,
        "ln_ppl_ratio": {"value": ln_ratio, "stderr": ln_ratio_unc, "ci": boot["ci"],
                         "bootstrap_stderr": boot["stderr"]},
        "ppl_ratio": {"value": ratio, "stderr": _fin(ratio * ln_ratio_unc) if ln_ratio_unc is not None else None,
                      "ci": _exp_ci(boot["ci"])},
        "ppl_diff": {"value": ppl_q - ppl_o, "stderr": diff_unc},
        "significance": {"verdict": _verdict(boot["ci"]), "p_value": boot["p_value"], "z_p_value": z_p},
    }


def _exp_ci(ci):
    """The ratio's interval from the ln-ratio's: bounds beyond the float range are inf."""
    return [_exp(c) if c is not None else None for c in ci]


def _delta_p_extra(dist, n, s2, s4):
    """RMS Δp and its error (llama.cpp: 0.5 / rms * uncertainty of the mean square), in %."""
    mse, mse_unc = _unc(n, s2, s4)
    rms = math.sqrt(mse)
    dist["rms"] = 100 * rms
    dist["rms_stderr"] = (100 * 0.5 / rms * mse_unc) if (mse_unc is not None and rms > 0) else None
    return dist


def _rate(n, hits):
    p = hits / n
    return {"pct": 100 * p, "stderr": 100 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None}


def _expected(expected, ratio, ci):
    if expected is None:
        return None
    band = expected_band(expected)
    return {"format": expected, "band": [band.low, band.high], "open_ended": band.open_ended,
            "acceptable": band.acceptable, "ratio": ratio, "verdict": band.verdict(ratio),
            "ci_verdict": None if ci[0] is None else
            ("worse than expected" if band.verdict(ci[0]) == "worse than expected" else
             "better than expected" if band.verdict(ci[1]) == "better than expected" else
             "consistent with the band")}


def _group_entry(name, n, so, sq, boot, kld_mean=None, same_pct=None):
    mean_d = (so - sq) / n  # mean of nll_q - nll_o
    return {"n_tokens": int(n), "reference": _reference_from_sums(so, sq, n, f"group {name!r}: "),
            "ln_ppl_ratio": {"value": mean_d, "ci": boot["ci"]},
            "ppl_ratio": {"value": _exp(mean_d), "ci": _exp_ci(boot["ci"])},
            "significance": _verdict(boot["ci"]), "kld_mean": kld_mean, "same_top1_pct": same_pct}


# ---------------------------------------------------------------- the report's headline and wording
_LOSS = {"excellent": "negligible loss", "good": "small loss", "acceptable": "clear loss", "poor": "large loss"}


def _p_eq(p):
    """'= 0.0123', or '< 0.001' below 0.001 (a bootstrap of 1,000 replicates reports 1/1001 at least)."""
    return "n/a" if p is None else "< 0.001" if p < 0.001 else f"= {p:.3g}"


def _pct(ratio):
    """A PPL ratio as a signed relative change in percent."""
    x = (ratio - 1) * 100
    return f"{x:+.2f} %" if abs(x) < 1e4 else f"{x:+.3g} %"


def _groups_apart(d):
    """Whether the group that suffers most differs significantly from every other group: its CI of
    the PPL ratio lies entirely above theirs (None without two groups with CIs)."""
    g, worst = d.get("groups"), d.get("suffers_most")
    if not g or worst is None or len(g) < 2:
        return None
    lo = g[worst]["ppl_ratio"]["ci"][0]
    his = [v["ppl_ratio"]["ci"][1] for k, v in g.items() if k != worst]
    if lo is None or None in his:
        return None
    return bool(all(lo > h for h in his))


def _suffers_most_line(d):
    worst, apart = d["suffers_most"], d.get("suffers_most_significant")
    if apart:
        return f"{worst} (its CI lies above every other group's)"
    why = "CIs overlap" if apart is False else "no CIs"
    return f"no group significantly ({why}; highest point estimate: {worst})"


def _headline(d):
    """{'headline', 'reason'}: the size of the loss (the reference's quality band, when the
    bootstrap CI excludes no change), and where the CI lies against the format's published band."""
    ratio, ci, q = d["ppl_ratio"]["value"], d["ppl_ratio"]["ci"], d["reference"]["quality"]
    if ci[0] is None:
        loss, why = f"{q} (no confidence interval)", f"PPL {_pct(ratio)}, too few tokens for a confidence interval"
    else:
        span = f"PPL {_pct(ratio)}, {d['confidence']:.0%} CI {_pct(ci[0])} to {_pct(ci[1])}, " \
               f"p {_p_eq(d['significance']['p_value'])}"
        if ci[0] > 1:
            loss, why = _LOSS[q], f"{span}: a real loss, '{q}' by the 1/5/10 % thresholds"
        elif ci[1] < 1:
            loss, why = "no loss (measurably better)", f"{span}: the quantized model predicts better"
        else:
            loss = "no measurable loss" if q in ("excellent", "good") else "inconclusive"
            why = f"{span}: the CI includes no change"
    e = d.get("expected")
    if not e:
        return {"headline": loss, "reason": why}
    band = expected_band(e["format"])
    lo, hi = (ratio, ratio) if ci[0] is None else ci
    where = ("worse than expected" if lo > band.high else "better than expected" if hi < band.low
             else "as expected")
    why += f"; published for {band.format}: PPL {_pct(band.low)} to {_pct(band.high)}"
    k = d.get("kld")
    if k and band.kld:
        why += f", mean KLD {_span(band.kld, '{:.4g}')} (here {k['mean']:.4g})"
    s = d.get("same_top1")
    if s and band.same_top1:
        why += f", same top-1 {_span(band.same_top1, '{:.1f}')} % (here {s['pct']:.1f} %)"
    return {"headline": f"{loss}, {where}", "reason": why}


def _span(rng, fmt):
    lo, hi = (fmt.format(v) for v in rng)
    return lo if lo == hi else f"{lo}-{hi}"
