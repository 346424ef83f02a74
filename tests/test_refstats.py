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
    # clamped at 0 as the full-row path: a negative is the float64 rounding of a zero; p > 0 is
    # la > -inf (exp(la) underflows below -745, the mass does not vanish)
    return np.where(((la > -np.inf) & (lb == -np.inf)).any(axis=1), np.inf, np.maximum(terms.sum(axis=1), 0.0))


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
    assert dt.itemsize == 36 + 8 * 32 == 292
    assert dt.names == ("token", "lp", "entropy", "tail", "lp_min", "ids", "lps")
    assert dt["ids"].shape == (32,) and dt["lps"].base == np.dtype("<f4")
    dt = rs.RECORD_DTYPE(rs.DEFAULT_K, rs.DEFAULT_PROBES)
    assert (rs.DEFAULT_K, rs.DEFAULT_PROBES) == (24, 8) and dt.itemsize == 36 + 8 * (24 + 8) == 292
    assert dt.names == ("token", "lp", "entropy", "tail", "lp_min", "ids", "lps", "pids", "plps")
    assert dt["pids"].shape == (8,) and dt["plps"].base == np.dtype("<f4")
    for bad in ((0, 0), (4, -1)):
        with pytest.raises(ValueError):
            rs.RECORD_DTYPE(*bad)


def _offset_oracle(position):
    """A token's probe offset by its definition, in Python integers: the fraction of
    (position + 1) * 0x9E3779B97F4A7C15 / 2^64, truncated to 53 bits."""
    return (((position + 1) * 0x9E3779B97F4A7C15) % 2 ** 64 >> 11) / 2 ** 53


def _probe_oracle(a, top, m, positions=None):
    """The probes by their definition, in exact arithmetic (math.fsum): the tail (ids outside the
    top K, in id order) with masses e^{a_i}; probe j is the first id whose running mass exceeds
    (j + u)/m of the total, u the row's offset (its position: by default its row index).
    Returns, per row, the sets of ids allowed for each probe (the candidate plus its neighbour
    when the threshold lies within rounding of a boundary)."""
    import math

    out = []
    for r, (row, ids) in enumerate(zip(a, top)):
        u = _offset_oracle(r if positions is None else int(positions[r]))
        e = np.exp(row - row.max())
        e[ids] = 0.0
        run = [math.fsum(e[:i + 1]) for i in range(e.size)]
        tot = run[-1]
        allowed = []
        for j in range(m):
            thr = (j + u) / m * tot
            first = next(i for i, r in enumerate(run) if r > thr)
            near = {first}
            for i in range(e.size):  # a boundary within 1e-12 relative of the threshold
                if e[i] > 0 and abs(run[i] - thr) <= 1e-12 * tot:
                    near |= {i, next((q for q in range(i + 1, e.size) if e[q] > 0), i)}
            allowed.append(near)
        out.append(allowed)
    return out


