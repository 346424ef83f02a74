"""The fused compare kernel (csrc/compare.c, ``_core.compare_rows``) against its NumPy oracle
``parts_rows`` (below: stage 1 of refstats.compare in float64 NumPy, the code the kernel
replaced): every dtype, adversarial rows, properties, SIMD paths, threads, bad input.

Tolerance (docs/architecture.md, "The compare kernel"): exact fields (argmax_q, rank_q, nT,
ninfT, and which entries are NaN / +-inf) are equal; with u' = 2^-46 (64 ulp) and ls the row's
log-sum-exp, a log-prob (bS, bP, top, bot, bmax) within u' (|b| + 1 + ls), sbT within
u' (|sbT| + nT (1 + ls)), and the q-weighted sums (HQ, zq, QT, qbT, Qbeyond) within
u' (16 + |b|max) of their value (|b|max over q > 0: the oracle's own q = exp(b) is only that
accurate) -- relative, so a tail mass of 1e-20 is checked to its own digits -- plus, for HQ and
qbT (sums of q b), u' (1 + ls) times 1 and QT: the oracle's log(sum) instead of log1p."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppldelta import _core, refstats

FLOATS = ("HQ", "zq", "bmax", "QT", "sbT", "qbT", "Qbeyond")
VECS = ("bS", "bP", "top", "bot")
EXACT = ("nT", "ninfT", "argmax_q", "rank_q")
REL = 2.0 ** -46


def parts_rows(y, ids, M, pids=None):
    """The oracle: stage 1 on float64 rows ``y`` in NumPy (about 20 full-row passes)."""
    n, V = y.shape
    K = ids.shape[1]
    Mv = min(M, V)
    valid = ids >= 0
    idc = np.where(valid, ids, 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        m = y.max(axis=1)
        d = y - m[:, None]
        b = d - np.log(np.exp(d).sum(axis=1))[:, None]
        q = np.exp(b)
        qb = np.where(q > 0, q * b, 0.0)
        fin = b > -np.inf
        tm = np.ones((n, V), dtype=bool)
        rows = np.broadcast_to(np.arange(n)[:, None], (n, K))
        tm[rows[valid], idc[valid]] = False
        out = {"V": V, "M": M}
        out["bS"] = np.where(valid, np.take_along_axis(b, idc, 1), np.nan)
        if pids is not None:
            out["bP"] = np.where(pids >= 0, np.take_along_axis(b, np.maximum(pids, 0), 1), np.nan)
        out["HQ"] = -qb.sum(axis=1)
        out["zq"] = np.where(q > 0, q * (1 + np.abs(b)) ** 2, 0.0).sum(axis=1)
        out["bmax"] = np.where(fin, -b, 0.0).max(axis=1)
        out["nT"] = tm.sum(axis=1)
        out["ninfT"] = (tm & ~fin).sum(axis=1)
        qt = np.where(tm, q, 0.0)
        out["QT"] = qt.sum(axis=1)
        out["sbT"] = np.where(tm & fin, b, 0.0).sum(axis=1)
        out["qbT"] = np.where(tm, qb, 0.0).sum(axis=1)
        bt = np.where(tm, b, -np.inf)
        it = np.argpartition(-bt, Mv - 1, axis=1)[:, :Mv] if Mv < V else np.broadcast_to(np.arange(V), (n, V))
        top = -np.sort(-np.take_along_axis(bt, it, 1), axis=1)
        np.put_along_axis(qt, it, 0.0, 1)
        out["Qbeyond"] = qt.sum(axis=1)
        bb = np.where(tm, b, np.inf)
        ib = np.argpartition(bb, Mv - 1, axis=1)[:, :Mv] if Mv < V else np.broadcast_to(np.arange(V), (n, V))
        bot = np.sort(np.take_along_axis(bb, ib, 1), axis=1)
    out["top"], out["bot"] = refstats._pad(top, M, -np.inf), refstats._pad(bot, M, np.inf)
    out["argmax_q"] = y.argmax(axis=1)
    out["rank_q"] = (y > np.take_along_axis(y, idc[:, :1], 1)).sum(axis=1)
    return out


def _f64(a, bf16):
    return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64) if bf16 else a.astype(np.float64)


def check(a, ids, M, pids=None, bf16=False, threads=1):
    """The kernel against the oracle; returns the kernel's dict."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    pids = None if pids is None else np.ascontiguousarray(pids, dtype=np.int32)
    got = _core.compare_rows(a, ids, M, pids, bf16=bf16, threads=threads)
    want = parts_rows(_f64(a, bf16), ids, M, pids)
    assert set(got) == set(want)
    assert got["V"] == want["V"] and got["M"] == want["M"]
    for k in EXACT:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].dtype == np.int64
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y = _f64(a, bf16)
        d = y - y.max(1, keepdims=True)
        ls = np.log(np.exp(d).sum(1))
        b = d - ls[:, None]
        bq = np.where(np.exp(b) > 0, -b, 0.0).max(1)  # the largest |b| with q > 0
    for k in FLOATS + VECS:
        if k not in want:
            continue
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.shape == w.shape and g.dtype == np.float64, k
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=k)
        np.testing.assert_array_equal(np.isposinf(g), np.isposinf(w), err_msg=k)
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w), err_msg=k)
        sh = (-1,) + (1,) * (g.ndim - 1)
        if k in ("bS", "bP", "top", "bot", "bmax", "sbT"):  # log-probs (sbT: a sum of them)
            tol = REL * (np.abs(w) + (1 + ls).reshape(sh) * (got["nT"] if k == "sbT" else 1))
        else:  # sums of q-weighted terms of one sign: relative, with the oracle's q = exp(b) error
            tol = REL * (16 + bq).reshape(sh) * np.abs(w) + 1e-300
            if k in ("HQ", "qbT"):  # sum q b: the oracle's ls = log(sum) is off by ~u (1 + ls)
                tol = tol + REL * (1 + ls) * (want["QT"] if k == "qbT" else 1)
        with np.errstate(invalid="ignore"):
            bad = np.isfinite(w) & ~(np.abs(g - w) <= tol)
        assert not bad.any(), (k, g[bad][:3], w[bad][:3])
    return got


