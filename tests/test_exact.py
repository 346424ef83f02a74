"""Exactness of every sum against math.fsum, on inputs built to defeat compensated summation:
exact sums on a rounding tie, broken by a term hidden below several levels of cancellation
(TwoSum error terms that cancel in a lane, the accumulator's third word, huge terms that cancel),
on every SIMD path, arrays and lists, whole inputs and groups.  Plus the superaccumulator
fallback, and infinite sums (one pass, no fallback)."""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppldelta
from ppldelta import _core
from oracle import fsum_delta, lane_errors_that_cancel

BLOCK = _core.BLOCK
FIXTURE_OK = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


def _trunc(r: Fraction) -> float:
    """The double nearest r towards zero (so r - result keeps r's sign)."""
    f = float(r)
    if abs(Fraction(f)) > abs(r):
        f = math.nextafter(f, 0.0)
    return f


def _decompose(r: Fraction) -> list:
    """Doubles of r's sign summing exactly to r (r a dyadic rational)."""
    out = []
    while r != 0:
        f = _trunc(r)
        out.append(f)
        r -= Fraction(f)
    return out


@st.composite
def hidden_ties(draw):
    """(values, positive_tolerance): the exact sum is a rounding tie of the total plus or minus
    terms that every level of a compensated sum can lose:
    - a lane ladder: a big B, then per level x = -3/4 ulp (TwoSum error +ulp/4), a tiny h absorbed
      whole (error h), x = -1/4 ulp (error -ulp/4): the lane's error sum c cancels to 0 and h is
      gone unless it is accounted for;
    - with positive values allowed, a word ladder 2^a, 2^(a-53-i), 2^(a-106-j), 2^(a-159-k) of
      random signs and then -2^a, which leaves the accumulator's lo and lolo words to carry it;
    - the rest of the sum, which puts the total exactly on a tie (random parity) next to the
      hidden terms.
    Layout: 'lane' puts the ladder at positions 32 k of block 0 (lane 0 of vector 0 on every SIMD
    path), 'blocks' one value per block (sequential accumulator adds), 'tail' packed at the end."""
    positive = draw(st.booleans())
    a = draw(st.integers(-30, 40))
    B = -math.ldexp(draw(st.integers(2 ** 52, 2 ** 53 - 1)), a - 52)
    vals, hidden = [B], []
    s = B
    for _ in range(draw(st.integers(1, 3))):
        ulp = math.ulp(s)
        h = draw(st.sampled_from([-1.0, 1.0])) * math.ldexp(1.0, draw(st.integers(-1070, math.frexp(ulp)[1] - 60)))
        for x in (-0.75 * ulp, h, -0.25 * ulp):
            vals.append(x)
            s += x
        hidden.append(h)
    if positive:
        p = draw(st.integers(a, 900))
        ladder = [math.ldexp(1.0, p)] + [draw(st.sampled_from([-1.0, 1.0])) * math.ldexp(1.0, p - 53 * k - draw(st.integers(0, 8)))
                                         for k in (1, 2, 3)] + [-math.ldexp(1.0, p)]
        hidden.extend(ladder[1:4])
        vals.extend(ladder)
    exact = sum(map(Fraction, vals))
    visible = exact - sum(map(Fraction, hidden))
    d = float(visible)
    while Fraction(d) > visible - Fraction(math.ulp(d)):  # a tie below the visible part
        d = math.nextafter(d, -math.inf)
    d = math.nextafter(d, -math.inf) if draw(st.booleans()) else d  # either parity
    tie = Fraction(d) - Fraction(math.ulp(d)) / 2
    rest = _decompose(tie - visible)  # <= 0: needs no positive values
    layout = draw(st.sampled_from(["lane", "blocks", "tail"]))
    if layout == "lane":
        x = np.zeros(2 * BLOCK)
        x[0:32 * len(vals):32] = vals
        x[BLOCK:BLOCK + len(rest)] = rest
    elif layout == "blocks":
        allv = vals + rest
        x = np.zeros(BLOCK * len(allv))
        x[::BLOCK] = allv
    else:
        x = np.array([0.0] * draw(st.integers(0, 3 * BLOCK)) + vals + rest)
    return x, (math.inf if positive else 1e-3)