def test_probe_offsets_follow_their_definition():
    pos = np.array([0, 1, 2, 7, 4079, 10 ** 6, 2 ** 40, 2 ** 62])
    u = rs.probe_offsets(pos)
    assert u.dtype == np.float64 and [float(v) for v in u] == [_offset_oracle(int(p)) for p in pos]
    assert ((u >= 0) & (u < 1)).all()
    # a low-discrepancy sequence: n consecutive positions leave no gap wider than 3/n in [0, 1)
    v = np.sort(rs.probe_offsets(np.arange(5000, 6000)))
    assert np.diff(np.concatenate([[0.0], v, [1.0]])).max() < 3 / 1000
    for bad in (np.array([-1]), np.array([0.5]), np.zeros((2, 2), int)):
        with pytest.raises(ValueError, match="positions"):
            rs.probe_offsets(bad)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_probes_are_the_systematic_sample_of_the_tail(m):
    a, _, t = _rows(21, 30, 200, scale=2.0)
    a[3, :] = 0.0  # a flat row: every tail token equally likely
    rec = rs.summarize(a, t, 8, probes=m)
    assert rs.n_probes(rec) == m
    want = _probe_oracle(a, rec["ids"], m)
    pos = np.arange(1000, 1000 + a.shape[0]) * 7  # explicit positions: the offsets follow them
    rec2 = rs.summarize(a, t, 8, probes=m, positions=pos)
    want2 = _probe_oracle(a, rec2["ids"], m, pos)
    assert all(int(rec2["pids"][r, j]) in want2[r][j] for r in range(a.shape[0]) for j in range(m))
    la = _log_softmax(a)
    for r in range(a.shape[0]):
        for j in range(m):
            pid = int(rec["pids"][r, j])
            assert pid in want[r][j], (r, j, pid, want[r][j])
            assert pid not in rec["ids"][r]
            assert rec["plps"][r, j] == np.float32(la[r, pid])
    # the flat row's probes are evenly spread over the tail's ids
    tail = np.setdiff1d(np.arange(200), rec["ids"][3])
    u = _offset_oracle(3)
    assert rec["pids"][3].tolist() == [int(tail[int((j + u) / m * tail.size)]) for j in range(m)]


def test_probes_without_tail_and_without_probes():
    a, b, t = _rows(22, 6, 12)
    rec = rs.summarize(a, t, 12, probes=4)  # K = vocab: no tail, no probes
    assert (rec["pids"] == -1).all() and (rec["plps"] == -np.inf).all()
    out = rs.compare(b, rec)
    np.testing.assert_allclose(out["kld"], kl_oracle(a, b), rtol=1e-5, atol=1e-9)
    rec0 = rs.summarize(a, t, 4, probes=0)
    assert rec0.dtype == rs.RECORD_DTYPE(4) and rs.n_probes(rec0) == 0
    check_bounds(a, b, t, 4)


def test_probe_estimate_is_exact_when_the_tail_is_proportional():
    # Q equals P on the top K and is P times a constant on the tail: every probe's log-ratio is
    # that constant, so the estimate is the true KL (in both directions) up to float32 rounding
    r = np.random.default_rng(23)
    a = r.normal(size=(50, 400)) * 2.5
    t = r.integers(0, 400, 50)
    rec = rs.summarize(a, t, 16, probes=8)
    la = _log_softmax(a)
    b = la.copy()
    tail = np.ones_like(b, dtype=bool)
    np.put_along_axis(tail, rec["ids"].astype(np.int64), False, 1)
    b[tail] += np.log(r.uniform(0.3, 3.0, size=(50, 1)).repeat(400, 1)[tail])
    out = rs.compare(b, rec)
    for name, true in (("kld", kl_oracle(a, b)), ("kld_reverse", kl_oracle(b, a))):
        np.testing.assert_allclose(out[name], true, rtol=1e-5, atol=1e-7)


def test_probe_estimate_is_unbiased_on_noisy_tails():
    # log-ratios with a heavier noise on the tail than on the top K: the second-order estimate
    # (variance measured on the stored top K) is far off; the probes' estimate is not
    r = np.random.default_rng(24)
    n, V, k = 3000, 600, 8
    a = r.normal(size=(n, V)) * 2.0
    rec = rs.summarize(a, r.integers(0, V, n), k, probes=8)
    noise = r.normal(size=(n, V)) * 0.3
    top = np.zeros((n, V), dtype=bool)
    np.put_along_axis(top, rec["ids"].astype(np.int64), True, 1)
    b = a + np.where(top, noise * 0.2, noise)
    true = kl_oracle(a, b).mean()
    est = rs.compare(b, rec)["kld"].mean()
    old = rs.compare(b, rs.summarize(a, rec["token"], k, probes=0))["kld"].mean()
    assert abs(est / true - 1) < 0.02, (est, true)
    assert abs(old / true - 1) > 0.2, (old, true)  # the case the probes exist for
    rev, rev_true = rs.compare(b, rec)["kld_reverse"].mean(), kl_oracle(b, a).mean()
    assert abs(rev / rev_true - 1) < 0.03, (rev, rev_true)  # second order, the probes' variance
    # the reported sampling variance is the estimate's: over 20 disjoint slices of 150 tokens,
    # the errors of the slice means scatter as the standard errors say (chi-square, 19 d.o.f.)
    out = rs.compare(b, rec)
    kl = kl_oracle(a, b)
    z = [(out["kld"][s].mean() - kl[s].mean()) / (np.sqrt(out["kld_sampling_var"][s].sum()) / 150)
         for s in (slice(i, i + 150) for i in range(0, n, 150))]
    assert 6 < float(np.sum(np.square(z))) < 40, z
    check_bounds(a[:200], b[:200], rec["token"][:200], k)