def _rows(rng, n, V, dtype, scale=3.0):
    x = rng.standard_normal((n, V)) * scale
    if dtype == "bf16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), True
    return x.astype(dtype), False


def _ids(rng, n, V, K, invalid=0.0):
    ids = np.stack([rng.permutation(V)[:min(K, V)] for _ in range(n)]) if K <= V else None
    if ids is None:
        ids = np.full((n, K), -1)
        for r in range(n):
            ids[r, :V] = rng.permutation(V)
    ids[rng.random(ids.shape) < invalid] = -1
    return ids.astype(np.int32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, "bf16"])
@pytest.mark.parametrize("V", [1, 7, 100, 1500, 5000])
def test_random_rows_every_dtype(dtype, V):
    rng = np.random.default_rng(V)
    a, bf = _rows(rng, 5, V, dtype)
    K = min(24, V)
    ids = _ids(rng, 5, V, K, invalid=0.1)
    pids = rng.integers(-1, V, size=(5, 8)).astype(np.int32)
    check(a, ids, 64, pids, bf16=bf)
    check(a, ids, 3, None, bf16=bf)


def test_large_vocab_rows():
    rng = np.random.default_rng(11)
    for dtype in (np.float32, "bf16"):
        a, bf = _rows(rng, 2, 151936, dtype)
        check(a, _ids(rng, 2, 151936, 24), 64, rng.integers(-1, 151936, (2, 8)), bf16=bf, threads=2)


def test_row_strided_input_read_in_place():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((6, 3000)).astype(np.float32)
    a = big[::2, 5:2905]  # rows contiguous, row stride of the parent
    assert not a.flags.c_contiguous
    check(a, _ids(rng, 3, 2900, 24), 64)


def _with(row, at, v):
    row = row.copy()
    row[at] = v
    return row


