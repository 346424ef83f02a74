"""token_log_probs / kl_divergence against the NumPy float64 oracle on every SIMD path and dtype."""
import numpy as np
import pytest

import ppldelta
from oracle import logits_oracle

try:
    import torch
except ImportError:  # the NumPy-only core is tested without torch
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

RNG = np.random.default_rng(7)


def _ref(a, b, t):
    """The NumPy float64 oracle (tests/oracle.py) on rows of any leading shape."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    V = a.shape[-1]
    r = logits_oracle(a.reshape(-1, V), b.reshape(-1, V), np.asarray(t).reshape(-1))
    return {k: v.reshape(a.shape[:-1]) for k, v in r.items()}


@pytest.mark.parametrize("V", [1, 7, 16, 1000, 1024, 1031, 5003])
def test_matches_oracle_float32(V, isa):
    a = RNG.normal(0, 4, (23, V)).astype(np.float32)
    b = (a + RNG.normal(0, 0.5, a.shape)).astype(np.float32)
    t = RNG.integers(0, V, 23)
    ref = _ref(a, b, t)
    np.testing.assert_allclose(ppldelta.token_log_probs(a, t), ref["lp_a"], atol=1e-5, rtol=0)
    k = ppldelta.kl_divergence(a, b, targets=t, reverse=True)
    np.testing.assert_allclose(k["kld"], ref["kld"], atol=1e-5)
    np.testing.assert_allclose(k["kld_reverse"], ref["kld_rev"], atol=1e-5)
    np.testing.assert_allclose(k["quantized_log_probs"], ref["lp_b"], atol=1e-5)
    assert (k["same_top1"] == ref["same"]).all()
    if V >= 10:
        assert (k["top1_in_top5"] == ref["top5"]).all() and (k["top1_in_top10"] == ref["top10"]).all()
        assert (k["quantized_top1_in_original_top5"] == ref["rtop5"]).all()
    np.testing.assert_allclose(k["delta_p"], np.exp(ref["lp_b"]) - np.exp(ref["lp_a"]), atol=1e-6)


def test_float64_is_exact_and_3d_shapes():
    a = RNG.normal(0, 10, (2, 3, 300))
    t = RNG.integers(0, 300, (2, 3))
    ref = _ref(a, a, t)["lp_a"]
    got = ppldelta.token_log_probs(a, t)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, ref, atol=1e-12)


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_and_bfloat16_tensors(dtype, isa):
    dtype = getattr(torch, dtype)
    a = torch.from_numpy(RNG.normal(0, 3, (17, 2050)).astype(np.float32)).to(dtype)
    b = (a.float() + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).to(dtype)
    t = torch.from_numpy(RNG.integers(0, 2050, 17))
    ref = _ref(a.float().numpy(), b.float().numpy(), t.numpy())
    np.testing.assert_allclose(ppldelta.token_log_probs(a, t), ref["lp_a"], atol=1e-5)
    k = ppldelta.kl_divergence(a, b, targets=t)
    np.testing.assert_allclose(k["kld"], ref["kld"], atol=1e-5)
    # raw bfloat16 bits in a uint16 array
    if dtype == torch.bfloat16:
        raw = a.view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_allclose(ppldelta.token_log_probs(raw, t.numpy(), bf16=True), ref["lp_a"], atol=1e-5)


def test_ignore_index_and_masked_vocab():
    a = RNG.normal(0, 2, (5, 50)).astype(np.float32)
    a[:, 40:] = -np.inf  # masked tokens in both models
    b = a + 0.1
    t = np.array([3, -100, 7, 45, -100])
    lp = ppldelta.token_log_probs(a, t)
    assert np.isnan(lp[1]) and np.isnan(lp[4]) and lp[3] == -np.inf
    k = ppldelta.kl_divergence(a, b)
    assert np.isfinite(k["kld"]).all() and (k["kld"] < 1e-6).all()  # a shift changes nothing


def test_identical_rows_give_zero_kld():
    a = RNG.normal(0, 5, (9, 4099)).astype(np.float32)
    k = ppldelta.kl_divergence(a, a.copy(), reverse=True)
    assert (k["kld"] >= 0).all() and k["kld"].max() < 1e-6 and k["same_top1"].all()
    assert k["top1_in_top5"].all()


def test_errors():
    a = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match=r"targets\[1\] = 10 is outside the vocabulary \[0, 10\)"):
        ppldelta.token_log_probs(a, [0, 10, 2])
    bad = a.copy()
    bad[2, 4] = np.nan
    with pytest.raises(ValueError, match="logits row 2 contains NaN"):
        ppldelta.token_log_probs(bad, [0, 1, 2])
    with pytest.raises(ValueError, match="shape mismatch"):
        ppldelta.kl_divergence(a, np.zeros((3, 11), np.float32))
    with pytest.raises(ValueError, match="targets has shape"):
        ppldelta.token_log_probs(a, [0, 1])
    with pytest.raises(TypeError):
        ppldelta.token_log_probs(a.astype(np.complex64), [0, 1, 2])


def test_threads_agree():
    a = RNG.normal(0, 3, (301, 777)).astype(np.float32)
    b = a + 0.3
    k1 = ppldelta.kl_divergence(a, b, threads=1)
    k4 = ppldelta.kl_divergence(a, b, threads=4)
    np.testing.assert_array_equal(k1["kld"], k4["kld"])


def test_strided_rows_and_no_row_copies():
    big = RNG.normal(0, 3, (40, 600)).astype(np.float32)
    view = big[::3, :500]  # rows contiguous, row stride 2400 bytes
    t = RNG.integers(0, 500, view.shape[0])
    ref = _ref(view, view, t)["lp_a"]
    np.testing.assert_allclose(ppldelta.token_log_probs(view, t), ref, atol=1e-5)


def test_neg_inf_logits_contribute_nothing_on_every_path(isa):
    # review finding: the SIMD exp returned 1e-38 for -inf, so KL came out 0 instead of ~0.01
    rng = np.random.default_rng(5)
    a = rng.normal(0, 2, (4, 64)).astype(np.float32)
    b = (a + 0.3 * rng.normal(0, 1, a.shape)).astype(np.float32)
    a[0, 3] = -np.inf           # only the original masks a token
    a[1, 5] = b[1, 5] = -np.inf  # both do
    b[2, 7] = -np.inf           # only the quantized model: KL(P||Q) = inf
    ref = _ref(a, b, np.zeros(4, np.int64))
    k = ppldelta.kl_divergence(a, b, reverse=True)
    np.testing.assert_allclose(k["kld"][[0, 1, 3]], ref["kld"][[0, 1, 3]], atol=1e-5)
    assert k["kld"][2] == np.inf and np.isfinite(k["kld_reverse"][2])


def test_zero_rows_and_unusual_targets():
    empty = np.zeros((0, 5), np.float32)
    assert ppldelta.token_log_probs(empty, np.zeros(0, np.int64)).shape == (0,)
    assert ppldelta.kl_divergence(empty, empty)["kld"].shape == (0,)
    a = RNG.normal(0, 1, (3, 9)).astype(np.float32)
    t = np.array([1, 2, 8])
    want = ppldelta.token_log_probs(a, t)
    for tt in (t.astype(">i8"), t.astype(np.int16), t.astype(np.uint8)):
        np.testing.assert_array_equal(ppldelta.token_log_probs(a, tt), want)
    from ppldelta import _core
    lp = _core.logits_stats(a, None, t.astype(">i8"))[0]  # the C layer itself converts too
    np.testing.assert_array_equal(lp, want)


def _zoo(V, dtype, rng):
    """Rows with extreme values, each next to ordinary ones (vocabularies across chunks)."""
    big = 3e38 if dtype == np.float32 else 1e300
    rows = []
    for k in (0, V // 2, V - 1):
        a = rng.normal(0, 3, V)
        b = a + rng.normal(0, 0.3, V)
        a[k] = b[k] = a.max() + 1.0

        def var(f):
            x, y = a.copy(), b.copy()
            f(x, y)
            rows.append((x, y))
        j = (k + 1) % V
        var(lambda x, y: (x.__setitem__(j, x[k] - 90), y.__setitem__(j, -np.inf)))      # P_j = e^-90, Q_j = 0
        var(lambda x, y: (x.__setitem__(j, x[k] - 800), y.__setitem__(j, -np.inf)))     # P_j underflows: still inf
        var(lambda x, y: x.__setitem__(j, -np.inf))                                     # Q_j > 0 = P_j
        var(lambda x, y: (x.__setitem__(j, -np.inf), y.__setitem__(j, -np.inf)))        # both masked
        var(lambda x, y: (x.__setitem__(k, big), y.__setitem__(k, -big)))               # a - b beyond float32
        var(lambda x, y: (x.__setitem__(j, x[k] - 90), y.__setitem__(j, -big / 3)))     # tiny P, huge a - b
        var(lambda x, y: y.__setitem__(j, -big))                                        # huge b - a one way
        var(lambda x, y: (x.__setitem__(slice(None), -np.inf), x.__setitem__(k, 0.0)))  # one-hot P
        var(lambda x, y: (x.__setitem__(j, big), y.__setitem__(j, big)))                # huge but equal
    a = np.array([r[0] for r in rows], dtype=dtype)
    b = np.array([r[1] for r in rows], dtype=dtype)
    return a, b


@pytest.mark.parametrize("V", [2, 7, 40, 1500, 2051])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_rows_match_float64_oracle_on_every_path(V, dtype, isa):
    from oracle import logits_oracle

    rng = np.random.default_rng(V)
    a, b = _zoo(V, dtype, rng)
    t = rng.integers(0, V, a.shape[0])
    t[:] = np.where(np.isfinite(a[np.arange(len(t)), t]) & np.isfinite(b[np.arange(len(t)), t]), t, a.argmax(-1))
    ref = logits_oracle(a, b, t)
    k = ppldelta.kl_divergence(a, b, targets=t, reverse=True)
    fin = lambda x: np.where(np.isfinite(x), np.abs(x), 0).max(-1)  # noqa: E731
    scale = np.maximum(fin(a.astype(np.float64)), fin(b.astype(np.float64)))
    for key, want in (("kld", ref["kld"]), ("kld_reverse", ref["kld_rev"])):
        got = k[key]
        assert (np.isinf(got) == np.isinf(want)).all(), (isa, key, got, want)
        with np.errstate(invalid="ignore"):
            ok = np.isinf(want) | (np.abs(got - want) <= 1e-5 + 1e-5 * np.abs(want) + 1e-13 * scale)
        assert ok.all(), (isa, key, got[~ok], want[~ok])
    lp = ppldelta.token_log_probs(a, t)
    np.testing.assert_allclose(lp, ref["lp_a"], rtol=1e-6, atol=1e-5 + 1e-13 * scale.max())
    np.testing.assert_allclose(k["quantized_log_probs"], ref["lp_b"], rtol=1e-6, atol=1e-5 + 1e-13 * scale.max())
    assert (k["same_top1"] == ref["same"]).all()
    assert (k["top1_in_top5"] == ref["top5"]).all() and (k["top1_in_top10"] == ref["top10"]).all()
    assert (k["quantized_top1_in_original_top5"] == ref["rtop5"]).all()
    assert (k["quantized_top1_in_original_top10"] == ref["rtop10"]).all()


@pytest.mark.parametrize("lo, hi, V", [(-0.45, 0.45, 150), (-2, 0, 150), (-0.3, 0.3, 1000), (-1, 1, 4099), (-6, 0, 1000)])
def test_log_probs_are_unbiased_on_every_path(lo, hi, V, isa):
    # rounding errors average out over tokens, a biased exp does not: a perplexity is
    # exp(-mean log-prob), and near-uniform rows put every exp in one narrow part of the range
    # reduction (a degree-5 polynomial or a 2^(k/32) table missed by 1e-8 to 3.4e-8 here)
    rng = np.random.default_rng(3)
    a = rng.uniform(lo, hi, (2000, V)).astype(np.float32)
    t = rng.integers(0, V, 2000)
    err = ppldelta.token_log_probs(a, t) - _ref(a, a, t)["lp_a"]
    assert abs(err.mean()) < 1e-8 and np.abs(err).max() < 1e-6


def _nasty_rows(V, rng):
    """Rows whose exps leave the fast path: -inf runs (a whole first chunk, a chunk boundary),
    logits 80-110 below the max (subnormal exps), finite logits near -FLT_MAX, -1e6."""
    a = rng.normal(0, 3, (6, V))
    a[0, : min(V, 1100)] = -np.inf
    a[0, -1] = 1.0
    a[1, V // 2: V // 2 + 40] = -np.inf
    a[2, ::7] = a[2].max() - rng.uniform(80, 110, a[2, ::7].shape)
    a[3, 1::5] = -3e38
    a[4, ::3] = -1e6
    a[5, :] = rng.uniform(-0.5, 0.5, V)
    return a.astype(np.float32)


@pytest.mark.parametrize("V", [40, 1024, 2100, 3000])
def test_far_below_the_max_and_masked_runs_match_oracle(V, isa):
    rng = np.random.default_rng(V)
    a = _nasty_rows(V, rng)
    b = a.copy()
    fin = np.isfinite(a)
    b[fin] += rng.normal(0, 0.3, fin.sum()).astype(np.float32)
    t = np.array([int(np.flatnonzero(np.isfinite(r))[0]) for r in a])
    ref = _ref(a, b, t)
    lp = ppldelta.token_log_probs(a, t)
    np.testing.assert_allclose(lp, ref["lp_a"], atol=1e-5, rtol=0)
    k = ppldelta.kl_divergence(a, b, targets=t, reverse=True)
    np.testing.assert_allclose(k["kld"], ref["kld"], atol=1e-5)
    np.testing.assert_allclose(k["kld_reverse"], ref["kld_rev"], atol=1e-5)
    # one exp, one summation order: log-probs from the KL kernel equal token_log_probs bit for bit
    np.testing.assert_array_equal(k["original_log_probs"], lp)
    np.testing.assert_array_equal(k["quantized_log_probs"], ppldelta.token_log_probs(b, t))


@pytest.mark.parametrize("V", [40, 1024, 2100])
@pytest.mark.parametrize("where", ["first", "vector", "tail", "after -inf chunk", "in -inf chunk", "in -inf first chunk",
                                   "near -FLT_MAX"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_anywhere_are_named_on_every_path(V, where, bad, isa):
    # the SIMD max pass no longer looks for NaN: it shows in the sums of the exps (or in the
    # careful pass); every position must still be named
    rng = np.random.default_rng(1)
    a = rng.normal(0, 2, (3, V)).astype(np.float32)
    j = {"first": 0, "vector": V // 2 - 3, "tail": V - 1, "after -inf chunk": V - 2,
         "in -inf chunk": V - 2, "in -inf first chunk": 5, "near -FLT_MAX": V // 3}[where]
    if where == "after -inf chunk":
        a[1, : V - 1] = -np.inf
    elif where == "in -inf chunk":
        a[1, V - 8: V - 1] = -np.inf
    elif where == "in -inf first chunk":  # the running max is still -inf there
        a[1, : min(1024, V - 1)] = -np.inf
    elif where == "near -FLT_MAX":
        a[1, ::2] = -3e38
    a[1, j] = bad
    with pytest.raises(ValueError, match="logits row 1 contains NaN"):
        ppldelta.token_log_probs(a, [0, 0, 0])
    for x, y in ((a, np.zeros_like(a)), (np.zeros_like(a), a)):
        with pytest.raises(ValueError, match="logits row 1 contains NaN"):
            ppldelta.kl_divergence(x, y)
