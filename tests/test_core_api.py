"""The C core's entry points for the analysis layer: reference, quality, paired_moments, and the
named results (PairedMoments, LogitsStats), against oracles written here."""
import math

import numpy as np
import pytest

import ppldelta
from ppldelta import _core
from oracle import fsum_delta, lane_errors_that_cancel

BLOCK = _core.BLOCK
NAMES = ("original_log_probs", "quantized_log_probs")


# ----------------------------------------------------------------------------- oracles

def quality_oracle(rel):
    return ("excellent" if rel < 1.0 else "good" if rel < 5.0
            else "acceptable" if rel < 10.0 else "poor")


def reference_oracle(so, sq, n):
    """The reference's formulas on given sums (Python floats; inf where exp overflows)."""
    def ex(x):
        try:
            return math.exp(x)
        except OverflowError:
            return math.inf
    ppl_o, ppl_q = ex(-(so / n)), ex(-(sq / n))
    if math.isinf(ppl_o):
        raise ValueError("overflows")
    ab = ppl_q - ppl_o
    rel = (ab / ppl_o) * 100 if ppl_o > 0 else 0.0
    return {"original_perplexity": round(ppl_o, 4), "quantized_perplexity": round(ppl_q, 4),
            "absolute_delta": round(ab, 4), "relative_delta_pct": round(rel, 4),
            "quality": quality_oracle(rel)}