def test_adversarial_rows():
    V = 2100
    rng = np.random.default_rng(2)
    base = _ids(rng, 1, V, 24)[0]
    g = rng.standard_normal(V)
    ninf, big = np.full(V, -np.inf), np.full(V, -1e30)
    cases = [
        (_with(g, rng.random(V) < 0.3, -np.inf), base),       # -inf entries
        (np.zeros(V), base),                                    # all equal: ties everywhere
        (_with(big, slice(None, None, 7), 1e30), base),         # huge range
        (_with(ninf, 1234, 5.0), base),                         # a single finite value
        (_with(ninf, base[0], 2.0), base),                      # finite only at a stored id
        (np.round(g * 2) / 2, base),                            # ties at the threshold
        (_with(g - 40.0, base, 0.0), base),                     # tail mass ~ 1e-14
        (_with(g - 800.0, base[:3], 0.0), base),                # tail underflows
        (g, _with(base, slice(None, None, 3), -1)),             # -1 among the ids
        (g, np.full(24, -1)),                                   # no valid id
        (g, _with(base, 5, base[6])),                           # a duplicate id
        (np.arange(V) * 0.01, base),                            # rising: the top filter refills
        (-np.arange(V) * 0.01, base),                           # falling: the bottom one
    ]
    y, ids = np.array([c[0] for c in cases]), np.array([c[1] for c in cases])
    got = check(y, ids, 64, rng.integers(-1, V, (len(cases), 8)))
    check(y.astype(np.float32), ids, 64)
    assert 0 < got["QT"][6] < 1e-12


def test_tiny_tail_is_summed_directly():
    """A tail mass of ~1e-20: a total-minus-stored difference would give 0 or garbage."""
    V, K = 4000, 24
    y = np.full((1, V), -46.0)
    ids = np.arange(K)[None].astype(np.int32)
    y[0, :K] = 0.0
    got = _core.compare_rows(y, ids, 64)
    want = (V - K) * np.exp(-46.0) / (K + (V - K) * np.exp(-46.0))
    assert got["QT"][0] == pytest.approx(want, rel=1e-13)
    assert got["Qbeyond"][0] == pytest.approx(want * (V - K - 64) / (V - K), rel=1e-13)


def test_near_degenerate_row_entropy():
    """One token holds all but e^-60 of the mass: HQ = -sum q log q to its own digits (ls =
    log1p of the others' sum; log of the total would round the top token's log-prob to 0)."""
    y = np.array([[0.0, -60.0, -np.inf]])
    got = _core.compare_rows(y, np.array([[0]], dtype=np.int32), 4)
    e = math.exp(-60.0)
    l0 = -math.log1p(e)
    q0, q1 = math.exp(l0), e * math.exp(l0)
    assert got["HQ"][0] == pytest.approx(-q0 * l0 - q1 * (-60.0 + l0), rel=1e-14)
    assert got["QT"][0] == pytest.approx(q1, rel=1e-14)
    assert got["qbT"][0] == pytest.approx(q1 * (-60.0 + l0), rel=1e-14)
    assert (int(got["nT"][0]), int(got["ninfT"][0])) == (2, 1)
    assert float(got["bmax"][0]) == pytest.approx(60.0 - l0, rel=1e-15)


def test_vocab_below_m_and_k_above_vocab():
    rng = np.random.default_rng(3)
    for V in (1, 2, 5, 30):
        y = rng.standard_normal((3, V))
        check(y, _ids(rng, 3, V, 24), 64, rng.integers(-1, V, (3, 4)))


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(1, 300), st.integers(1000, 2600)), st.integers(1, 40), st.integers(1, 80),
       st.integers(0, 2 ** 32 - 1), st.sampled_from([np.float64, np.float32, "bf16"]), st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_property_matches_oracle(V, K, M, s, dtype, pinf, pinv):
    rng = np.random.default_rng(s)
    a, bf = _rows(rng, 3, V, dtype, scale=float(rng.choice([0.1, 3.0, 50.0])))
    if dtype != "bf16":
        a[rng.random(a.shape) < pinf] = -np.inf
        a[np.arange(3), rng.integers(0, V, 3)] = 1.0
    ids = _ids(rng, 3, V, K, invalid=pinv)
    rng.shuffle(ids, axis=1)
    got = check(a, ids, M, rng.integers(-1, V, (3, 5)), bf16=bf)
    # properties of the distribution: 0 <= Qbeyond <= QT <= 1, top descending, bot ascending
    assert (got["Qbeyond"] <= got["QT"] * (1 + 1e-12)).all() and (got["QT"] <= 1 + 1e-12).all()
    top, bot = got["top"], got["bot"]
    assert (top[:, :-1] >= top[:, 1:]).all() and (bot[:, :-1] <= bot[:, 1:]).all()


