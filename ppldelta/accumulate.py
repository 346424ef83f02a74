"""ppldelta.Accumulator: the analysis of ppldelta.analyze for data larger than memory or split
across workers.

Sums are kept exactly, as integers: every float64 is m * 2^e with an integer mantissa, so a sum
is an integer multiple of 2^-1127 and adding integers is exact and associative.  Merging
accumulators in any order therefore gives bit-for-bit the numbers of one pass, and the reference
dict equals ppldelta.perplexity_delta on the concatenated data.  Percentiles of KLD and Δp come
from fixed histograms (KLD: 100 log-spaced bins per decade from 1e-12 to 1e3, relative error
< 2.4 %, and one bin [0, 1e-12) read as 0, an absolute error below 1e-12; Δp: bins of 1e-4), with
exact minimum and maximum.  Bootstrap blocks are formed within
each update() call (documents or windows are natural blocks) and sorted canonically before
resampling, and groups are reported in sorted order, so nothing depends on the merge order.
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np

from . import paired
from ._core import POSITIVE_TOLERANCE
from .report import (DistMoments, GroupMoments, Histogram, Moments, Report, block_sums, build,
                     check_confidence, reference)

_SHIFT = 1127  # 2^-1127 divides every float64 (smallest subnormal 2^-1074 = 2^52 * 2^-1126)
_KLD_EDGES = np.concatenate([[0.0], np.logspace(-12, 3, 1501)])
_DP_EDGES = np.linspace(-1.0, 1.0, 20001)
_SUMS = ("lo", "lq", "oo", "qq", "oq", "dp", "dp2", "dp4", "kld", "kld2", "kldr", "kldr2")
_COUNTS = ("same", "top5", "top10", "qtop5", "qtop10")
_KEYS = dict(zip(paired.PER_TOKEN + tuple(paired.CROSS),  # analyze's names -> ours
                 ("kld", "kldr", "same", "top5", "top10", "qtop5", "qtop10")))
_NEW_IN_3 = ("qtop5", "qtop10")  # the quantized top-1 in the original's top 5 / 10 (from logits)
_BKEYS = dict(zip(paired.BOUNDS, ("kldlo", "kldhi", "kldrlo", "kldrhi")))  # KLD bounds (optional)


def exact_sum(x) -> int:
    """sum(x) * 2^1127 as an exact Python integer (finite float64 values)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ValueError("exact_sum needs finite values")
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
    try:
        return v / (1 << _SHIFT)  # Python's int / int is correctly rounded
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _bad(msg):
    raise ValueError(f"invalid Accumulator state: {msg}")