def _fsum(x):
    return math.fsum(np.asarray(x, dtype=np.float64).tolist())


@FIXTURE_OK
@given(hidden_ties())
def test_hidden_ties_sum_exactly(isa, case):
    x, tol = case
    want = _fsum(x)
    assert _core.sum_log_probs(x, positive_tolerance=tol)[1] == want
    assert _core.sum_log_probs(x.tolist(), positive_tolerance=tol)[1] == want
    assert _core.sum_log_probs(x[::-1].copy(), positive_tolerance=tol)[1] == want
    assert _core.sum_log_probs(np.repeat(x, 2)[::2], positive_tolerance=tol)[1] == want  # strided
    # paired_moments: the same exact sums from its one read of both inputs
    m = _core.paired_moments(x, x[::-1], positive_tolerance=tol)
    assert m.sum_o == want and m.sum_q == want
    m = _core.paired_moments(x.tolist(), np.repeat(x, 2)[::2], positive_tolerance=tol)
    assert m.sum_o == want and m.sum_q == want


@FIXTURE_OK
@given(hidden_ties(), st.data())
def test_hidden_ties_perplexity_delta_and_groups(isa, case, data):
    x, tol = case
    n = len(x)
    if abs(_fsum(x)) / n > 700:
        return
    q = x.copy()
    q[data.draw(st.integers(0, n - 1))] -= data.draw(st.sampled_from([0.0, 0.01, 1.0]))
    want = fsum_delta(x.tolist(), q.tolist())
    assert ppldelta.perplexity_delta(x, q, positive_tolerance=tol) == want
    assert ppldelta.perplexity_delta(x.tolist(), q.tolist(), positive_tolerance=tol) == want
    # the same values as one group among others: segmented sums are exact too
    other = -np.random.default_rng(n).exponential(1.0, n)
    codes = np.repeat([1, 0], n)
    counts, sums = _core.segment_sums(codes, 2, np.concatenate([x, other]))
    assert counts.tolist() == [n, n] and sums[1] == _fsum(x) and sums[0] == _fsum(other)
    codes = np.tile([0, 1], n)
    counts, sums = _core.segment_sums(codes, 2, np.ravel(np.column_stack([x, other])))
    assert sums[0] == _fsum(x) and sums[1] == _fsum(other)
    m = _core.paired_moments(np.ravel(np.column_stack([x, other])),
                             np.ravel(np.column_stack([q, other])), codes, 2, positive_tolerance=tol)
    assert m.group_sum_o.tolist() == [_fsum(x), _fsum(other)]
    assert m.group_sum_q.tolist() == [_fsum(q), _fsum(other)] and m.group_n.tolist() == [n, n]


def test_lane_errors_that_cancel(isa):
    # A lane's TwoSum errors +ulp/4, -2^-200, -ulp/4 sum to 0 in floating point: the certificate
    # must not trust the lane, whatever the SIMD path (before: -2^40 - 2 ulp instead of - 3 ulp).
    x, want = lane_errors_that_cancel(BLOCK)
    before = _core._path_counts()[2]
    assert _core.sum_log_probs(x)[1] == want and _core.sum_log_probs(x.tolist())[1] == want
    assert _core._path_counts()[2] == before + 2  # the superaccumulator decided
    y = x / 2 ** 40  # the same at -1: -1.0000000000000007 (tie) and not -1.0000000000000004
    assert _core.sum_log_probs(y)[1] == math.fsum(y.tolist())


def test_ordinary_inputs_need_no_fallback(isa):
    rng = np.random.default_rng(1)
    before = _core._path_counts()[2]
    for n in (1, 5, 1000, 4097, 100_000):
        for dt in (np.float64, np.float32, np.float16):
            x = (-rng.exponential(2.0, n)).astype(dt)
            assert _core.sum_log_probs(x)[1] == _fsum(x)
    assert _core._path_counts()[2] == before


