"""ppldelta.refstats: reference records and the comparison against them.  Oracles written here:
a float64 full-vocabulary KL in both directions (NumPy), and the two-full-rows path
(ppldelta.kl_divergence / token_log_probs) for the exact statistics."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ppldelta
from ppldelta import refstats as rs

EXACT_FLAGS = {"same_top1": "same_top1", "top1_in_top5": "top1_in_top5", "top1_in_top10": "top1_in_top10",
               "q_top1_in_base_top5": "quantized_top1_in_original_top5",
               "q_top1_in_base_top10": "quantized_top1_in_original_top10"}


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    d = x - m
    return d - np.log(np.exp(d).sum(axis=1, keepdims=True))


def kl_oracle(a, b):
    """KL(P||Q) per row in float64 over the full vocabulary (+inf where p > 0 = q)."""
    la, lb = _log_softmax(a), _log_softmax(b)
    p = np.exp(la)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (la - lb), 0.0)
    # clamped at 0 as the full-row path: a negative is the float64 rounding of a zero
    return np.where(((p > 0) & (lb == -np.inf)).any(axis=1), np.inf, np.maximum(terms.sum(axis=1), 0.0))


def check_bounds(a, b, targets, k):
    rec = rs.summarize(a, targets, k)
    out = rs.compare(b, rec)
    fwd, rev = kl_oracle(a, b), kl_oracle(b, a)
    for name, true in (("kld", fwd), ("kld_reverse", rev)):
        lo, est, hi = out[name + "_lo"], out[name], out[name + "_hi"]
        bad = ~((lo <= true) & (true <= hi))
        assert not bad.any(), (name, k, np.flatnonzero(bad)[:5], lo[bad][:5], true[bad][:5], hi[bad][:5])
        assert ((lo <= est) & (est <= hi)).all()
        assert (lo >= 0).all()
    return rec, out, fwd, rev


def check_exact(a, b, targets, k):
    rec = rs.summarize(a, targets, k)
    out = rs.compare(b, rec)
    ref = ppldelta.kl_divergence(a, b, targets=targets)
    assert np.array_equal(out["original_log_probs"], ppldelta.token_log_probs(a, targets))
    assert np.array_equal(out["quantized_log_probs"], ppldelta.token_log_probs(b, targets))
    assert np.array_equal(out["original_log_probs"], ref["original_log_probs"])
    assert np.array_equal(out["quantized_log_probs"], ref["quantized_log_probs"])
    assert np.array_equal(out["delta_p"], ref["delta_p"])
    for ours, theirs in EXACT_FLAGS.items():
        if ours.startswith("q_") and k < 10:
            assert out[ours] is None
        else:
            assert np.array_equal(out[ours], ref[theirs]), ours


def _rows(seed, n, V, scale=3.0, noise=0.3):
    r = np.random.default_rng(seed)
    a = r.normal(size=(n, V)) * scale
    b = a + r.normal(size=(n, V)) * noise
    return a, b, r.integers(0, V, n)


# ------------------------------------------------------------------ records

def test_record_dtype_layout():
    dt = rs.RECORD_DTYPE(32)
    assert dt.itemsize == 36 + 8 * 32 == 292 and rs.DEFAULT_K == 32
    assert dt.names == ("token", "lp", "entropy", "tail", "lp_min", "ids", "lps")
    assert dt["ids"].shape == (32,) and dt["lps"].base == np.dtype("<f4")
    with pytest.raises(ValueError):
        rs.RECORD_DTYPE(0)


def test_summarize_fields_against_numpy():
    a, _, t = _rows(1, 40, 300)
    rec = rs.summarize(a, t, 16)
    la = _log_softmax(a)
    p = np.exp(la)
    order = np.lexsort((np.broadcast_to(np.arange(300), a.shape), -a), axis=1)[:, :16]
    assert np.array_equal(rec["ids"], order)
    assert np.array_equal(rec["lps"], np.take_along_axis(la, order, 1).astype(np.float32))
    assert np.array_equal(rec["token"], t) and np.array_equal(rec["lp"], ppldelta.token_log_probs(a, t))
    np.testing.assert_allclose(rec["entropy"], -(p * la).sum(1), rtol=1e-12)
    tail = 1 - np.take_along_axis(p, order, 1).sum(1)
    np.testing.assert_allclose(np.exp(rec["tail"]), tail, rtol=1e-9)
    np.testing.assert_allclose(rec["lp_min"], la.min(1), rtol=1e-12)


def test_summarize_ties_smaller_id_first_and_padding():
    a = np.zeros((2, 10))
    a[0, [7, 3, 5]] = 1.0  # ties at the top and at the boundary
    rec = rs.summarize(a, [0, 1], 4)
    assert rec["ids"][0].tolist() == [3, 5, 7, 0]
    assert rec["ids"][1].tolist() == [0, 1, 2, 3]
    rec = rs.summarize(a, [0, 1], 12)  # K > vocab: padded, no tail
    assert (rec["ids"][:, 10:] == -1).all() and (rec["lps"][:, 10:] == -np.inf).all()
    assert (rec["tail"] == -np.inf).all()


def test_summarize_refuses_ignored_targets_and_bad_rows():
    a, _, t = _rows(2, 5, 20)
    t[2] = -100
    with pytest.raises(ValueError, match="ignore_index"):
        rs.summarize(a, t, 4)
    t[2] = 0
    a[1, 3] = np.nan
    with pytest.raises(ValueError):
        rs.summarize(a, t, 4)


# ------------------------------------------------------------------ exact statistics and bounds

@pytest.mark.parametrize("k", [1, 4, 8, 10, 32, 300, 400])
def test_random_rows_bounds_hold_and_exact_fields_equal_full_rows(k):
    a, b, t = _rows(3, 120, 300)
    check_bounds(a, b, t, k)
    check_exact(a, b, t, k)


def test_adversarial_rows():
    r = np.random.default_rng(5)
    V = 64
    rows_a, rows_b = [], []
    base = r.normal(size=V) * 2
    rows_a += [base, base]; rows_b += [base, base + 1e-9]                  # identical / nearly
    peaked = np.full(V, -20.0); peaked[3] = 30.0
    rows_a += [peaked, peaked]; rows_b += [r.normal(size=V), peaked[::-1].copy()]
    flat = np.zeros(V)
    rows_a += [flat, flat]; rows_b += [r.normal(size=V) * 5, flat]          # flat: every token tied
    ninf = base.copy(); ninf[10:40] = -np.inf
    qinf = base.copy(); qinf[[1, 50]] = -np.inf
    rows_a += [ninf, base, ninf, qinf]; rows_b += [base, ninf, ninf, base]   # -inf on either side
    steps = np.repeat(np.arange(8.0), 8)
    rows_a += [steps, steps]; rows_b += [steps[::-1].copy(), steps + r.normal(size=V) * 0.01]  # ties
    wide = r.normal(size=V) * 300
    rows_a += [wide]; rows_b += [wide * 0.9]
    a, b = np.array(rows_a), np.array(rows_b)
    t = np.array([int(np.argmax(x)) for x in a])
    for k in (1, 5, 10, 16, 63, 64, 80):
        _, out, fwd, rev = check_bounds(a, b, t, k)
        check_exact(a, b, t, k)
    # a token the quantized model rules out while the original gives it mass: certainly infinite
    _, out, fwd, _ = check_bounds(a, b, t, 16)
    assert np.isinf(fwd[7]) and out["kld_lo"][7] == out["kld"][7] == np.inf


def test_bounds_collapse_to_the_true_value_at_full_vocabulary():
    a, b, t = _rows(7, 60, 200)
    for k in (200, 256):
        _, out, fwd, rev = check_bounds(a, b, t, k)
        for name, true in (("kld", fwd), ("kld_reverse", rev)):
            width = out[name + "_hi"] - out[name + "_lo"]
            assert (width <= 2e-6 * (1 + true)).all(), width.max()
            np.testing.assert_allclose(out[name], true, rtol=1e-5, atol=1e-8)


def test_estimate_tracks_the_full_value_as_k_grows():
    a, b, t = _rows(8, 200, 1000, scale=2.5, noise=0.2)
    fwd = kl_oracle(a, b).mean()
    errs = []
    for k in (8, 32, 128, 512):
        out = rs.compare(b, rs.summarize(a, t, k))
        errs.append(abs(out["kld"].mean() - fwd) / fwd)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-2


@settings(max_examples=60)
@given(st.integers(2, 40), st.integers(1, 45), st.integers(0, 2 ** 32 - 1),
       st.sampled_from(["normal", "peaked", "flat-ish", "ties", "ninf"]), st.floats(0.0, 3.0))
def test_bounds_hold_on_every_token_hypothesis(V, k, seed, kind, noise):
    r = np.random.default_rng(seed)
    n = 6
    if kind == "normal":
        a = r.normal(size=(n, V)) * r.uniform(0.1, 10)
    elif kind == "peaked":
        a = r.normal(size=(n, V)); a[:, 0] += 25
    elif kind == "flat-ish":
        a = r.normal(size=(n, V)) * 1e-3
    elif kind == "ties":
        a = np.round(r.normal(size=(n, V)) * 2)
    else:
        a = r.normal(size=(n, V)) * 3
        a[r.random((n, V)) < 0.3] = -np.inf
        a[:, 0] = 1.0
    b = a + r.normal(size=(n, V)) * noise
    if kind == "ninf":
        b = np.where(np.isfinite(b), b, r.normal(size=(n, V)))
    t = r.integers(0, V, n)
    check_bounds(a, b, t, k)
    check_exact(a, b, t, k)


def test_float_dtypes_and_bf16_raw():
    a, b, t = _rows(9, 30, 128)
    for dt in (np.float32, np.float16):
        a2, b2 = a.astype(dt), b.astype(dt)
        check_bounds(a2.astype(np.float64), b2.astype(np.float64), t, 16)
        r1 = rs.summarize(a2, t, 16)
        r2 = rs.summarize(a2.astype(np.float64), t, 16)
        for f in ("ids", "lps", "entropy", "tail", "lp_min"):
            assert np.array_equal(r1[f], r2[f])
        check_exact(a2, b2, t, 16)
    raw = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    wid = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    r1 = rs.summarize(raw, t, 16, bf16=True)
    r2 = rs.summarize(wid, t, 16)
    assert np.array_equal(r1["ids"], r2["ids"]) and np.array_equal(r1["entropy"], r2["entropy"])


def test_compare_refuses_mismatches():
    a, b, t = _rows(10, 8, 50)
    rec = rs.summarize(a, t, 8)
    with pytest.raises(ValueError, match="rows"):
        rs.compare(b[:5], rec)
    with pytest.raises(ValueError, match="vocabulary"):
        rs.compare(b[:, :20], rec)
    with pytest.raises(TypeError):
        rs.compare(b, np.zeros(8))


# ------------------------------------------------------------------ report integration

def _report_inputs():
    a, b, t = _rows(11, 400, 300)
    out = rs.compare(b, rs.summarize(a, t, 16))
    return out, kl_oracle(a, b), kl_oracle(b, a)


def test_analyze_reports_bounds_on_the_mean_and_percentiles():
    out, fwd, rev = _report_inputs()
    r = ppldelta.analyze(out["original_log_probs"], out["quantized_log_probs"], kld=out["kld"],
                         kld_reverse=out["kld_reverse"], kld_bounds=(out["kld_lo"], out["kld_hi"]),
                         kld_reverse_bounds=(out["kld_reverse_lo"], out["kld_reverse_hi"]),
                         kld_definition="reference top-K estimate (K=16)")
    d = r.to_dict()
    assert d["kld_definition"] == "reference top-K estimate (K=16)"
    for key, true in (("kld_bounds", fwd), ("kld_reverse_bounds", rev)):
        b = d[key]
        assert b["mean"][0] <= true.mean() <= b["mean"][1]
        for name, pct in ppldelta.report.PCTS_KLD:
            v = np.percentile(true, pct)
            assert b[name][0] <= v * (1 + 1e-12) and v <= b[name][1] * (1 + 1e-12), (key, name)
    assert "KLD bounds" in str(r) and "reference top-K estimate (K=16)" in r.to_markdown()
    assert ppldelta.Report(d).to_dict() == d
    plain = ppldelta.analyze(out["original_log_probs"], out["quantized_log_probs"], kld=out["kld"])
    assert plain.to_dict()["kld_definition"] == "full vocabulary" and "kld_bounds" not in plain.to_dict()
    with pytest.raises(ValueError, match="needs kld"):
        ppldelta.analyze(out["original_log_probs"], out["quantized_log_probs"],
                         kld_bounds=(out["kld_lo"], out["kld_hi"]))
    with pytest.raises(ValueError, match="lower bound above"):
        ppldelta.analyze(out["original_log_probs"], out["quantized_log_probs"], kld=out["kld"],
                         kld_bounds=(out["kld_hi"], out["kld_lo"]))


def test_accumulator_carries_bounds_through_merge_and_state():
    import json

    out, fwd, _ = _report_inputs()

    def kw(s):
        return dict(kld=out["kld"][s], kld_bounds=(out["kld_lo"][s], out["kld_hi"][s]))

    acc = ppldelta.Accumulator().update(out["original_log_probs"][:150], out["quantized_log_probs"][:150], **kw(slice(0, 150)))
    other = ppldelta.Accumulator().update(out["original_log_probs"][150:], out["quantized_log_probs"][150:], **kw(slice(150, None)))
    acc.merge(other)
    acc = ppldelta.Accumulator.from_state(json.loads(json.dumps(acc.state_dict())))
    r = acc.report()
    whole = ppldelta.analyze(out["original_log_probs"], out["quantized_log_probs"], **kw(slice(None)))
    assert r.kld_definition == whole.kld_definition == "reference top-K estimate"
    np.testing.assert_allclose(r.kld_bounds.mean, whole.kld_bounds.mean, rtol=1e-12)
    assert r.kld_bounds.mean[0] <= fwd.mean() <= r.kld_bounds.mean[1]
    with pytest.raises(ValueError, match="same KLD bounds"):
        acc.update(out["original_log_probs"], out["quantized_log_probs"], kld=out["kld"])
