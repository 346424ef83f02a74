"""ppldelta.Accumulator: the analysis of ppldelta.analyze for data larger than memory or split
across workers.

Sums are kept exactly, as integers: every float64 is m * 2^e with an integer mantissa, so a sum
is an integer multiple of 2^-1127 and adding integers is exact and associative.  Merging
accumulators in any order therefore gives bit-for-bit the numbers of one pass, and the reference
dict equals ppldelta.perplexity_delta on the concatenated data.  Percentiles of KLD and Δp come
from fixed histograms (KLD: 100 log-spaced bins per decade from 1e-12 to 1e3, relative error
< 2.4 %; Δp: bins of 1e-4), with exact minimum and maximum.  Bootstrap blocks are formed within
each update() call (documents or windows are natural blocks) and sorted canonically before
resampling, and groups are reported in sorted order, so nothing depends on the merge order.
"""
from __future__ import annotations

import math

import numpy as np

from . import _core
from .analysis import (PCTS_DP, PCTS_KLD, Report, _bootstrap_blocks, _delta_p_extra, _expected,
                       _group_entry, _paired_stats, _rate, _reference_from_sums, _unc)

_SHIFT = 1127  # 2^-1127 divides every float64 (smallest subnormal 2^-1074 = 2^52 * 2^-1126)
_KLD_EDGES = np.concatenate([[0.0], np.logspace(-12, 3, 1501)])
_DP_EDGES = np.linspace(-1.0, 1.0, 20001)
_SUMS = ("lo", "lq", "oo", "qq", "oq", "dp", "dp2", "dp4", "kld", "kld2", "kldr", "kldr2")
_COUNTS = ("same", "top5", "top10")