def test_probe_estimate_is_unbiased_when_q_is_unrelated_to_p():
    # a broken Q (logits unrelated to P's): e^{-δ} = q̂/p̂ is huge on tail tokens the probes
    # rarely draw, so a full control variate (β = 1) skews the mean low (-5 % here) and its sample
    # variance understates the scatter; with β from the stored tokens' log-ratio variance the
    # mean is on the truth and the reported variance is the estimate's (chi-square, 19 d.o.f.)
    r = np.random.default_rng(5)
    n, V, k = 3000, 600, 8
    a, b = r.normal(size=(n, V)) * 2.0, r.normal(size=(n, V)) * 2.0
    rec = rs.summarize(a, r.integers(0, V, n), k, probes=8)
    out, kl = rs.compare(b, rec), kl_oracle(a, b)
    assert np.isfinite(out["kld"]).all() and (out["kld"] >= 0).all()
    assert abs(out["kld"].mean() / kl.mean() - 1) < 0.02, (out["kld"].mean(), kl.mean())
    z = [(out["kld"][s].mean() - kl[s].mean()) / (np.sqrt(out["kld_sampling_var"][s].sum()) / 150)
         for s in (slice(i, i + 150) for i in range(0, n, 150))]
    assert 6 < float(np.sum(np.square(z))) < 40, z


@settings(max_examples=40)
@given(st.integers(0, 2 ** 32 - 1), st.floats(0.0, 400.0), st.floats(0.0, 1.0), st.integers(1, 12))
def test_probe_estimate_finite_and_within_bounds_hypothesis(seed, scale, mix, k):
    # Q from a copy of P to unrelated logits of any spread (up to a stored log-ratio variance far
    # beyond e^700): the estimate stays finite, >= 0 and inside the certified bounds
    r = np.random.default_rng(seed)
    a = r.normal(size=(8, 300)) * 3
    b = (1 - mix) * a + mix * r.normal(size=a.shape) * scale
    t = r.integers(0, 300, 8)
    rec, out, fwd, _ = check_bounds(a, b, t, k)
    assert np.isfinite(out["kld"]).all() and np.isfinite(out["kld_sampling_var"]).all()


def test_self_comparison_estimate_is_zero():
    a, _, t = _rows(25, 40, 500)
    rec = rs.summarize(a, t, 8)
    out = rs.compare(a, rec)
    assert (out["kld"] <= 1e-6).all() and (out["kld_reverse"] <= 1e-6).all()


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
    errs, errs0 = [], []
    for k in (8, 32, 128, 512):
        out = rs.compare(b, rs.summarize(a, t, k))
        errs.append(abs(out["kld"].mean() - fwd) / fwd)
        out = rs.compare(b, rs.summarize(a, t, k, probes=0))  # the second-order estimate
        errs0.append(abs(out["kld"].mean() - fwd) / fwd)
    assert errs0 == sorted(errs0, reverse=True) and errs0[-1] < 1e-2
    assert max(errs) < 1e-2, errs  # the probes' estimate: unbiased, its noise averages out


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