@pytest.mark.parametrize("M", [8, 64, 300])
def test_filters_started_from_group_extremes(M):
    """Rows long enough (8 groups per 1024 values, >= M of them) that each filter starts at the
    M-th best of the groups' extremes: the rows where that threshold could be wrong."""
    V = 12000
    rng = np.random.default_rng(11)
    g = rng.standard_normal(V)
    big = np.argsort(-g)[:100].astype(np.int32)  # the 100 largest values are stored ids
    sparse = np.full(V, -np.inf)
    sparse[rng.permutation(V)[:M + 3]] = rng.standard_normal(M + 3)
    exact_m = np.full(V, -np.inf)
    exact_m[rng.permutation(V)[:M]] = 1.0
    zeros = np.where(rng.random(V) < 0.5, -0.0, 0.0) - np.where(rng.random(V) < 0.3, 1.0, 0.0)
    rows = [
        (g, big[:24]),                                     # group maxima at stored ids
        (np.concatenate([g[:50], -g[50:]]), np.argsort(g)[:24]),  # the smallest at stored ids
        (np.round(g * 2), rng.permutation(V)[:24]),        # ties at every threshold
        (np.arange(V) * 1e-3, rng.permutation(V)[:24]),    # rising: the unstarted worst case
        (-np.arange(V) * 1e-3, rng.permutation(V)[:24]),   # falling
        (sparse, rng.permutation(V)[:24]),                 # few finite groups: -inf everywhere else
        (exact_m, rng.permutation(V)[:24]),                # exactly M finite values
        (zeros, rng.permutation(V)[:24]),                  # -0 and +0, max 0
    ]
    y = np.array([r[0] for r in rows])
    ids = np.array([r[1][:24] for r in rows]).astype(np.int32)
    ids[0] = big[:24]
    pids = rng.integers(-1, V, (len(rows), 8))
    got = check(y, ids, M, pids)
    for dt in (np.float32, "bf16"):
        a = y.astype(np.float32)
        bf = dt == "bf16"
        check((a.view(np.uint32) >> 16).astype(np.uint16) if bf else a, ids, M, bf16=bf)
    # the tail's M largest of row 0 (oracle: a sort) are below every stored value
    tail = np.delete(y[0], ids[0])
    want = np.sort(tail)[::-1][:M]
    np.testing.assert_allclose(got["top"][0], want - y[0].max() - np.log(np.exp(y[0] - y[0].max()).sum()),
                               rtol=0, atol=1e-12)


def test_threads_same_bytes():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((9, 3333)).astype(np.float32)
    ids = _ids(rng, 9, 3333, 24)
    one = _core.compare_rows(y, ids, 64, threads=1)
    for t in (2, 4):
        other = _core.compare_rows(y, ids, 64, threads=t)
        for k, v in one.items():
            assert np.asarray(v).tobytes() == np.asarray(other[k]).tobytes(), k


_SIMD_SCRIPT = """
import hashlib, numpy as np
from ppldelta import _core
rng = np.random.default_rng(5)
y = rng.standard_normal((4, 2500)).astype(np.float32); y[0, ::3] = -np.inf
ids = np.stack([rng.permutation(2500)[:24] for _ in range(4)]).astype(np.int32)
d = _core.compare_rows(y, ids, 64, rng.integers(-1, 2500, (4, 8)).astype(np.int32), threads=2)
z = np.round(rng.standard_normal((3, 9000)) * 2)  # long enough for the started filters; ties; -0
z[1, ::5] = -0.0; z[1] = np.minimum(z[1], 0.0); z[2, ::2] = -np.inf
zi = np.stack([rng.permutation(9000)[:24] for _ in range(3)]).astype(np.int32)
e = [_core.compare_rows(z.astype(t), zi, m, threads=1) for t in (np.float64, np.float32) for m in (8, 64)]
print(_core.simd(), hashlib.sha256(b"".join(np.asarray(r[k]).tobytes() for r in [d] + e for k in sorted(r))).hexdigest())
"""


