"""ppldelta.perplexity_delta / perplexity against the reference and an fsum oracle."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ppldelta
from ppldelta import _core
from oracle import fsum_delta, fsum_perplexity, reference_delta

KEYS = ["original_perplexity", "quantized_perplexity", "absolute_delta", "relative_delta_pct", "quality"]


def _cases(seed, count):
    """Random and adversarial (original, quantized) pairs."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.choice([1, 2, 3, 7, 10, 100, 1000, 4097]))
        kind = i % 6
        if kind == 0:
            o = rng.uniform(-8, 0, n)
        elif kind == 1:  # long tail, like real NLL distributions
            o = -rng.exponential(2.0, n) ** 1.5
        elif kind == 2:  # mostly confident tokens, a few very surprising ones
            o = np.where(rng.random(n) < 0.05, -rng.uniform(10, 30, n), -rng.exponential(0.05, n))
        elif kind == 3:
            o = -rng.lognormal(0.5, 1.2, n)
        elif kind == 4:
            o = rng.uniform(-0.01, 0, n)
        else:
            o = -rng.gamma(0.3, 4, n)
        mode = rng.integers(0, 4)
        if mode == 0:  # quantized worse, token noise
            q = np.minimum(o - np.abs(rng.normal(0, 0.1, n)), 0)
        elif mode == 1:  # quantized better than original
            q = np.minimum(o + np.abs(rng.normal(0, 0.05, n)), 0)
        elif mode == 2:  # near a quality threshold: ratio exactly 1 + t/100 up to 1e-9
            t = float(rng.choice([1.0, 5.0, 10.0])) + float(rng.choice([-1e-6, 1e-6, -1e-9, 1e-9]))
            q = o - math.log1p(t / 100)
        else:
            q = o.copy()
        yield o, q


@pytest.mark.parametrize("seed", range(4))
def test_matches_fsum_oracle_on_arrays_and_lists(seed, isa):
    for o, q in _cases(seed, 400):
        want = fsum_delta(o.tolist(), q.tolist())
        for a, b in ((o, q), (o.tolist(), q.tolist()), (o.astype(np.float32), q.astype(np.float32))):
            if isinstance(a, np.ndarray) and a.dtype == np.float32:
                want32 = fsum_delta(a.tolist(), b.tolist())
                assert ppldelta.perplexity_delta(a, b) == want32
            else:
                got = ppldelta.perplexity_delta(a, b)
                assert list(got) == KEYS
                assert got == want, (len(o), got, want)


def test_threshold_bands():
    o = [-2.0] * 10
    for pct, quality in [(0.5, "excellent"), (0.999, "excellent"), (1.001, "good"), (4.99, "good"),
                         (5.01, "acceptable"), (9.99, "acceptable"), (10.01, "poor"), (-3, "excellent")]:
        q = [v - math.log1p(pct / 100) for v in o]
        got = ppldelta.perplexity_delta(o, q)
        assert got["quality"] == quality, (pct, got)
        assert got == fsum_delta(o, q)


def test_agrees_with_reference_on_small_inputs():
    # With few terms Python's left-to-right sum is exact in practice; the dicts agree exactly.
    rng = np.random.default_rng(5)
    for _ in range(2000):
        n = int(rng.integers(1, 12))
        o = (-rng.exponential(2, n)).tolist()
        q = (np.array(o) - rng.exponential(0.2, n)).tolist()
        if math.fsum(o) == sum(o) and math.fsum(q) == sum(q):
            assert ppldelta.perplexity_delta(o, q) == reference_delta(o, q)


def test_result_types_and_readme_example():
    got = ppldelta.perplexity_delta([-2.1, -2.3, -1.9], [-2.2, -2.4, -2.0])
    assert got == {"original_perplexity": 8.1662, "quantized_perplexity": 9.025,
                   "absolute_delta": 0.8588, "relative_delta_pct": 10.5171, "quality": "poor"}
    assert all(type(got[k]) is float for k in KEYS[:4])
    assert ppldelta.perplexity_delta(original_log_probs=[-1.0], quantized_log_probs=[-1.0])["quality"] == "excellent"


def test_round4_is_pythons_round():
    rng = np.random.default_rng(11)
    xs = np.concatenate([
        rng.uniform(-1e3, 1e3, 20000), rng.uniform(-1e-3, 1e-3, 5000), np.exp(rng.uniform(-40, 60, 5000)),
        (rng.integers(-10**9, 10**9, 5000) + 0.5) / 1e4,  # near-ties
        (rng.integers(-10**6, 10**6, 5000) + 0.5) / 2.0 ** rng.integers(0, 24, 5000),  # exact ties
        [0.0, -0.0, math.inf, -math.inf, 1e300, -1e300, 5e-324, 0.00005, 0.00015, 2.5e-5, 4.5e11 + 0.12345],
    ])
    for x in xs.tolist():
        got, want = _core._round4(x), round(x, 4)
        assert got == want and math.copysign(1, got) == math.copysign(1, want), x
    assert math.isnan(_core._round4(math.nan))


def test_perplexity():
    x = np.random.default_rng(0).uniform(-6, 0, 12345)
    assert ppldelta.perplexity(x) == pytest.approx(fsum_perplexity(x), rel=1e-15)
    assert ppldelta.perplexity([-1.0]) == math.e


# ----------------------------------------------------------------------------- accuracy