def _fraction_sum(vals):
    """math.fsum's contract, with overflowing intermediates resolved exactly."""
    t = sum(map(Fraction, vals))
    try:
        return float(t)
    except OverflowError:
        return math.inf if t > 0 else -math.inf


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=40))
def test_superaccumulator_any_doubles(vals):
    # huge, tiny, subnormal, both signs; totals beyond DBL_MAX round to +-inf
    want = _fraction_sum(vals)
    for form in (vals, np.array(vals)):
        assert _core.sum_log_probs(form, positive_tolerance=math.inf)[1] == want
    counts, sums = _core.segment_sums(np.zeros(len(vals), np.intp), 1, np.array(vals))
    assert sums[0] == want


def test_superaccumulator_edges():
    big = 1.7976931348623157e308
    cases = [[big, big, -big], [big, big], [-big, -big, big / 2], [big, math.ulp(big) / 2],
             [big, math.ulp(big) / 2, -5e-324], [5e-324, 5e-324, -5e-324], [2.0 ** -1022, -5e-324],
             [1.0, 2.0 ** -53, 2.0 ** -1074], [1.0, 2.0 ** -53], [-0.0, -0.0], [1e300, -1e300, 1e-300]]
    for vals in cases:
        want = _fraction_sum(vals)
        got = _core.sum_log_probs(vals, positive_tolerance=math.inf)[1]
        assert got == want and math.copysign(1, got) == math.copysign(1, want), vals


# ----------------------------------------------------------------------------- infinite sums

def test_neg_inf_is_one_pass_without_fallback(isa):
    x = np.full(3 * 10 ** 6 + 7, -1.5, np.float32)
    x[12345] = -np.inf
    f0, e0, s0 = _core._path_counts()
    assert _core.sum_log_probs(x) == (x.size, -math.inf)
    assert _core.sum_log_probs(x.tolist()[:5000] + [-math.inf])[1] == -math.inf
    assert ppldelta.perplexity(x) == math.inf
    q = np.full_like(x, -1.25)
    d = ppldelta.perplexity_delta(q, x)  # the quantized model gave a token probability 0
    assert d == {"original_perplexity": round(math.exp(1.25), 4), "quantized_perplexity": math.inf,
                 "absolute_delta": math.inf, "relative_delta_pct": math.inf, "quality": "poor"}
    with pytest.raises(ValueError, match="contains -inf"):
        ppldelta.perplexity_delta(x, q)
    f1, e1, s1 = _core._path_counts()
    assert (f1 - f0, e1 - e0, s1 - s0) == (2, 0, 0)  # certified from the fast pass, no fallback


def test_overflow_is_not_an_infinite_term(isa):
    # finite terms whose running sum overflows: not -inf, the exact total decides
    big = 1.7e308
    x = np.zeros(3 * BLOCK)
    x[[0, 1, 2, BLOCK, 2 * BLOCK + 5]] = [-big, -big, 1e-3, big, big]
    assert _core.sum_log_probs(x, positive_tolerance=big)[1] == _fraction_sum(x.tolist())
    x[2 * BLOCK + 5] = 0.0
    assert _core.sum_log_probs(x, positive_tolerance=big)[1] == _fraction_sum(x.tolist())


def test_both_infinities_give_nan(isa):
    x = np.zeros(2 * BLOCK)
    x[3], x[BLOCK + 7] = -np.inf, np.inf
    f0, e0, s0 = _core._path_counts()
    assert math.isnan(_core.sum_log_probs(x, positive_tolerance=math.inf)[1])
    assert math.isnan(_core.sum_log_probs(x.tolist(), positive_tolerance=math.inf)[1])
    assert _core._path_counts()[2] == s0
    assert math.isnan(_core.segment_sums(np.zeros(x.size, np.intp), 1, x)[1][0])