def _count(v, what, top=None):
    """A non-negative integer (at most ``top``)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0 or (
            top is not None and v > top):
        _bad(f"{what} must be an integer in [0, {'inf' if top is None else top}], got {v!r}")
    return int(v)


def _keys(d, what, required, optional=()):
    if not isinstance(d, dict):
        _bad(f"{what} must be a dict, got {type(d).__name__}")
    missing, extra = set(required) - set(d), set(d) - set(required) - set(optional)
    if missing or extra:
        _bad(f"{what}: missing keys {sorted(missing)}, unknown keys {sorted(extra)}")
    return d


def _hexint(v, what):
    try:
        if not isinstance(v, str):
            raise TypeError
        return int(v, 16)
    except (TypeError, ValueError):
        _bad(f"{what} must be a hex string, got {v!r}")


def _blocks_of(b, what, n):
    if not (isinstance(b, (list, tuple)) and len(b) == 2):
        _bad(f"{what} must be [block sums, block lengths]")
    try:
        num, den = (np.asarray(x, dtype=np.float64).reshape(-1) for x in b)
    except (TypeError, ValueError):
        _bad(f"{what} must hold numbers")
    if num.size != den.size or np.isnan(num).any() or (num == -np.inf).any():
        _bad(f"{what}: block sums must be as many as block lengths, and not NaN or -inf")
    if not (np.isfinite(den).all() and (den >= 1).all() and (den == np.round(den)).all()) or (
            den.sum() != n):
        _bad(f"{what}: block lengths must be integers >= 1 that add up to its {n} tokens")
    return [num, den]


def _float_of(v, what):
    """A number, or one of the strings state_dict() writes for infinities ("inf", "-inf")."""
    if isinstance(v, str) and v in ("inf", "-inf"):
        return float(v)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) or v != v:
        _bad(f"{what} must be a number (or 'inf' / '-inf'), got {v!r}")
    return float(v)


def _json_floats(values) -> list:
    """Floats for strict JSON: infinities as the strings "inf" / "-inf" (no NaN occurs here)."""
    return [v if math.isfinite(v) else ("inf" if v > 0 else "-inf") for v in map(float, values)]


def _hist_of(h, what, size, want):
    """A histogram of a state ({nonzero: bin indices, counts}) as ``size`` counts adding up to ``want``."""
    _keys(h, what, ("nonzero", "counts"))
    idx, cnt = h["nonzero"], h["counts"]
    if not (isinstance(idx, (list, tuple)) and isinstance(cnt, (list, tuple)) and len(idx) == len(cnt)):
        _bad(f"{what}: nonzero and counts must be lists of the same length")
    idx = [_count(i, f"{what} bin index", size - 1) for i in idx]
    cnt = [_count(c, f"{what} count", min(want, 2 ** 62)) for c in cnt]
    if len(set(idx)) != len(idx) or 0 in cnt:
        _bad(f"{what}: bin indices must be distinct, counts positive")
    if sum(cnt) != want:
        _bad(f"{what} counts add up to {sum(cnt)}, not {want}")
    full = np.zeros(size, np.int64)
    full[np.asarray(idx, dtype=np.intp)] = cnt
    return full


def _minmax_of(mm, what, want):
    """[min, max] of the values of a histogram holding ``want`` of them ([inf, -inf] for none)."""
    if not (isinstance(mm, (list, tuple)) and len(mm) == 2):
        _bad(f"{what} must be [min, max]")
    mm = [_float_of(v, what) for v in mm]
    if want and not (mm[0] <= mm[1] and mm[0] != math.inf and mm[1] != -math.inf):
        _bad(f"{what} = {mm} is not a [min, max] of values")
    return mm if want else [math.inf, -math.inf]


def _checked_state(state):
    """A copy of a state_dict() in memory form, every field checked: types, ranges, and the
    consistency updates guarantee (counts <= n, histograms summing to n, log-prob sums <= n *
    POSITIVE_TOLERANCE, sums of squares >= 0, nothing for arrays the updates did not carry)."""
    version = state.get("version") if isinstance(state, dict) else None
    if version not in (1, 2, 3):
        raise ValueError(f"unknown Accumulator state version {version!r}")
    old = () if version == 3 else _NEW_IN_3  # keys a version 1 / 2 state lacks (False / 0)
    base = ("version", "block_size", "n", "has", "sums", "counts", "neginf", "hist", "minmax",
            "blocks", "groups")
    _keys(state, "state", base + (("inf", "ignored") if version > 1 else ()), ("bounds",) if version > 1 else ())
    st = {"block_size": state["block_size"]}
    if isinstance(st["block_size"], bool) or not isinstance(st["block_size"], (int, np.integer)) or \
            st["block_size"] < 1:
        _bad(f"block_size must be an integer >= 1, got {st['block_size']!r}")
    n = st["n"] = _count(state["n"], "n")
    has = state["has"]
    if has is None and n == 0:
        has = dict.fromkeys(_KEYS.values(), False)
        st["has"] = None
    else:
        _keys(has, "has", [k for k in _KEYS.values() if k not in old])
        if not all(isinstance(v, (bool, np.bool_)) for v in has.values()):
            _bad("has must map to booleans")
        st["has"] = has = {**dict.fromkeys(old, False), **{k: bool(v) for k, v in has.items()}}
    st["ignored"] = _count(state.get("ignored", 0), "ignored")
    sums = {k: _hexint(v, f"sums[{k!r}]") for k, v in _keys(state["sums"], "sums", _SUMS).items()}
    inf = {k: [0, 0] for k in _SUMS}
    for k, v in _keys(state.get("inf", {}), "inf", (), _SUMS).items():
        if not (isinstance(v, (list, tuple)) and len(v) == 2):
            _bad(f"inf[{k!r}] must be [count of +inf, count of -inf]")
        inf[k] = [_count(c, f"inf[{k!r}]", n) for c in v]
    tol = n * POSITIVE_TOLERANCE * (1 + 1e-9)
    for k in ("lo", "lq"):
        if _to_float(sums[k]) > tol or inf[k][0]:
            _bad(f"sums[{k!r}] is positive beyond n * POSITIVE_TOLERANCE: log-probs are <= 0")
    for k in ("oo", "qq", "dp2", "dp4", "kld2", "kldr2"):
        if sums[k] < 0 or inf[k][1]:
            _bad(f"sums[{k!r}] is a sum of squares and cannot be negative")
    for k in ("dp", "dp2", "dp4"):
        if abs(_to_float(sums[k])) > 1.01 * n or any(inf[k]):
            _bad(f"sums[{k!r}]: every delta-p is in [-1, 1]")
    for arr, keys in (("kld", ("kld", "kld2")), ("kldr", ("kldr", "kldr2"))):
        if not has[arr] and any(sums[k] or any(inf[k]) for k in keys):
            _bad(f"sums[{keys[0]!r}] is non-zero but the updates carried no {arr}")
    st["sums"], st["inf"] = sums, inf
    counts = {**dict.fromkeys(old, 0), **_keys(state["counts"], "counts", [k for k in _COUNTS if k not in old])}
    st["counts"] = {k: _count(v, f"counts[{k!r}]", n if has[k] else 0) for k, v in counts.items()}
    st["neginf"] = {k: _count(v, f"neginf[{k!r}]", n)
                    for k, v in _keys(state["neginf"], "neginf", ("o", "q")).items()}
    st["hist"], st["minmax"] = {}, {}
    edges = {"kld": _KLD_EDGES, "kldr": _KLD_EDGES, "dp": _DP_EDGES}
    for k, h in _keys(state["hist"], "hist", edges).items():
        want = n if (k == "dp" or has[k]) else 0
        st["hist"][k] = _hist_of(h, f"hist[{k!r}]", edges[k].size - 1, want)
        mm = _minmax_of(state["minmax"].get(k) if isinstance(state["minmax"], dict) else None,
                        f"minmax[{k!r}]", want)
        st["minmax"][k] = mm
    _keys(state["minmax"], "minmax", edges)
    st["blocks"] = _blocks_of(state["blocks"], "blocks", n)
    if not isinstance(state["groups"], dict):
        _bad("groups must be a dict")
    st["groups"], total = {}, 0
    for name, g in state["groups"].items():
        what = f"groups[{name!r}]"
        if not isinstance(name, str):
            _bad(f"{what}: group names are strings")
        _keys(g, what, ("n", "lo", "lq", "kld", "same", "blocks") + (("inf",) if version > 1 else ()))
        gn = _count(g["n"], f"{what}['n']", n)
        if gn == 0:
            _bad(f"{what} has no tokens")
        total += gn
        gi = _keys(g.get("inf", {"q": 0, "kld": 0}), f"{what}['inf']", ("q", "kld"))
        out = {"n": gn, "lo": _hexint(g["lo"], f"{what}['lo']"), "lq": _hexint(g["lq"], f"{what}['lq']"),
               "kld": _hexint(g["kld"], f"{what}['kld']"), "same": _count(g["same"], f"{what}['same']", gn),
               "inf": {"q": _count(gi["q"], f"{what}['inf']['q']", gn),
                       "kld": _count(gi["kld"], f"{what}['inf']['kld']", gn)},
               "blocks": _blocks_of(g["blocks"], f"{what}['blocks']", gn)}
        tol_g = gn * POSITIVE_TOLERANCE * (1 + 1e-9)
        if _to_float(out["lo"]) > tol_g or _to_float(out["lq"]) > tol_g:
            _bad(f"{what}: a log-prob sum is positive beyond n * POSITIVE_TOLERANCE")
        if (out["kld"] or out["inf"]["kld"]) and not has["kld"] or out["same"] and not has["same"]:
            _bad(f"{what} has KLD or top-1 data that the updates did not carry")
        st["groups"][name] = out
    if total > n:
        _bad(f"the groups hold {total} tokens, more than n = {n}")
    st["bounds"] = _checked_bounds(state.get("bounds"), n, has)
    return st


def _checked_bounds(b, n, has):
    """The optional per-token KLD bounds of a state: {key: {sum, inf, hist, minmax}}."""
    if b is None:
        return None
    _keys(b, "bounds", (), _BKEYS.values())
    if set(b) not in ({"kldlo", "kldhi"}, {"kldrlo", "kldrhi"}, set(_BKEYS.values())) or (
            "kldlo" in b and not has["kld"]) or ("kldrlo" in b and not has["kldr"]):
        _bad("bounds come in (lo, hi) pairs, each with its KLD estimate")
    out = {}
    size = _KLD_EDGES.size - 1
    for k, e in b.items():
        what = f"bounds[{k!r}]"
        _keys(e, what, ("sum", "inf", "hist", "minmax"))
        full = _hist_of(e["hist"], f"{what}['hist']", size, n)
        inf = e["inf"]
        if not (isinstance(inf, (list, tuple)) and len(inf) == 2):
            _bad(f"{what}['inf'] must be [count of +inf, count of -inf]")
        out[k] = {"sum": _hexint(e["sum"], f"{what}['sum']"), "inf": [_count(c, f"{what}['inf']", n) for c in inf],
                  "hist": full, "minmax": _minmax_of(e["minmax"], f"{what}['minmax']", n)}
    return out


def _new_group():
    return {"n": 0, "lo": 0, "lq": 0, "kld": 0, "same": 0, "inf": {"q": 0, "kld": 0},
            "blocks": [np.zeros(0), np.zeros(0)]}


def _locked(method):
    """One thread at a time in the accumulator (the kernels release the GIL mid-update)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class Accumulator:
    """Streaming state of an analysis: ``update`` with chunks, ``merge`` with other workers'
    accumulators, ``state_dict``/``from_state`` to ship or checkpoint, ``report`` at the end.
    Safe to share between threads (each call holds the accumulator's lock; ``merge`` reads
    ``other`` without taking its lock: do not update it meanwhile)."""

    def __init__(self, *, block_size: int = 256):
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = int(block_size)
        self._lock = threading.RLock()
        self.n = 0
        self.sums = dict.fromkeys(_SUMS, 0)
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.neginf = {"o": 0, "q": 0}
        self.inf = {k: [0, 0] for k in _SUMS}  # terms +inf / -inf (left out of the exact sums)
        self.ignored = 0  # positions dropped because their target was ignore_index
        self.has = None  # which optional per-token arrays the updates carry
        self.hist = {"kld": np.zeros(_KLD_EDGES.size - 1, np.int64),
                     "kldr": np.zeros(_KLD_EDGES.size - 1, np.int64),
                     "dp": np.zeros(_DP_EDGES.size - 1, np.int64)}
        self.minmax = {k: [math.inf, -math.inf] for k in self.hist}
        self.blocks = [np.zeros(0), np.zeros(0)]
        self.groups = {}
        self.bounds = None  # per-token KLD bounds: {key: {sum, inf, hist, minmax}} for the keys carried

    def __getstate__(self):  # pickle / copy: everything but the lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ update
    @_locked
    def update(self, original_log_probs=None, quantized_log_probs=None, *, groups=None, kld=None,
               kld_reverse=None, same_top1=None, top1_in_top5=None, top1_in_top10=None,
               original_logits=None, quantized_logits=None, targets=None, ignore_index=-100,
               kld_bounds=None, kld_reverse_bounds=None):
        """Add a chunk of tokens (same arguments and checks as ppldelta.analyze).  A chunk that
        fails a check changes nothing."""
        p = paired.read(original_log_probs, quantized_log_probs, groups=groups,
                        per_token=dict(zip(paired.PER_TOKEN, (kld, kld_reverse, same_top1, top1_in_top5,
                                                              top1_in_top10)),
                                       **paired.bounds(kld, kld_bounds, kld_reverse, kld_reverse_bounds)),
                        original_logits=original_logits, quantized_logits=quantized_logits,
                        targets=targets, ignore_index=ignore_index,
                        reverse=kld_reverse is not None or (self.has or {}).get("kldr", False))
        m = paired.moments(p.lp)  # validates the log-probs (the messages of perplexity_delta)
        if m.n_neginf_o:  # a -inf original log-prob: the total's perplexity overflows too
            reference(m.sum_o, m.sum_q, m.n)
        lo, lq, n = p.lo, p.lq, p.n
        arrs = {_KEYS[k]: v for k, v in p.extras.items() if k in _KEYS}
        has = {k: k in arrs for k in _KEYS.values()}
        if self.has is not None and has != self.has:
            raise ValueError(f"every update must carry the same per-token arrays: first had "
                             f"{sorted(k for k, v in self.has.items() if v)}, this one "
                             f"{sorted(k for k, v in has.items() if v)}")
        if self.n and bool(self.groups) != (p.names is not None):
            raise ValueError("every update must carry groups, or none: "
                             + ("the first had groups, this one none" if self.groups else
                                "the first had no groups, this one has them"))
        bx = {_BKEYS[k]: v for k, v in p.extras.items() if k in _BKEYS}
        if self.n and set(bx) != set(self.bounds or {}):
            raise ValueError("every update must carry the same KLD bounds (kld_bounds, kld_reverse_bounds)")
        self.has = has
        if bx:
            self.bounds = self.bounds or {k: {"sum": 0, "inf": [0, 0], "hist": np.zeros(_KLD_EDGES.size - 1, np.int64),
                                              "minmax": [math.inf, -math.inf]} for k in bx}
            for k, v in bx.items():
                e = self.bounds[k]
                fin = np.isfinite(v)
                e["inf"][0] += int(np.count_nonzero(v == np.inf))
                e["inf"][1] += int(np.count_nonzero(v == -np.inf))
                e["sum"] += exact_sum(v[fin])
                e["hist"] += np.histogram(np.clip(v, _KLD_EDGES[0], _KLD_EDGES[-1]), bins=_KLD_EDGES)[0]
                e["minmax"] = [min(e["minmax"][0], float(v.min())), max(e["minmax"][1], float(v.max()))]
        self.ignored += p.n_ignored
        fo, fq = np.isfinite(lo), np.isfinite(lq)
        self.neginf["o"] += int(n - fo.sum())
        self.neginf["q"] += int(n - fq.sum())
        lo_f, lq_f = np.where(fo, lo, 0.0), np.where(fq, lq, 0.0)
        with np.errstate(over="ignore"):
            for key, x in (("lo", lo_f), ("lq", lq_f), ("oo", lo_f * lo_f), ("qq", lq_f * lq_f),
                           ("oq", lo_f * lq_f)):
                self._add(key, x)
            dp = np.exp(lq) - np.exp(lo)
            for key, x in (("dp", dp), ("dp2", dp * dp), ("dp4", dp ** 4)):
                self._add(key, x)
            self._hist("dp", dp, _DP_EDGES)
            for k in ("kld", "kldr"):
                if k in arrs:
                    self._add(k, arrs[k])
                    self._add(k + "2", arrs[k] ** 2)
                    self._hist(k, arrs[k], _KLD_EDGES)
        for k in _COUNTS:
            if k in arrs:
                self.counts[k] += int(np.count_nonzero(arrs[k]))
        self.n += n
        d = lo - lq  # nll_q - nll_o
        self._add_blocks(self.blocks, d)
        if p.names is not None:
            for code, name in enumerate(p.names):
                sel = p.codes == code
                if not sel.any():
                    continue
                g = self.groups.setdefault(name, _new_group())
                g["n"] += int(sel.sum())
                g["inf"]["q"] += int(np.count_nonzero(~fq[sel]))
                g["lo"] += exact_sum(lo_f[sel])
                g["lq"] += exact_sum(lq_f[sel])
                if "kld" in arrs:
                    g["kld"] += exact_sum(np.where(np.isfinite(arrs["kld"][sel]), arrs["kld"][sel], 0.0))
                    g["inf"]["kld"] += int(np.count_nonzero(np.isinf(arrs["kld"][sel])))
                if "same" in arrs:
                    g["same"] += int(np.count_nonzero(arrs["same"][sel]))
                self._add_blocks(g["blocks"], d[sel])
        return self

    def _add(self, key, x):
        """Add x to the exact sum ``key``; infinite terms are counted, not summed."""
        fin = np.isfinite(x)
        if not fin.all():
            self.inf[key][0] += int(np.count_nonzero(x == np.inf))
            self.inf[key][1] += int(np.count_nonzero(x == -np.inf))
            x = x[fin]
        self.sums[key] += exact_sum(x)

    def _hist(self, key, x, edges):
        self.hist[key] += np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)[0]
        mm = self.minmax[key]
        mm[0], mm[1] = min(mm[0], float(x.min())), max(mm[1], float(x.max()))

    def _add_blocks(self, blocks, d):
        num, den = block_sums(d, self.block_size)
        blocks[0] = np.concatenate([blocks[0], num])
        blocks[1] = np.concatenate([blocks[1], den])

    # ------------------------------------------------------------------ merge / state
    @_locked
    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add another accumulator's tokens to this one (in place; returns self)."""
        if other.block_size != self.block_size:
            raise ValueError(f"block sizes differ: {self.block_size} and {other.block_size}")
        if other.n == 0:
            return self
        if self.has is not None and other.has != self.has:
            raise ValueError("the accumulators carry different per-token arrays")
        if self.n and set(self.bounds or {}) != set(other.bounds or {}):
            raise ValueError("the accumulators carry different KLD bounds")
        if self.n and bool(self.groups) != bool(other.groups):
            raise ValueError("one accumulator has groups and the other none")
        self.has = other.has if self.has is None else self.has
        if other.bounds:
            if not self.bounds:
                self.bounds = {k: {"sum": 0, "inf": [0, 0], "hist": np.zeros(_KLD_EDGES.size - 1, np.int64),
                                   "minmax": [math.inf, -math.inf]} for k in other.bounds}
            for k, o in other.bounds.items():
                e = self.bounds[k]
                e["sum"] += o["sum"]
                e["inf"] = [a + b for a, b in zip(e["inf"], o["inf"])]
                e["hist"] = e["hist"] + o["hist"]
                e["minmax"] = [min(e["minmax"][0], o["minmax"][0]), max(e["minmax"][1], o["minmax"][1])]
        self.n += other.n
        self.ignored += other.ignored
        for k in _SUMS:
            self.sums[k] += other.sums[k]
            self.inf[k] = [a + b for a, b in zip(self.inf[k], other.inf[k])]
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
            g = self.groups.setdefault(name, _new_group())
            for k in ("n", "lo", "lq", "kld", "same"):
                g[k] += og[k]
            for k in g["inf"]:
                g["inf"][k] += og["inf"][k]
            g["blocks"] = [np.concatenate([g["blocks"][i], og["blocks"][i]]) for i in range(2)]
        return self

    @_locked
    def state_dict(self) -> dict:
        """The state as strict JSON data (RFC 8259: exact integers as hex strings, infinities as
        the strings "inf" / "-inf"), for from_state(): any JSON parser reads it back."""
        extra = {} if not self.bounds else {"bounds": {
            k: {"sum": hex(e["sum"]), "inf": list(e["inf"]), "minmax": _json_floats(e["minmax"]),
                "hist": {"nonzero": np.flatnonzero(e["hist"]).tolist(), "counts": e["hist"][e["hist"] != 0].tolist()}}
            for k, e in self.bounds.items()}}
        return {**extra,
            "version": 3, "block_size": self.block_size, "n": self.n, "has": self.has,
            "sums": {k: hex(v) for k, v in self.sums.items()}, "counts": dict(self.counts),
            "neginf": dict(self.neginf), "inf": {k: list(v) for k, v in self.inf.items()},
            "ignored": self.ignored,
            "hist": {k: {"nonzero": np.flatnonzero(v).tolist(), "counts": v[v != 0].tolist()}
                     for k, v in self.hist.items()},
            "minmax": {k: _json_floats(v) for k, v in self.minmax.items()},
            "blocks": [_json_floats(b) for b in self.blocks],
            "groups": {name: {"n": g["n"], "lo": hex(g["lo"]), "lq": hex(g["lq"]), "kld": hex(g["kld"]),
                              "same": g["same"], "inf": dict(g["inf"]),
                              "blocks": [_json_floats(b) for b in g["blocks"]]}
                       for name, g in self.groups.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> "Accumulator":
        """The accumulator of a ``state_dict()`` (version 1, 2 or 3); ValueError for a state that
        is malformed or inconsistent (it could not have come from updates)."""
        st = _checked_state(state)
        acc = cls(block_size=st["block_size"])
        acc.n, acc.has, acc.ignored = st["n"], st["has"], st["ignored"]
        acc.sums, acc.counts, acc.neginf, acc.inf = st["sums"], st["counts"], st["neginf"], st["inf"]
        acc.hist, acc.minmax, acc.blocks, acc.groups = st["hist"], st["minmax"], st["blocks"], st["groups"]
        acc.bounds = st["bounds"]
        return acc

    # ------------------------------------------------------------------ report
    def _sum(self, key):
        pos, neg = self.inf[key]
        if pos or neg:
            return math.nan if pos and neg else math.inf if pos else -math.inf
        return _to_float(self.sums[key])

    @_locked
    def report(self, *, confidence=0.95, n_bootstrap=None, seed=0, expected=None, protocol=None,
               kld_definition=None) -> Report:
        """The analysis of everything accumulated (structure of ppldelta.analyze's report;
        ``kld_definition`` as in analyze)."""
        n = self.n
        if n == 0:
            raise ValueError("the accumulator is empty")
        check_confidence(confidence, n_bootstrap)
        has = self.has
        groups = None
        if self.groups:
            groups = [GroupMoments(name, g["n"], _to_float(g["lo"]), -math.inf if g["inf"]["q"] else _to_float(g["lq"]),
                                   _canonical(g["blocks"]), i,
                                   (math.inf if g["inf"]["kld"] else _to_float(g["kld"])) if has["kld"] else None,
                                   g["same"] if has["same"] else None)
                      for i, (name, g) in enumerate(sorted(self.groups.items()))]  # sorted: any merge order
        return build(Moments(
            n, -math.inf if self.neginf["o"] else self._sum("lo"), -math.inf if self.neginf["q"] else self._sum("lq"),
            self._sum("oo"), self._sum("qq"), self._sum("oq"), self._sum("dp"), self._sum("dp2"),
            self._sum("dp4"), self._percentiles("dp", _DP_EDGES, False), _canonical(self.blocks), self.block_size,
            *(DistMoments(self._sum(k), self._sum(k + "2"), self._percentiles(k, _KLD_EDGES, True)) if has[k] else None
              for k in ("kld", "kldr")),
            {name: self.counts[k] for name, k in (("same_top1", "same"), ("top1_in_top5", "top5"),
                                                 ("top1_in_top10", "top10"), ("q_top1_in_base_top5", "qtop5"),
                                                 ("q_top1_in_base_top10", "qtop10")) if has[k]},
            groups, self.ignored, *(self._bound_pair(lo, hi) for lo, hi in (("kldlo", "kldhi"), ("kldrlo", "kldrhi"))),
            kld_definition), confidence=confidence, n_bootstrap=n_bootstrap, seed=seed,
            expected=expected, protocol=protocol)

    def _bound_pair(self, lo, hi):
        if not self.bounds or lo not in self.bounds:
            return None
        out = []
        for k in (lo, hi):
            e = self.bounds[k]
            pos, neg = e["inf"]
            s = math.inf if pos else _to_float(e["sum"])
            out.append(DistMoments(s, math.nan, Histogram(e["hist"], _KLD_EDGES, self.n, *e["minmax"], True, pos)))
        return tuple(out)

    def _percentiles(self, key, edges, log):
        return Histogram(self.hist[key], edges, self.n, *self.minmax[key], log, self.inf[key][0])


def _canonical(blocks):
    """Bootstrap blocks in a canonical order: the report is independent of the merge order."""
    order = np.lexsort((blocks[1], blocks[0]))
    return blocks[0][order], blocks[1][order]