def test_every_simd_path_same_bytes():
    digests = {}
    for isa in _core.supported_simd():
        env = dict(os.environ, PPLDELTA_SIMD=isa)
        out = subprocess.run([sys.executable, "-c", _SIMD_SCRIPT], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[0] == isa
        digests[isa] = out[1]
    assert len(set(digests.values())) == 1, digests


def test_bad_input():
    y = np.zeros((2, 10))
    ids = np.zeros((2, 3), dtype=np.int32)
    with pytest.raises(ValueError, match=r"ids\[1, 2\] = 10 is outside the vocabulary \[0, 10\)"):
        _core.compare_rows(y, _with(ids, (1, 2), 10), 4)
    with pytest.raises(ValueError, match=r"pids\[0, 0\] = 99"):
        _core.compare_rows(y, ids, 4, np.full((2, 1), 99, dtype=np.int32))
    with pytest.raises(TypeError, match="ids must be an int32 ndarray"):
        _core.compare_rows(y, ids.astype(np.int64), 4)
    with pytest.raises(TypeError, match="ids must be an int32 ndarray"):
        _core.compare_rows(y, [[0, 1, 2]] * 2, 4)
    with pytest.raises(ValueError, match="ids must be C-contiguous"):
        _core.compare_rows(y, np.zeros((2, 6), dtype=np.int32)[:, ::2], 4)
    with pytest.raises(ValueError, match=r"ids must have shape \(2, k\)"):
        _core.compare_rows(y, np.zeros((3, 3), dtype=np.int32), 4)
    with pytest.raises(ValueError, match=r"ids must have shape \(2, k\) with k >= 1"):
        _core.compare_rows(y, np.zeros((2, 0), dtype=np.int32), 4)
    with pytest.raises(ValueError, match="pids must have shape"):
        _core.compare_rows(y, ids, 4, np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="m must be >= 1"):
        _core.compare_rows(y, ids, 0)
    with pytest.raises(TypeError, match="quantized_logits has dtype"):
        _core.compare_rows(y.astype(np.int64), ids, 4)
    with pytest.raises(ValueError, match="quantized_logits must be 2-D"):
        _core.compare_rows(np.zeros(10), ids, 4)
    for v in (np.nan, np.inf):
        z = _with(y, (1, 3), v)
        with pytest.raises(ValueError, match="quantized_logits row 1 contains NaN or \\+inf"):
            _core.compare_rows(z, ids, 4)
    with pytest.raises(ValueError, match="row 0 .* entirely -inf"):
        _core.compare_rows(np.full((2, 10), -np.inf), ids, 4)


def test_refstats_compare_end_to_end_matches_oracle_stage1():
    """refstats.compare (the kernel for stage 1) against finish() of the oracle's parts."""
    rng = np.random.default_rng(6)
    V, n = 3000, 12
    x = rng.standard_normal((n, V)) * 3
    t = rng.integers(0, V, n)
    rec = refstats.summarize(x, t, 24, probes=8)
    for yq, bf in ((x + 0.1 * rng.standard_normal((n, V)), False),
                   ((x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), True)):
        got = refstats.compare(yq, rec, bf16=bf, threads=2)
        parts = parts_rows(_f64(yq, bf), rec["ids"], refstats.tail_m(24), rec["pids"])
        want = refstats.finish(parts, rec)
        for k, w in want.items():
            if w is None:
                assert got[k] is None
                continue
            np.testing.assert_allclose(got[k], w, rtol=1e-9, atol=1e-12, err_msg=k)


def test_refstats_compare_one_call_on_the_rows_in_place(monkeypatch):
    """Stage 1 is one kernel call on the caller's rows (no float64 copy, no row chunks)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 500)).astype(np.float32)
    rec = refstats.summarize(x, rng.integers(0, 500, 40), 24)
    calls, real = [], _core.compare_rows
    monkeypatch.setattr(refstats, "ROW_BUDGET", 1000)  # the old path would have made 20 chunks
    monkeypatch.setattr(_core, "compare_rows", lambda a, *r, **k: calls.append(a) or real(a, *r, **k))
    y = x[:, ::-1]  # negative strides: as_rows copies; a C-order array is read in place
    refstats.compare(y, rec)
    refstats.compare(x, rec)
    assert len(calls) == 2 and calls[1].shape == x.shape and np.shares_memory(calls[1], x)
    assert calls[1].dtype == np.float32