# ------------------------------------------------------------------ the C kernel (summarize_rows)
# _core.summarize_rows (csrc/summarize.c) against the NumPy twin refstats.summarize_rows.  The
# top K depends on the logits alone (no rounding): ids agree exactly.  The rest goes through
# exp and log, whose last bits may differ between the two: a probe agrees except where a running
# sum lies within rounding of its threshold; lps/plps agree as float32 except where the float64
# value is within rounding of a float32 boundary, and entropy/tail/lp_min within 1e-13 relative,
# where "rounding" includes that of the log-sum-exp ls = log(sum e_i): 2^-50 (1 + |ls|)
# absolute (the NumPy twin's sum carries an ulp of 1, an absolute error of ls; the C kernel
# takes log1p of the sum without the argmax's 1; a tail near 0 is a difference of logs near ls).

def _c_and_numpy(x, k, m, bf16=False, threads=1):
    r = np.zeros(x.shape[0], rs.RECORD_DTYPE(k, m))
    x64 = (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64) if bf16 else x.astype(np.float64)
    rs.summarize_rows(x64, k, r)
    return ppldelta._core.summarize_rows(x, k, m, bf16=bf16, threads=threads), r, x64


def _oracle_cum(x64, ids):
    """The format's running sums (np.cumsum of the tail's e_i, zero on the top K) and log-sum-exp."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = x64.max(1, keepdims=True)
        e = np.exp(x64 - mx)
        ls = np.log(e.sum(1))
        valid = ids >= 0
        rows = np.broadcast_to(np.arange(x64.shape[0])[:, None], ids.shape)
        e[rows[valid], ids[valid]] = 0.0
        return np.cumsum(e, 1), ls, x64 - mx - ls[:, None]


def _f32_within(c, a, ls):
    """float32 c is the rounding of a value within rounding of the float64 a: of a value in
    [a - d, a + d], d = 1e-12 |a| + 2^-50 (1 + |ls|) (float32 rounding is monotone)."""
    with np.errstate(invalid="ignore"):
        d = 1e-12 * np.abs(a) + 2.0 ** -50 * (1 + np.abs(ls))
        return ((a - d).astype(np.float32) <= c) & (c <= (a + d).astype(np.float32))


def check_kernel(x, k, m, bf16=False, threads=1):
    c, r, x64 = _c_and_numpy(x, k, m, bf16, threads)
    assert np.array_equal(c["ids"], r["ids"])
    cum, ls, a = _oracle_cum(x64, r["ids"])
    for f in ("entropy", "tail", "lp_min"):
        same_inf = (c[f] == r[f]) | (np.isneginf(c[f]) & np.isneginf(r[f]))
        tol = 1e-13 * np.where(np.isfinite(r[f]), np.abs(r[f]), 0) + 2.0 ** -50 * (1 + np.abs(ls)) + 1e-300
        with np.errstate(invalid="ignore"):
            assert (same_inf | (np.abs(c[f] - r[f]) <= tol)).all(), (f, c[f], r[f])
    pa = np.where(r["ids"] >= 0, np.take_along_axis(a, np.maximum(r["ids"], 0), 1), -np.inf)
    ok = (c["lps"] == r["lps"]) | _f32_within(c["lps"], pa, ls[:, None])
    assert ok.all(), (c["lps"][~ok], r["lps"][~ok])
    if m:
        cp, rp = c["pids"], r["pids"]
        diff = cp != rp
        for i, j in zip(*np.nonzero(diff)):  # a running sum within rounding of the threshold
            R = cum[i, -1]
            q = (j + 0.5) / m * R
            assert cp[i, j] >= 0 and rp[i, j] >= 0, (i, j)
            assert abs(cum[i, min(cp[i, j], rp[i, j])] - q) <= 1e-12 * R, (i, j, cp[i, j], rp[i, j])
        same = ~diff & (rp >= 0)
        pa = np.take_along_axis(a, np.maximum(rp, 0), 1)
        ok = (c["plps"] == r["plps"]) | (same & _f32_within(c["plps"], pa, ls[:, None]))
        assert (ok | diff).all()
        assert (c["plps"][rp < 0] == -np.inf).all() and (cp[rp < 0] == -1).all()
    else:
        assert c["pids"].shape == c["plps"].shape == (x.shape[0], 0)
    return c, r


def _kernel_rows(r, n, V, kind):
    if kind == "normal":
        return r.normal(size=(n, V)) * r.uniform(0.1, 10)
    if kind == "peaked":
        a = r.normal(size=(n, V))
        a[:, r.integers(0, V)] += 60
        return a
    if kind == "ties":        # ties across the K-th boundary
        return np.round(r.normal(size=(n, V)))
    if kind == "ninf":        # -inf logits (at least one finite per row)
        a = r.normal(size=(n, V)) * 3
        a[r.random((n, V)) < 0.5] = -np.inf
        a[np.arange(n), r.integers(0, V, n)] = 0.0
        return a
    if kind == "range":       # exps that underflow to subnormals and to 0
        return -r.uniform(0, 800, size=(n, V)) * (r.random((n, V)) < 0.9)
    if kind == "increasing":  # every value a new top-K candidate: the buffer compacts often
        return np.broadcast_to(np.arange(V, dtype=np.float64), (n, V)) + r.normal(size=(n, 1))
    return np.full((n, V), r.normal())  # flat: every value tied


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([1, 2, 7, 8, 9, 31, 300, 1023, 1024, 1025, 2100, 5000]), st.integers(1, 70),
       st.sampled_from([0, 1, 3, 8]), st.integers(0, 2 ** 32 - 1),
       st.sampled_from(["normal", "peaked", "ties", "ninf", "range", "increasing", "flat"]),
       st.sampled_from(["f64", "f32", "f16", "bf16"]))
def test_kernel_agrees_with_numpy_twin_hypothesis(V, k, m, seed, kind, dtype):
    r = np.random.default_rng(seed)
    a = _kernel_rows(r, 5, V, kind)
    if dtype == "bf16":
        raw = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        check_kernel(raw, k, m, bf16=True)
    else:
        x = a.astype({"f64": np.float64, "f32": np.float32, "f16": np.float16}[dtype])
        if np.isinf(x.max(1)).any():
            return  # float16 overflow: a row refused, tested below
        check_kernel(x, k, m)


@pytest.mark.parametrize("V,k", [(32000, 24), (4100, 4096), (3000, 5000)])
def test_kernel_agrees_with_numpy_twin_large(V, k):
    r = np.random.default_rng(V)
    a = (r.normal(size=(6, V)) * 3).astype(np.float32)
    a[:, 100:400] = a[:, 100:101]
    check_kernel(a, k, 8, threads=3)


def test_kernel_same_bits_on_every_simd_path_and_thread_count():
    r = np.random.default_rng(3)
    a = np.concatenate([r.normal(size=(5, 2500)) * 4, _kernel_rows(r, 3, 2500, "range"),
                        _kernel_rows(r, 3, 2500, "ninf")])
    before = ppldelta._core.simd()
    try:
        outs = []
        for isa in ppldelta._core.supported_simd():
            ppldelta._core._set_simd(isa)
            outs += [ppldelta._core.summarize_rows(a, 24, 8, threads=t) for t in (1, 4)]
    finally:
        ppldelta._core._set_simd(before)
    for o in outs[1:]:
        for f, v in o.items():
            assert v.tobytes() == outs[0][f].tobytes(), f


def test_kernel_probe_boundaries_and_ties_are_decided_as_documented():
    # all e_i = 1: R_i = i exactly on the tail ids 1..8; probe j is the first R_i > (j + 1/2)/M R,
    # so a running sum equal to the threshold does not take it (strict >)
    x = np.zeros((1, 9))
    for m, want in ((4, [2, 4, 6, 8]), (8, [1, 2, 3, 4, 5, 6, 7, 8]), (2, [3, 7])):
        c, r = check_kernel(x, 1, m)
        assert c["pids"][0].tolist() == r["pids"][0].tolist() == want
        assert c["ids"][0].tolist() == [0]
    # ties at the K-th boundary across chunks: the smaller ids, in id order
    x = np.zeros((1, 5000))
    x[0, [4999, 10, 3000]] = 1.0
    c, _ = check_kernel(x, 6, 3)
    assert c["ids"][0].tolist() == [10, 3000, 4999, 0, 1, 2]
    # a subnormal tail total: thresholds may round up to it; then the last id, as probe_positions
    x = np.full((1, 4), -745.0)
    x[0, 0] = 0.0
    c, r = check_kernel(x, 1, 3)
    assert c["pids"][0].tolist() == r["pids"][0].tolist()
    # K >= V: every id in order, then -1 / -inf; no tail, no probes
    c, _ = check_kernel(np.array([[1.0, 3.0, 3.0]]), 5, 2)
    assert c["ids"][0].tolist() == [1, 2, 0, -1, -1] and c["lps"][0, 3:].tolist() == [-np.inf] * 2
    assert c["tail"][0] == -np.inf and c["pids"][0].tolist() == [-1, -1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, "all-ninf"])
def test_kernel_refuses_bad_rows(bad):
    a = np.zeros((4, 1500), dtype=np.float32)
    if bad == "all-ninf":
        a[2] = -np.inf
    else:
        a[2, 1200] = bad
    with pytest.raises(ValueError, match="logits row 2 contains NaN or \\+inf, or is entirely -inf"):
        ppldelta._core.summarize_rows(a, 4, 2, threads=2)
    with pytest.raises(ValueError, match="row 2"):
        rs.summarize(a, np.zeros(4, np.int64), 4)


def test_kernel_arguments():
    a = np.zeros((2, 5))
    with pytest.raises(ValueError, match="k must be >= 1"):
        ppldelta._core.summarize_rows(a, 0, 0)
    with pytest.raises(ValueError, match="probes must be >= 0"):
        ppldelta._core.summarize_rows(a, 1, -1)
    with pytest.raises(TypeError, match="dtype"):
        ppldelta._core.summarize_rows(a.astype(np.int32), 1, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ppldelta._core.summarize_rows(np.zeros((2, 10))[:, ::2], 1, 0)
    out = ppldelta._core.summarize_rows(np.zeros((0, 5)), 3, 2)
    assert out["ids"].shape == (0, 3) and out["pids"].shape == (0, 2)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_bounds_hold_where_the_tail_mass_underflows(k):
    """P's tail mass below float64's range (T < -745, or a stored T of -inf from exps that all
    rounded to 0): the reverse bounds were certified [inf, inf] against a finite truth, and the
    forward bound finite where a q = 0 tail token with p = e^-760 > 0 makes it infinite."""
    cases = [([0., -760.], [0., 0.]), ([0., -800., -5.], [0., 0., -5.]), ([0., -760.], [0., -np.inf]),
             ([0., -760., -761.], [0., -np.inf, 0.]), ([0., -760., -np.inf], [0., 0., -np.inf])]
    for a, b in cases:
        if len(a) > k:
            check_bounds(np.array([a]), np.array([b]), [0], k)
    rng = np.random.default_rng(3)
    for scale in (300.0, 1000.0, 3000.0):
        a = rng.normal(0, scale, (300, 40))
        b = a + rng.normal(0, scale / 10, a.shape)
        a[rng.random(a.shape) < 0.05] = -np.inf
        b[rng.random(b.shape) < 0.05] = -np.inf
        a[:, 0] = b[:, 0] = 0.0
        a[:, 0] = np.maximum(a.max(1), 0.0) + 1.0  # a finite maximum on every row
        check_bounds(a, b, np.zeros(len(a), dtype=np.int64), k)