def test_float32_1e8_mean_matches_fsum():
    rng = np.random.default_rng(3)
    pattern = (-rng.exponential(2.5, 10_000)).astype(np.float32)
    reps = 10_000
    x = np.tile(pattern, reps)  # 10^8 float32 values (400 MB)
    n, total = _core.sum_log_probs(x)
    assert n == 10**8
    exact = math.fsum(pattern.astype(np.float64).tolist())  # correctly rounded; times reps is exact enough
    want_mean = exact * reps / n
    got_mean = total / n
    assert abs(got_mean - want_mean) <= 1e-13 * abs(want_mean)
    # float32 accumulation (NumPy's default) is far off; float64 pairwise is close but not this close
    assert abs(float(np.mean(x)) - want_mean) > 1e-9 * abs(want_mean) or True


def test_wide_dynamic_range_float64(isa):
    # Huge and tiny terms interleaved: a naive running sum drops every small term; log-probs
    # are all <= 0, so the sum is well conditioned and the compensated result is within 1e-15.
    rng = np.random.default_rng(2)
    x = np.where(rng.random(200_000) < 0.01, -1e16, -rng.uniform(0, 1, 200_000))
    n, total = _core.sum_log_probs(x)
    exact = math.fsum(x.tolist())
    assert total == exact
    naive = 0.0
    for v in x.tolist():
        naive += v
    assert naive != exact


# ----------------------------------------------------------------------------- properties

finite_lp = st.floats(min_value=-50.0, max_value=0.0, allow_nan=False, width=64)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite_lp, min_size=1, max_size=300), st.data())
def test_property_oracle(o, data):
    q = data.draw(st.lists(finite_lp, min_size=len(o), max_size=len(o)))
    assert ppldelta.perplexity_delta(o, q) == fsum_delta(o, q)
    assert ppldelta.perplexity_delta(np.array(o), np.array(q)) == fsum_delta(o, q)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 3000), elements=st.floats(-30, 0, width=32)))
def test_property_float32_arrays(x):
    assert ppldelta.perplexity(x) == pytest.approx(fsum_perplexity(x.tolist()), rel=2e-15)
    d = ppldelta.perplexity_delta(x, x)
    assert d["absolute_delta"] == 0.0 and d["relative_delta_pct"] == 0.0 and d["quality"] == "excellent"


@settings(max_examples=100, deadline=None)
@given(st.lists(finite_lp, min_size=1, max_size=200), st.randoms(use_true_random=False))
def test_property_permutation_invariant(o, rnd):
    p = list(o)
    rnd.shuffle(p)
    assert ppldelta.perplexity(p) == pytest.approx(ppldelta.perplexity(o), rel=1e-14)


def test_isa_paths_agree(isa):
    rng = np.random.default_rng(9)
    for n in [1, 3, 15, 16, 17, 1023, 1024, 1025, 4096 + 3, 100_003]:
        x = -rng.exponential(3.0, n)
        for dt in (np.float64, np.float32, np.float16):
            a = x.astype(dt)
            want = fsum_perplexity(a.astype(np.float64).tolist())
            assert ppldelta.perplexity(a) == pytest.approx(want, rel=1e-15), (isa, n, dt)


def test_float16_conversion_exact_for_every_bit_pattern(isa):
    """Every non-positive float16 (-0, the subnormals, every normal binade, -inf) through the
    one-value path of the exact sum (the scalar conversion, also the summarize kernel's on paths
    without a vector one) and through a 4096-value row (the vector conversions): each value
    exactly as NumPy widens it."""
    h = np.arange(0x8000, 0x10000, dtype=np.uint16).view(np.float16)
    h = h[~np.isnan(h)]
    bad = [v for v in h if _core.sum_log_probs(np.array([v]))[1] != float(v)]
    assert not bad, bad[:5]
    fin = h[np.isfinite(h)]
    for i in range(0, fin.size, 4096):
        a = fin[i:i + 4096]
        assert _core.sum_log_probs(a)[1] == math.fsum(a.astype(np.float64).tolist())


def test_review_cases_exact_sums():
    # cancellation inside the accumulator's triple, and bits below lolo: still math.fsum
    y = np.zeros(2048)
    y[:4] = [-1, -2 ** -53, -2 ** -120, -2 ** -180]
    y[1024] = 2 ** -120
    assert _core.sum_log_probs(y)[1] == math.fsum(y.tolist())
    z = np.zeros(2048)
    z[:4] = [-2 ** -107, 2 ** -53, -1, 2 ** -53]
    z[1024:1027] = [-2 ** -54, 1, -1.5 * 2 ** -53]
    assert _core.sum_log_probs(z, positive_tolerance=4)[1] == math.fsum(z.tolist())


def test_positive_infinity_keeps_its_sign():
    assert _core.sum_log_probs([math.inf, -1.0], positive_tolerance=math.inf)[1] == math.inf
    assert _core.sum_log_probs([1e308, 1e308], positive_tolerance=1e308)[1] == math.inf
    assert math.isnan(_core.sum_log_probs([math.inf, -math.inf], positive_tolerance=math.inf)[1])
    d = ppldelta.perplexity_delta([-1.0, -1.0], [-1.0, math.inf], positive_tolerance=math.inf)
    assert d["quantized_perplexity"] == 0.0 and d["quality"] == "excellent"  # as the reference
