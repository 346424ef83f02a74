"""The reference summarize kernel (csrc/summarize.c, _core.summarize_rows): its float64 exp over
its whole range (through the entropy of two-value rows, against mpmath), the running sum of the
probes (the format's left-to-right float64 sum), degenerate rows, and the same bytes from every
SIMD path, thread count and float32 fast path."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ppldelta import _core, refstats

ISAS = _core.supported_simd()
ULP = 2.0 ** -52


def summ(x, k, m, isa=None, threads=1, **kw):
    before = _core.simd()
    try:
        if isa:
            _core._set_simd(isa)
        return _core.summarize_rows(np.ascontiguousarray(x), k, m, threads=threads, **kw)
    finally:
        _core._set_simd(before)


def as_bytes(d):
    return b"".join(np.asarray(d[f]).tobytes() for f in sorted(d))


def entropy_oracle(x):
    """H of the two-value row [0, x]: log(1 + e) - e x / (1 + e), e = exp(x), in 60 digits."""
    mpmath = pytest.importorskip("mpmath")  # with torch (sympy) and in the test extras
    with mpmath.workdps(60):
        e = mpmath.exp(mpmath.mpf(x))
        return float(mpmath.log1p(e) - e * x / (1 + e)), float(e)


def test_exp_accuracy_over_its_range(isa):
    # H = log1p(e) - e x/(1 + e) ~ e (1 - x) for small e: its relative error is the exp's (plus a
    # few roundings), down to the subnormal results and the clamp at -746 (exp rounds to 0)
    rng = np.random.default_rng(5)
    xs = np.concatenate([-np.geomspace(1e-12, 746.0, 1500), -rng.uniform(0, 746, 1500),
                         [-0.0, -1e-300, -np.log(2) / 32, -708.39, -709.8, -744.4, -745.2, -746.5, -800.0]])
    rows = np.stack([np.zeros_like(xs), xs], axis=1)
    h = summ(rows, 1, 0, isa)["entropy"]
    for x, got in zip(xs, h):
        want, e = entropy_oracle(x)
        if e > 2.0 ** -1022:
            assert abs(got - want) <= 16 * ULP * want + 1e-300, (x, got, want)
        else:  # subnormal e: one rounding of at most half the smallest subnormal, times (1 - x)
            assert abs(got - want) <= (1 - x) * 2.0 ** -1074 * 1.5 + 1e-320, (x, got, want)
    assert h[xs <= -746.5].tolist() == [0.0] * int((xs <= -746.5).sum())


@pytest.mark.parametrize("V", [2, 7, 64, 1000, 1031, 3000])
def test_every_path_and_thread_count_gives_the_same_bytes(V):
    rng = np.random.default_rng(V)
    x = rng.normal(0, 3, (9, V))
    x[1] = np.round(x[1])  # many equal values: ties in the top K and in the running sum
    x[2, ::3] = -np.inf
    x[3] *= 150  # e spread over the whole range, subnormals included
    x[4] = 0.0  # a uniform row
    x[5, :] = -np.inf
    x[5, V // 2] = 2.5  # one finite value
    x[6] = np.linspace(-740, 0, V)
    x[7, 1:] = -700.0  # one token holds the mass, the tail's total subnormal-ish
    x[8] = rng.normal(0, 3, V) - 30
    bf = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits (truncated)
    for dt in (np.float64, np.float32, np.float16, "bf16"):
        a, kw = (bf, {"bf16": True}) if dt == "bf16" else (x.astype(dt), {})
        for k, m in ((1, 8), (5, 3), (V, 4), (V + 3, 2), (24, 0)):
            want = as_bytes(summ(a, k, m, "scalar", **kw))
            for isa in ISAS:
                for threads in (1, 3):
                    assert as_bytes(summ(a, k, m, isa, threads, **kw)) == want, (dt, k, m, isa, threads)


@settings(max_examples=40)
@given(st.integers(2, 2500), st.integers(1, 40), st.integers(0, 9), st.floats(0.1, 300.0),
       st.integers(0, 2 ** 31))
def test_paths_agree_on_random_float32_rows(V, k, m, scale, s):
    rng = np.random.default_rng(s)
    x = (rng.normal(0, scale, (3, V))).astype(np.float32)
    x[1, rng.integers(0, V, V // 3)] = -np.inf
    x[2] = np.round(x[2] / scale * 4) / 4  # repeated values
    x[1, 0] = 1.0
    want = as_bytes(summ(x, k, m, "scalar"))
    for isa in ISAS:
        assert as_bytes(summ(x, k, m, isa)) == want, isa


def test_probe_offsets_per_row_against_the_twin():
    """Each row's offset u moves its probes to the first ids past (j + u)/M of the tail's mass: the
    kernel on every path against the float64 twin with the same offsets (ids exactly but where the
    threshold sits within rounding of a boundary), and bad offsets refused by name."""
    rng = np.random.default_rng(8)
    x = rng.normal(0, 2.0, (6, 3000))
    x[1] = 0.0  # flat: the probes are evenly spaced ids, shifted by u
    u = np.array([0.0, 0.25, 0.5, 0.999999, 1 - 2.0 ** -53, 0.1])
    want = np.zeros(6, refstats.RECORD_DTYPE(16, 8))
    refstats.summarize_rows(x, 16, want, u)
    for isa in ISAS:
        got = summ(x, 16, 8, isa, offsets=u)
        for r in range(6):
            e = np.exp(x[r] - x[r].max())
            e[got["ids"][r]] = 0.0
            cum = np.cumsum(e)
            q = (np.arange(8) + u[r]) / 8 * cum[-1]
            near = np.abs(cum[want["pids"][r]] - q) < 1e-12 * cum[-1]
            assert np.array_equal(got["pids"][r][~near], want["pids"][r][~near]), (isa, r)
        assert not np.array_equal(got["pids"][0], summ(x, 16, 8, isa)["pids"][0])  # not the 1/2 default
    tail = np.setdiff1d(np.arange(3000), want["ids"][1])
    assert want["pids"][1].tolist() == [int(tail[int((j + u[1]) / 8 * tail.size)]) for j in range(8)]
    for bad, msg in ((np.full(6, 1.0), "offsets"), (np.full(6, np.nan), "offsets"), (np.full(6, -0.1), "offsets"),
                     (np.zeros(5), "5 values for 6 rows")):
        with pytest.raises(ValueError, match=msg):
            _core.summarize_rows(x, 16, 8, bad)


def test_running_sum_is_the_left_to_right_float64_sum():
    # a uniform row: every tail e is exactly 1, R_i = i exactly; with top K = 1 (the id 0) the
    # probe j is the first id i with i > (j + 1/2)/M (V - 1)
    V, M = 5000, 7
    for isa in ISAS:
        d = summ(np.zeros((1, V), np.float32), 1, M, isa)
        R = V - 1
        want = [next(i for i in range(1, V) if i > (j + 0.5) / M * R) for j in range(M)]
        assert d["pids"][0].tolist() == want
    # rows whose running sum crosses many binades and rounds (the AVX-512 path's block sums take
    # the sequential sum's shortcut only where it is exact): the probes against np.cumsum of the
    # same e, which the scalar path computes one add at a time
    rng = np.random.default_rng(3)
    for scale in (1.0, 5.0, 40.0):
        x = rng.normal(0, scale, (4, 20000))
        x[:, 0] = x.max() + 1.0
        e = np.exp(x - x[:, :1])
        e[:, 0] = 0.0
        for isa in ISAS:
            d = summ(x, 1, 16, isa)
            for r in range(4):
                cum = np.cumsum(e[r])
                pos = refstats.probe_positions(cum[None], 16)[0]
                # np.exp and the kernel's exp may differ by an ulp: only where cum sits at q
                q = (np.arange(16) + 0.5) / 16 * cum[-1]
                near = np.abs(cum[pos] - q) < 1e-12 * cum[-1]
                assert np.array_equal(d["pids"][r][~near], pos[~near]), (isa, scale, r)


def test_degenerate_rows_against_the_float64_twin():
    rows = np.full((4, 40), -np.inf)
    rows[0, 7] = 3.0  # one finite value
    rows[1, :] = 1.5  # all equal
    rows[2, [3, 9]] = -2.0  # two equal finite values
    rows[3] = np.arange(40.0) * -20  # exps down to e^-780: subnormal and zero
    for isa in ISAS:
        for k, m in ((1, 4), (2, 4), (40, 4)):
            got = summ(rows, k, m, isa)
            want = np.zeros(4, refstats.RECORD_DTYPE(k, m))
            refstats.summarize_rows(rows, k, want)
            for f in ("ids", "pids"):
                assert np.array_equal(got[f], want[f]), (isa, k, f)
            for f in ("entropy", "tail", "lp_min", "lps", "plps"):  # the twin's entropy: to 1e-15
                np.testing.assert_allclose(got[f], want[f], rtol=1e-13, atol=1e-15 if f == "entropy" else 0.0,
                                           err_msg=f"{isa} {k} {f}")


@pytest.mark.parametrize("k", [1, 8, 24, 40, 100])
def test_top_k_filter_on_adversarial_rows_of_several_chunks(k):
    """The top-K threshold filter over rows of several chunks (1024 values): ties at every
    threshold, rising and falling rows, few finite values, -0 / +0, a spike where the last
    chunk's padding repeats a value (V = 5001: 7 padding values), each against the float64 twin
    on every path (ids exactly)."""
    V = 5001
    rng = np.random.default_rng(21)
    g = rng.standard_normal(V)
    sparse, exact = np.full(V, -np.inf), np.full(V, -np.inf)
    sparse[rng.permutation(V)[:k + 2]] = rng.standard_normal(k + 2)
    exact[rng.permutation(V)[:k]] = 0.25
    zeros = np.where(rng.random(V) < 0.5, -0.0, 0.0) - np.where(rng.random(V) < 0.3, 1.0, 0.0)
    spike = g.copy()
    spike[4096] = 10.0  # the first value of the last chunk, which its padding repeats
    rows = np.array([np.round(g * 2), np.arange(V) * 1e-3, -np.arange(V) * 1e-3, sparse, exact, zeros,
                     np.full(V, 1.5), g, spike])
    for dt in (np.float64, np.float32):
        x = rows.astype(dt)
        want = np.zeros(len(rows), refstats.RECORD_DTYPE(k, 4))
        refstats.summarize_rows(x.astype(np.float64), k, want)
        for isa in ISAS:
            got = summ(x, k, 4, isa)
            assert np.array_equal(got["ids"], want["ids"]), (isa, dt)
            assert np.array_equal(got["lps"], want["lps"]) or \
                np.allclose(got["lps"], want["lps"], rtol=1e-6, atol=0), (isa, dt)


def test_bad_rows_name_the_row():
    x = np.zeros((3, 50), np.float32)
    x[1, 17] = np.nan
    for isa in ISAS:
        with pytest.raises(ValueError, match="1"):
            summ(x, 4, 2, isa)
        y = np.full((2, 50), -np.inf, np.float32)
        with pytest.raises(ValueError):
            summ(y, 4, 2, isa)
        z = np.zeros((2, 50), np.float32)
        z[0, 49] = np.inf
        with pytest.raises(ValueError):
            summ(z, 4, 2, isa)


def test_entropy_of_a_near_uniform_row_is_accurate():
    # every e in [e^-0.6, 1]: one narrow part of the reduction interval (a biased exp shows here)
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(11)
    x = rng.uniform(-0.6, 0.0, (20, 150))
    for isa in ISAS:
        h = summ(x, 4, 0, isa)["entropy"]
        for r in range(20):
            with mpmath.workdps(40):
                e = [mpmath.exp(mpmath.mpf(v) - mpmath.mpf(x[r].max())) for v in x[r]]
                s = mpmath.fsum(e)
                want = float(-mpmath.fsum(ei / s * mpmath.log(ei / s) for ei in e))
            assert math.isclose(h[r], want, rel_tol=1e-14), (isa, r)


def _one_add_at_a_time(values, r):
    """The format's running sum, as Python adds floats: r + v0, + v1, ...; the value after every
    block of 64 and after the last."""
    out = []
    for j, v in enumerate(values):
        r = r + float(v)
        if j % 64 == 63 or j == len(values) - 1:
            out.append(r)
    return r, out


def _check_runsum(values, r):
    values = np.asarray(values, dtype=np.float64)
    total, blocks = _core._runsum(values, r)
    want_total, want_blocks = _one_add_at_a_time(values, r)
    assert total == want_total and blocks.tolist() == want_blocks, (r, values[:8])


def test_running_sum_shortcut_equals_one_add_at_a_time(isa):
    """_core._runsum (the kernel's running sum, block sums in lanes where provably exact) against
    one add at a time, on adversarial inputs: half-ulp ties (round to even depends on the running
    total), binade crossings, starts at 0, subnormal and near 2^-1000, and mixed magnitudes."""
    u = 2.0 ** -52
    rng = np.random.default_rng(5)
    cases = [
        (np.full(200, u / 2), 1.0),                       # every add a tie: stays at 1.0
        (np.full(200, 3 * u / 2), 1.0),                   # ties that round up and down in turn
        (np.r_[np.full(64, u / 2), np.full(64, u)], 1.0),
        (np.full(300, u), 2.0 - 64 * u),                  # crosses into the next binade mid-block
        (np.full(300, u / 4), 1.0),                       # every add rounds away entirely
        (rng.exponential(1.0, 1000), 0.0),                # a row's start: r = 0
        (rng.exponential(1e-310, 500), 0.0),              # subnormal totals
        (rng.exponential(2.0 ** -1000, 500), 2.0 ** -1000),
        (rng.exponential(1.0, 1000) * 10.0 ** rng.integers(-30, 1, 1000), 0.5),
        (np.ldexp(rng.integers(0, 4, 640).astype(float), -54), 1.0),  # multiples of a quarter ulp
        (np.ldexp(rng.integers(0, 4, 640).astype(float), -54), 1.0 + 2 * u),
        (np.zeros(130), 3.0),
        (rng.exponential(1.0, 5), 1.0),                   # shorter than a block
    ]
    for values, r in cases:
        _check_runsum(values, r)


def test_running_sum_hypothesis(isa):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, 8), min_size=1, max_size=400), st.sampled_from([-56, -54, -53, -52, -40]),
           st.sampled_from([0.0, 1.0, 1.0 + 2.0 ** -52, 2.0 - 2.0 ** -48, 0.75, 2.0 ** -1000]))
    def prop(ks, e, r):
        _check_runsum(np.ldexp(np.asarray(ks, dtype=float), e), r)

    prop()