def moments_oracle(o, q, codes=None, n_groups=0, block_size=0):
    """float64 loops (numpy for the element-wise values, math.fsum for the sums)."""
    o = np.asarray(o, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    with np.errstate(all="ignore"):
        dp = np.exp(q) - np.exp(o)
        d = o - q
        out = {"n": o.size, "sum_o": math.fsum(o.tolist()), "sum_q": math.fsum(q.tolist()),
               "sum_oo": (o * o).tolist(), "sum_qq": (q * q).tolist(), "sum_oq": (o * q).tolist(),
               "sum_dp": dp.tolist(), "sum_dp2": (dp * dp).tolist(), "sum_dp4": (dp ** 4).tolist(),
               "n_neginf_o": int(np.isneginf(o).sum()), "n_neginf_q": int(np.isneginf(q).sum())}
    if codes is not None:
        codes = np.asarray(codes)
        out["group_n"] = np.bincount(codes, minlength=n_groups).tolist()
        out["group_sum_o"] = [math.fsum(o[codes == g].tolist()) for g in range(n_groups)]
        out["group_sum_q"] = [math.fsum(q[codes == g].tolist()) for g in range(n_groups)]
    if block_size:
        out["block_d"] = [d[i:i + block_size].tolist() for i in range(0, o.size, block_size)]
    return out


def _close_sum(got, terms, rel=1e-13):
    """got is a compensated sum of terms: within a few ulps of the exact sum of |terms|."""
    if not all(map(math.isfinite, terms)):
        want = sum(terms)  # IEEE: inf, or NaN for inf - inf or 0 * inf
        return (math.isnan(got) and math.isnan(want)) or got == want
    want = math.fsum(terms)
    return abs(got - want) <= rel * (math.fsum(map(abs, terms)) + 1e-300)


def check_moments(m, o, q, codes=None, n_groups=0, block_size=0):
    want = moments_oracle(o, q, codes, n_groups, block_size)
    assert type(m) is _core.PairedMoments
    assert m.n == want["n"]
    for k in ("sum_o", "sum_q"):  # exactly rounded
        got = getattr(m, k)
        assert got == want[k] or (math.isnan(got) and math.isnan(want[k])), (k, got, want[k])
    assert m.sum_o == _core.sum_log_probs(o, positive_tolerance=math.inf)[1] or math.isnan(m.sum_o)
    for k in ("sum_oo", "sum_qq", "sum_oq", "sum_dp", "sum_dp2", "sum_dp4"):
        assert _close_sum(getattr(m, k), want[k]), (k, getattr(m, k))
    assert (m.n_neginf_o, m.n_neginf_q) == (want["n_neginf_o"], want["n_neginf_q"])
    if codes is None:
        assert m.group_n is None and m.group_sum_o is None and m.group_sum_q is None
    else:
        assert m.group_n.dtype == np.int64 and m.group_sum_o.dtype == np.float64
        assert m.group_n.tolist() == want["group_n"]
        assert m.group_sum_o.tolist() == want["group_sum_o"]
        assert m.group_sum_q.tolist() == want["group_sum_q"]
    if not block_size:
        assert m.block_d is None
    else:
        assert m.block_d.dtype == np.float64 and len(m.block_d) == len(want["block_d"])
        for got, terms in zip(m.block_d.tolist(), want["block_d"]):
            assert _close_sum(got, terms), (got, terms)


def _pairs(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 5000):
        o = -rng.exponential(2.0, n) ** 1.3
        q = np.minimum(o + rng.normal(0, 0.1, n), 0.0)
        yield o, q


# ----------------------------------------------------------------------------- quality, reference

def test_quality_bands():
    assert _core.QUALITIES == ("excellent", "good", "acceptable", "poor")
    assert _core.QUALITY_THRESHOLDS == (1.0, 5.0, 10.0)
    for rel in (-math.inf, -5.0, 0.0, 0.999, math.nextafter(1.0, 0), 1.0, 4.99, 5.0,
                math.nextafter(10.0, 0), 10.0, 1e300, math.inf):
        assert _core.quality(rel) == quality_oracle(rel), rel
    assert _core.quality(math.nan) == "poor"
    assert _core.quality(relative_delta_pct=3) == "good"
    with pytest.raises(TypeError):
        _core.quality("3")


def test_reference_matches_fsum_oracle_and_perplexity_delta():
    rng = np.random.default_rng(0)
    for i in range(500):
        n = int(rng.integers(1, 300))
        o = -rng.exponential(rng.uniform(0.1, 5), n)
        q = np.minimum(o - rng.normal(0, 0.1, n), 0.0)
        if i % 5 == 0:  # near a threshold
            q = o - math.log1p(float(rng.choice([1.0, 5.0, 10.0])) / 100)
        so, sq = math.fsum(o.tolist()), math.fsum(q.tolist())
        got = _core.reference(so, sq, n)
        assert list(got) == ["original_perplexity", "quantized_perplexity", "absolute_delta",
                             "relative_delta_pct", "quality"]
        assert got == fsum_delta(o.tolist(), q.tolist()) == ppldelta.perplexity_delta(o, q)
        assert got == reference_oracle(so, sq, n)


def test_reference_infinities_and_overflow():
    inf = math.inf
    got = _core.reference(-10.0, -inf, 10)
    assert got == {"original_perplexity": round(math.e, 4), "quantized_perplexity": inf,
                   "absolute_delta": inf, "relative_delta_pct": inf, "quality": "poor"}
    assert got == ppldelta.perplexity_delta([-1.0] * 10, [-1.0] * 9 + [-inf])
    # huge perplexities: round(x, 4) beyond 2^52 / 1e4 goes through float.__round__
    got = _core.reference(-1.0, -700.0, 1)
    assert got == reference_oracle(-1.0, -700.0, 1)
    assert _core.reference(sum_q=-2.0, sum_o=-1.0, n=1) == reference_oracle(-1.0, -2.0, 1)
    for so, n in ((-inf, 3), (-710.0 * 4, 4), (-1e308 * 10, 1)):
        with pytest.raises(ValueError) as a:
            _core.reference(so, -1.0, n)
        vals = [so / n] if math.isfinite(so / n) else [-inf]
        with pytest.raises(ValueError) as b:
            ppldelta.perplexity_delta(vals * n, [-1.0] * n)
        assert str(a.value) == str(b.value)
        assert "the original model's perplexity overflows a float" in str(a.value)
    with pytest.raises(ValueError, match="n must be >= 1"):
        _core.reference(-1.0, -1.0, 0)
    with pytest.raises(TypeError):
        _core.reference(-1.0, -1.0, 1.5)
    with pytest.raises(TypeError, match="missing required argument 'n'"):
        _core.reference(-1.0, -1.0)


# ----------------------------------------------------------------------------- paired_moments

@pytest.mark.parametrize("seed", range(2))
def test_paired_moments_arrays_lists_views(isa, seed):
    for o, q in _pairs(seed):
        n = o.size
        codes = np.random.default_rng(n).integers(0, 3, n)
        for a, b in ((o, q), (o.tolist(), q.tolist()), (tuple(o), tuple(q)),
                     (o.astype(np.float32), q.astype(np.float32)),
                     (o.astype(np.float16), q.astype(np.float16))):
            check_moments(_core.paired_moments(a, b), a, b)
            check_moments(_core.paired_moments(a, b, codes, 3, 7), a, b, codes, 3, 7)
        # strided, reversed, 2-D Fortran order, byte-swapped, unaligned: one C-order read
        o2, q2 = np.repeat(o, 2)[::2], np.repeat(q, 2)[1::2]
        check_moments(_core.paired_moments(o2, q2, block_size=BLOCK), o2, q2, block_size=BLOCK)
        check_moments(_core.paired_moments(o[::-1], q[::-1]), o[::-1], q[::-1])
        if n % 2 == 0:
            of = np.asfortranarray(o.reshape(2, -1))
            qs = q.astype(">f8")
            check_moments(_core.paired_moments(of, qs, codes, 3, 5), of, qs, codes, 3, 5)
        buf = np.zeros(8 * n + 1, np.uint8)
        ou = buf[1:].view(np.float64)
        ou[:] = o
        assert not ou.flags.aligned
        check_moments(_core.paired_moments(ou, q, block_size=3), ou, q, block_size=3)


def test_paired_moments_integers_bools_and_adapters():
    o = np.array([-1, -2, 0, -3], np.int32)
    q = np.array([0, 0, 0, 0], np.bool_)
    check_moments(_core.paired_moments(o, q), o, q)
    with pytest.raises(Exception) as a:
        ppldelta.perplexity_delta(np.ma.array([-1.0, -2.0], mask=[0, 1]), [-1.0, -1.0])
    with pytest.raises(type(a.value)) as b:
        _core.paired_moments(np.ma.array([-1.0, -2.0], mask=[0, 1]), [-1.0, -1.0])
    assert str(a.value) == str(b.value)  # a masked array is refused, as perplexity_delta does

    class Dl:  # a DLPack-only object
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    x, y = -np.arange(5.0), -np.arange(5.0)[::-1].copy()
    check_moments(_core.paired_moments(Dl(x), Dl(y)), x, y)


def test_paired_moments_infinities(isa):
    n = 3 * BLOCK + 3
    o = -np.linspace(0, 5, n)
    q = o - 0.25
    o[[0, BLOCK + 2]] = -np.inf
    q[[5, BLOCK + 2, n - 1]] = -np.inf
    codes = np.arange(n) % 4
    m = _core.paired_moments(o, q, codes, 4, 100)
    check_moments(m, o, q, codes, 4, 100)
    assert m.sum_o == -math.inf and m.sum_q == -math.inf and (m.n_neginf_o, m.n_neginf_q) == (2, 3)
    assert not math.isnan(m.sum_o) and not math.isnan(m.sum_q)
    assert math.isnan(m.block_d[(BLOCK + 2) // 100])  # -inf - -inf
    # o = -inf, q = 0: o * q is NaN (IEEE), the sums stay -inf and 0
    m = _core.paired_moments([-math.inf, -1.0], [0.0, -1.0])
    assert math.isnan(m.sum_oq) and m.sum_oo == math.inf and m.sum_o == -math.inf
    assert m.sum_q == -1.0 and m.sum_dp == 1.0
    # positive_tolerance=inf: +inf is a value; both infinities give NaN, as sum_log_probs
    m = _core.paired_moments([math.inf, -math.inf], [1.0, 2.0], positive_tolerance=math.inf)
    assert math.isnan(m.sum_o) and m.sum_q == 3.0


def test_paired_moments_exact_on_hard_sums(isa):
    # lane errors that cancel (test_exact): the superaccumulator decides, for totals and groups
    x, want = lane_errors_that_cancel(BLOCK)
    other = -np.random.default_rng(3).exponential(1.0, x.size)
    for form in (x, x.tolist()):
        m = _core.paired_moments(form, other, np.zeros(x.size, np.intp), 1)
        assert m.sum_o == want and m.group_sum_o[0] == want
        assert m.sum_q == math.fsum(other.tolist()) == m.group_sum_q[0]
    codes = np.tile([0, 1], x.size)
    xx = np.ravel(np.column_stack([x, other]))
    m = _core.paired_moments(xx, xx[::-1].copy(), codes, 2)
    assert m.group_sum_o.tolist() == [want, math.fsum(other.tolist())]


def _both_raise(a, b, **kw):
    with pytest.raises(Exception) as e1:
        ppldelta.perplexity_delta(a, b, **kw)
    with pytest.raises(type(e1.value)) as e2:
        _core.paired_moments(a, b, **kw)
    assert str(e1.value) == str(e2.value)
    return str(e2.value)


def test_paired_moments_errors_are_perplexity_deltas():
    n = 3 * BLOCK
    o, q = -np.ones(n), -np.ones(n)
    _both_raise([], [-1.0])
    _both_raise([-1.0], [])
    assert "length mismatch" in _both_raise(o, q[:-1])
    for i, j in ((5, 2 * BLOCK), (2 * BLOCK, 5), (None, 7), (7, None)):
        a, b = o.copy(), q.copy()
        if i is not None:
            a[i] = np.nan
        if j is not None:
            b[j] = 0.5
        msg = _both_raise(a, b)
        assert ("original_log_probs contains NaN" in msg) == (i is not None)
        _both_raise(a.tolist(), b.tolist())
        _both_raise(a.astype(np.float32), b.reshape(3, -1).T)  # NpyIter path, flat C index
    _both_raise([-1.0, "x"], [-1.0, -2.0])
    _both_raise([-1.0, -2.0], [-1.0, None])
    _both_raise([-1.0, -2.0] * BLOCK, [-1.0, "x"] * BLOCK)  # a bad q item before o's NaN:
    _both_raise([-1.0] * (2 * BLOCK - 1) + [math.nan], [-1.0, "x"] * BLOCK)  # o's error first
    _both_raise(np.array([1j, 2j]), [-1.0, -1.0])
    _both_raise(np.array([-1.0, 0.5]), [-1.0, -1.0], positive_tolerance=0.1)
    _both_raise(np.array([-1.0, 0.5]), [-1.0, -1.0], positive_tolerance=-1)
    _core.paired_moments(np.array([-1.0, 0.5]), [-1.0, -1.0], positive_tolerance=1)


def test_paired_moments_argument_errors():
    o = [-1.0, -2.0, -3.0]
    with pytest.raises(ValueError, match=r"code 3 at index 1 outside \[0, 3\)"):
        _core.paired_moments(o, o, [0, 3, 1], 3)
    with pytest.raises(ValueError, match=r"code -1 at index 0"):
        _core.paired_moments(o, o, np.array([-1, 0, 0]), 3)
    with pytest.raises(ValueError, match="2 codes for 3 values"):
        _core.paired_moments(o, o, [0, 1], 3)
    with pytest.raises(ValueError, match="block_size must be >= 0"):
        _core.paired_moments(o, o, block_size=-1)
    with pytest.raises(ValueError, match="n_groups must be >= 0"):
        _core.paired_moments(o, o, [0, 0, 0], -1)
    with pytest.raises(TypeError):
        _core.paired_moments(o, o, [0.5, 0, 0], 1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'groups'"):
        _core.paired_moments(o, o, groups=[0, 0, 0])
    m = _core.paired_moments(quantized_log_probs=o, original_log_probs=o, codes=None, n_groups=4,
                             block_size=2, positive_tolerance=0.0)
    assert m.group_n is None and m.block_d.tolist() == [0.0, 0.0]
    # empty groups; codes in any integer dtype
    m = _core.paired_moments(o, o, np.array([2, 2, 0], np.int8), 4)
    assert m.group_n.tolist() == [1, 0, 2, 0] and m.group_sum_o.tolist() == [-3.0, 0.0, -3.0, 0.0]


def test_paired_moments_is_a_named_tuple():
    m = _core.paired_moments([-1.0, -2.0], [-1.5, -2.5])
    assert len(m) == 15 and m[0] == 2 and m.n == 2
    assert _core.PairedMoments.n_fields == 15
    assert _core.PairedMoments.__module__ == "ppldelta._core"


def test_logits_stats_named_fields():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 10)).astype(np.float32)
    b = a + rng.normal(0, 0.1, a.shape).astype(np.float32)
    t = np.array([1, 2, -100, 3])
    r = _core.logits_stats(a, b, t)
    assert type(r) is _core.LogitsStats and len(r) == 7
    lp_a, lp_b, kld, kld_rev, same, rank_b, rank_a = r  # still a tuple
    assert lp_a is r.lp_a and kld_rev is r.kld_rev and rank_a is r.rank_a
    assert math.isnan(r.lp_a[2]) and r.same_top1.dtype == np.bool_
    r = _core.logits_stats(a)
    assert r.lp_a is None and r.kld is None
    r = _core.logits_stats(a, b, topk=False, threads=2)
    assert r.rank_b is None and r.kld.shape == (4,)
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        _core.logits_stats(a, c=b)
    with pytest.raises(TypeError):
        _core.logits_stats(a, b, t, "x")