def exact_sum(x) -> int:
    """sum(x) * 2^1127 as an exact Python integer (finite float64 values)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x = x[x != 0]
    total = 0
    for start in range(0, x.size, 1 << 25):  # keeps the float64 bincounts below 2^53
        m, e = np.frexp(x[start:start + (1 << 25)])
        mant = (m * 2.0 ** 53).astype(np.int64)
        hi = mant >> 26
        lo = mant - (hi << 26)
        exps, inv = np.unique(e.astype(np.int64) + 1074, return_inverse=True)
        h = np.bincount(inv.reshape(-1), weights=hi.astype(np.float64))
        low = np.bincount(inv.reshape(-1), weights=lo.astype(np.float64))
        for s, hs, ls in zip(exps.tolist(), h.tolist(), low.tolist()):
            total += ((int(hs) << 26) + int(ls)) << s
    return total


def _to_float(v: int) -> float:
    return v / (1 << _SHIFT)  # Python's int / int is correctly rounded


def _hist_percentiles(hist, edges, n, lo, hi, pcts, log):
    """Percentiles (numpy 'linear' ranks) from a histogram, interpolated within the bin."""
    cum = np.cumsum(hist)
    out = {}
    for key, p in pcts:
        if p == 0:
            out[key] = lo
            continue
        if p == 100:
            out[key] = hi
            continue
        k = p / 100 * (n - 1)
        b = int(np.searchsorted(cum, k, side="right"))
        b = min(b, hist.size - 1)
        before = cum[b - 1] if b > 0 else 0
        frac = (k - before + 0.5) / max(hist[b], 1)
        a, z = edges[b], edges[b + 1]
        v = (a * (z / a) ** frac) if (log and a > 0) else a + (z - a) * frac
        out[key] = float(min(max(v, lo), hi))
    return out


class Accumulator:
    """Streaming state of an analysis: ``update`` with chunks, ``merge`` with other workers'
    accumulators, ``state_dict``/``from_state`` to ship or checkpoint, ``report`` at the end."""

    def __init__(self, *, block_size: int = 256):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = int(block_size)
        self.n = 0
        self.sums = dict.fromkeys(_SUMS, 0)
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.neginf = {"o": 0, "q": 0}
        self.has = None  # which optional per-token arrays the updates carry
        self.hist = {"kld": np.zeros(_KLD_EDGES.size - 1, np.int64),
                     "kldr": np.zeros(_KLD_EDGES.size - 1, np.int64),
                     "dp": np.zeros(_DP_EDGES.size - 1, np.int64)}
        self.minmax = {k: [math.inf, -math.inf] for k in self.hist}
        self.blocks = [np.zeros(0), np.zeros(0)]
        self.groups = {}

    # ------------------------------------------------------------------ update
    def update(self, original_log_probs=None, quantized_log_probs=None, *, groups=None, kld=None,
               kld_reverse=None, same_top1=None, top1_in_top5=None, top1_in_top10=None,
               original_logits=None, quantized_logits=None, targets=None):
        """Add a chunk of tokens (same arguments as ppldelta.analyze)."""
        if original_logits is not None or quantized_logits is not None:
            from .logits import kl_divergence

            kl = kl_divergence(original_logits, quantized_logits, targets=targets,
                               reverse=kld_reverse is not None or (self.has or {}).get("kldr", False))
            kld, same_top1 = kl["kld"], kl["same_top1"]
            top1_in_top5, top1_in_top10 = kl["top1_in_top5"], kl["top1_in_top10"]
            kld_reverse = kl.get("kld_reverse")
            if original_log_probs is None and targets is not None:
                original_log_probs, quantized_log_probs = kl["original_log_probs"], kl["quantized_log_probs"]
        _core.perplexity_delta(original_log_probs, quantized_log_probs)  # validation, messages
        lo = np.asarray(original_log_probs, dtype=np.float64).reshape(-1)
        lq = np.asarray(quantized_log_probs, dtype=np.float64).reshape(-1)
        n = lo.size
        extra = {"kld": kld, "kldr": kld_reverse, "same": same_top1, "top5": top1_in_top5,
                 "top10": top1_in_top10}
        has = {k: v is not None for k, v in extra.items()}
        if self.has is None:
            self.has = has
        elif has != self.has:
            raise ValueError(f"every update must carry the same per-token arrays: first had "
                             f"{sorted(k for k, v in self.has.items() if v)}, this one "
                             f"{sorted(k for k, v in has.items() if v)}")
        arrs = {}
        for k, v in extra.items():
            if v is not None:
                a = np.asarray(v, dtype=np.float64).reshape(-1)
                if a.size != n:
                    raise ValueError(f"{k} has {a.size} values for {n} tokens")
                arrs[k] = a
        fo, fq = np.isfinite(lo), np.isfinite(lq)
        self.neginf["o"] += int(n - fo.sum())
        self.neginf["q"] += int(n - fq.sum())
        lo_f, lq_f = np.where(fo, lo, 0.0), np.where(fq, lq, 0.0)
        s = self.sums
        s["lo"] += exact_sum(lo_f)
        s["lq"] += exact_sum(lq_f)
        s["oo"] += exact_sum(lo_f * lo_f)
        s["qq"] += exact_sum(lq_f * lq_f)
        s["oq"] += exact_sum(lo_f * lq_f)
        dp = np.exp(lq) - np.exp(lo)
        s["dp"] += exact_sum(dp)
        s["dp2"] += exact_sum(dp * dp)
        s["dp4"] += exact_sum(dp ** 4)
        self._hist("dp", dp, _DP_EDGES)
        for k, sk in (("kld", "kld"), ("kldr", "kldr")):
            if k in arrs:
                s[sk] += exact_sum(arrs[k])
                s[sk + "2"] += exact_sum(arrs[k] ** 2)
                self._hist(k, arrs[k], _KLD_EDGES)
        for k in _COUNTS:
            if k in arrs:
                self.counts[k] += int(np.count_nonzero(arrs[k]))
        self.n += n
        d = lo - lq  # nll_q - nll_o
        self._add_blocks(self.blocks, d)
        if groups is not None:
            labels = np.asarray(groups).reshape(-1)
            if labels.size != n:
                raise ValueError(f"groups has {labels.size} labels for {n} tokens")
            for name in dict.fromkeys(labels.tolist()):
                sel = labels == name
                g = self.groups.setdefault(str(name), {"n": 0, "lo": 0, "lq": 0, "kld": 0, "same": 0,
                                                       "blocks": [np.zeros(0), np.zeros(0)]})
                g["n"] += int(sel.sum())
                g["lo"] += exact_sum(lo_f[sel])
                g["lq"] += exact_sum(lq_f[sel])
                if "kld" in arrs:
                    g["kld"] += exact_sum(arrs["kld"][sel])
                if "same" in arrs:
                    g["same"] += int(np.count_nonzero(arrs["same"][sel]))
                self._add_blocks(g["blocks"], d[sel])
        return self

    def _hist(self, key, x, edges):
        self.hist[key] += np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)[0]
        mm = self.minmax[key]
        mm[0], mm[1] = min(mm[0], float(x.min())), max(mm[1], float(x.max()))

    def _add_blocks(self, blocks, d):
        if d.size == 0:
            return
        starts = np.arange(0, d.size, self.block_size)
        with np.errstate(invalid="ignore"):
            num = np.add.reduceat(d, starts)
        den = np.diff(np.append(starts, d.size)).astype(np.float64)
        blocks[0] = np.concatenate([blocks[0], num])
        blocks[1] = np.concatenate([blocks[1], den])

    # ------------------------------------------------------------------ merge / state
    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add another accumulator's tokens to this one (in place; returns self)."""
        if other.block_size != self.block_size:
            raise ValueError(f"block sizes differ: {self.block_size} and {other.block_size}")
        if other.n == 0:
            return self
        if self.has is not None and other.has != self.has:
            raise ValueError("the accumulators carry different per-token arrays")
        self.has = other.has if self.has is None else self.has
        self.n += other.n
        for k in _SUMS:
            self.sums[k] += other.sums[k]
        for k in _COUNTS:
            self.counts[k] += other.counts[k]
        for k in self.neginf:
            self.neginf[k] += other.neginf[k]
        for k in self.hist:
            self.hist[k] = self.hist[k] + other.hist[k]
            a, b = self.minmax[k], other.minmax[k]
            self.minmax[k] = [min(a[0], b[0]), max(a[1], b[1])]
        self.blocks = [np.concatenate([self.blocks[i], other.blocks[i]]) for i in range(2)]
        for name, og in other.groups.items():
            g = self.groups.setdefault(name, {"n": 0, "lo": 0, "lq": 0, "kld": 0, "same": 0,
                                              "blocks": [np.zeros(0), np.zeros(0)]})
            for k in ("n", "lo", "lq", "kld", "same"):
                g[k] += og[k]
            g["blocks"] = [np.concatenate([g["blocks"][i], og["blocks"][i]]) for i in range(2)]
        return self

    def state_dict(self) -> dict:
        """JSON-serialisable state (exact integers as hex strings)."""
        return {
            "version": 1, "block_size": self.block_size, "n": self.n, "has": self.has,
            "sums": {k: hex(v) for k, v in self.sums.items()}, "counts": dict(self.counts),
            "neginf": dict(self.neginf),
            "hist": {k: {"nonzero": np.flatnonzero(v).tolist(), "counts": v[v != 0].tolist()}
                     for k, v in self.hist.items()},
            "minmax": {k: list(v) for k, v in self.minmax.items()},
            "blocks": [b.tolist() for b in self.blocks],
            "groups": {name: {"n": g["n"], "lo": hex(g["lo"]), "lq": hex(g["lq"]), "kld": hex(g["kld"]),
                              "same": g["same"], "blocks": [b.tolist() for b in g["blocks"]]}
                       for name, g in self.groups.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> "Accumulator":
        if state.get("version") != 1:
            raise ValueError(f"unknown Accumulator state version {state.get('version')!r}")
        acc = cls(block_size=state["block_size"])
        acc.n, acc.has = state["n"], state["has"]
        acc.sums = {k: int(v, 16) for k, v in state["sums"].items()}
        acc.counts = dict(state["counts"])
        acc.neginf = dict(state["neginf"])
        for k, h in state["hist"].items():
            acc.hist[k][np.asarray(h["nonzero"], dtype=np.intp)] = h["counts"]
        acc.minmax = {k: list(v) for k, v in state["minmax"].items()}
        acc.blocks = [np.asarray(b, dtype=np.float64) for b in state["blocks"]]
        acc.groups = {name: {"n": g["n"], "lo": int(g["lo"], 16), "lq": int(g["lq"], 16),
                             "kld": int(g["kld"], 16), "same": g["same"],
                             "blocks": [np.asarray(b, dtype=np.float64) for b in g["blocks"]]}
                      for name, g in state["groups"].items()}
        return acc

    # ------------------------------------------------------------------ report
    def _sum(self, key):
        return _to_float(self.sums[key])

    def report(self, *, confidence=0.95, n_bootstrap=1000, seed=0, expected=None, protocol=None) -> Report:
        """The analysis of everything accumulated (structure of ppldelta.analyze's report)."""
        n = self.n
        if n == 0:
            raise ValueError("the accumulator is empty")
        so = -math.inf if self.neginf["o"] else self._sum("lo")
        sq = -math.inf if self.neginf["q"] else self._sum("lq")
        ref = _reference_from_sums(so, sq, n)
        if math.isinf(so):
            raise ValueError("the original model's perplexity is infinite (-inf log-probs): "
                             "the relative delta is undefined")
        boot = self._boot(self.blocks, (so - sq) / n, n_bootstrap, seed, confidence)
        data = {"reference": ref, "n_tokens": n, "confidence": confidence, "protocol": protocol}
        data.update(_paired_stats(n, -so, -sq, self._sum("oo"), self._sum("qq"), self._sum("oq"), boot))
        data["bootstrap"] = {"n_bootstrap": int(n_bootstrap), "block_size": self.block_size,
                             "n_blocks": boot["n_blocks"], "seed": seed}
        data["kld"] = self._dist("kld", "kld", _KLD_EDGES, PCTS_KLD, True) if self.has["kld"] else None
        if self.has["kldr"]:
            data["kld_reverse"] = self._dist("kldr", "kldr", _KLD_EDGES, PCTS_KLD, True)
        dp = self._dist("dp", "dp", _DP_EDGES, PCTS_DP, False)
        dp = {k: (None if v is None else 100 * v) for k, v in dp.items()}
        data["delta_p"] = _delta_p_extra(dp, n, self._sum("dp2"), self._sum("dp4"))
        data["same_top1"] = _rate(n, self.counts["same"]) if self.has["same"] else None
        data["top1_in_top5"] = 100 * self.counts["top5"] / n if self.has["top5"] else None
        data["top1_in_top10"] = 100 * self.counts["top10"] / n if self.has["top10"] else None
        data["groups"] = None
        data["suffers_most"] = None
        if self.groups:
            gout = {}
            for i, name in enumerate(sorted(self.groups)):  # sorted: independent of merge order
                g = self.groups[name]
                go, gq = _to_float(g["lo"]), _to_float(g["lq"])
                gb = self._boot(g["blocks"], (go - gq) / g["n"], n_bootstrap, seed + i + 1, confidence)
                gout[name] = _group_entry(g["n"], go, gq, gb,
                                          _to_float(g["kld"]) / g["n"] if self.has["kld"] else None,
                                          100 * g["same"] / g["n"] if self.has["same"] else None)
            data["groups"] = gout
            data["suffers_most"] = max(gout, key=lambda k: gout[k]["reference"]["relative_delta_pct"])
        data["expected"] = _expected(expected, data["ppl_ratio"]["value"], data["ppl_ratio"]["ci"])
        return Report(data)

    def _boot(self, blocks, mean, n_boot, seed, confidence):
        order = np.lexsort((blocks[1], blocks[0]))  # canonical: independent of merge order
        return _bootstrap_blocks(blocks[0][order], blocks[1][order], mean, n_boot, seed, confidence)

    def _dist(self, hkey, skey, edges, pcts, log):
        n = self.n
        mean, unc = _unc(n, self._sum(skey), self._sum(skey + "2"))
        lo, hi = self.minmax[hkey]
        out = {"mean": mean, "stderr": unc}
        out.update(_hist_percentiles(self.hist[hkey], edges, n, lo, hi, pcts, log))
        return out
