"""analyze and Accumulator on the edges: overflowing perplexities, infinite and NaN per-token
values, ignored targets, group labels, masked and DLPack-only inputs: one rule for both entry
points, and the same answers as perplexity_delta."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ppldelta
from _deps import needs_torch
from oracle import fsum_delta
from reliability.fuzz_core import DLPackOnly


def _analyze(o, q, **kw):
    return ppldelta.analyze(o, q, n_bootstrap=200, **kw).to_dict()


def _acc(o, q, **kw):
    return ppldelta.Accumulator(block_size=4).update(o, q, **kw).report(n_bootstrap=200).to_dict()


BOTH = [_analyze, _acc]
INF_REF = {"quantized_perplexity": math.inf, "absolute_delta": math.inf,
           "relative_delta_pct": math.inf, "quality": "poor"}


# ----------------------------------------------------------------------------- item 1: overflow

@pytest.mark.parametrize("run", BOTH)
@pytest.mark.parametrize("o,q", [
    ([-2.0] * 40, [-800.0] * 40),                    # the quantized mean overflows exp
    ([-2.0] * 100, [-2.0] * 99 + [-1e5]),            # one token drives it there
    ([-2.0] * 30, [-2.0] * 29 + [-math.inf]),        # a token with probability 0
    ([-1.0, -2.0], [-1.0, -math.inf]),
], ids=["mean-800", "one-token-1e5", "neg-inf", "two-tokens"])
def test_infinite_quantized_perplexity_agrees_with_perplexity_delta(run, o, q):
    ref = ppldelta.perplexity_delta(o, q)
    assert {k: ref[k] for k in INF_REF} == INF_REF
    r = run(o, q, groups=["all"] * len(o))
    assert r["reference"] == ref
    assert r["groups"]["all"]["reference"] == ref
    assert r["ppl"]["quantized"]["value"] == math.inf and r["ppl_ratio"]["value"] == math.inf
    lo, hi = r["ppl_ratio"]["ci"]
    if lo is not None:  # a CI: unbounded above, never a wrong finite number
        assert hi == math.inf
        assert r["significance"]["p_value"] is not None
    for path in (("ppl", "quantized", "stderr"), ("ppl_ratio", "stderr"), ("correlation",),
                 ("ln_ppl_ratio", "stderr"), ("ppl_diff", "stderr")):
        v = r
        for k in path:
            v = v[k]
        assert v is None or math.isfinite(v), path  # undefined errors are None, never NaN
    json.dumps(r, allow_nan=True)
    str(ppldelta.Report(r))


@pytest.mark.parametrize("run", BOTH)
def test_zero_probability_token_makes_the_interval_infinite(run):
    o = [-2.0] * 50
    q = [-2.1] * 49 + [-math.inf]
    r = run(o, q)
    assert r["ln_ppl_ratio"]["ci"] == [math.inf, math.inf]
    assert r["ppl_ratio"]["ci"] == [math.inf, math.inf]
    assert r["significance"]["verdict"] == "significant degradation"


@pytest.mark.parametrize("run", BOTH)
@pytest.mark.parametrize("o", [[-math.inf, -1.0], [-1e308, -1e308], [-800.0, -800.0]])
def test_infinite_original_perplexity_is_perplexity_deltas_value_error(run, o):
    q = [-1.0, -1.0]
    with pytest.raises(ValueError) as want:
        ppldelta.perplexity_delta(o, q)
    with pytest.raises(ValueError) as got:
        run(o, q)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("run", BOTH)
def test_a_groups_infinite_original_perplexity_is_named(run):
    o = [-800.0, -800.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]  # overall mean -200.75: finite
    q = [-1.0] * 8
    with pytest.raises(ValueError) as want:
        ppldelta.perplexity_delta(o[:2], q[:2])
    with pytest.raises(ValueError) as got:
        run(o, q, groups=["bad"] * 2 + ["ok"] * 6)
    assert str(got.value) == f"group 'bad': {want.value}"


def test_overflowing_group_reference_equals_running_it_alone():
    # mean -709.781: exp is still finite (1.79e308), the group's dict must not say inf
    o = [-1.0] * 4
    q = [-709.781] * 2 + [-1.0] * 2
    r = _analyze(o, q, groups=["a", "a", "b", "b"])
    assert r["groups"]["a"]["reference"] == fsum_delta(o[:2], q[:2])


# ----------------------------------------------------------------------------- item 2: NaN / inf KLD

@pytest.mark.parametrize("run", BOTH)
@pytest.mark.parametrize("name", ["kld", "kld_reverse"])
def test_nan_kld_names_the_index_in_both(run, name):
    o, q = [-1.0] * 5, [-1.1] * 5
    with pytest.raises(ValueError, match=rf"{name} contains NaN at index 3"):
        run(o, q, **{name: [0.1, 0.2, 0.3, math.nan, 0.1]})
    with pytest.raises(ValueError, match=rf"{name}\[1\] = -inf"):
        run(o, q, **{name: [0.1, -math.inf, 0.3, 0.1, 0.1]})


@pytest.mark.parametrize("run", BOTH)
def test_inf_kld_propagates_in_both(run):
    o, q = [-1.0] * 6, [-1.1] * 6
    kld = [0.1, 0.2, math.inf, 0.05, 0.3, 0.1]
    r = run(o, q, kld=kld, groups=list("aabbbb"))
    assert r["kld"]["mean"] == math.inf and r["kld"]["max"] == math.inf
    assert r["kld"]["stderr"] is None
    assert r["kld"]["p99"] == math.inf  # numpy: a rank interpolating towards inf is inf
    assert r["kld"]["min"] == 0.05
    assert r["groups"]["b"]["kld_mean"] == math.inf
    assert r["groups"]["a"]["kld_mean"] == pytest.approx(0.15)


@pytest.mark.parametrize("run", BOTH)
def test_flags_must_be_flags(run):
    with pytest.raises(ValueError, match=r"same_top1\[1\] = 0.5 is not a flag"):
        run([-1.0] * 3, [-1.0] * 3, same_top1=[1, 0.5, 0])
    with pytest.raises(ValueError, match=r"top1_in_top5 contains NaN at index 2"):
        run([-1.0] * 3, [-1.0] * 3, top1_in_top5=[1, 0, math.nan])


def test_failed_update_changes_nothing():
    acc = ppldelta.Accumulator(block_size=2).update([-1.0, -2.0], [-1.5, -2.5], kld=[0.1, 0.2])
    before = json.dumps(acc.state_dict())
    for bad in (dict(kld=[0.1, math.nan]), dict(kld=[0.1, 0.2], groups=["a"])):
        with pytest.raises(ValueError):
            acc.update([-1.0, -2.0], [-1.0, -2.0], **bad)
    assert json.dumps(acc.state_dict()) == before


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 50), st.just(math.inf)), min_size=2, max_size=40))
def test_kld_percentiles_with_inf_agree(kld):
    n = len(kld)
    o, q = [-1.0] * n, [-1.2] * n
    a = _analyze(o, q, kld=kld)["kld"]
    b = _acc(o, q, kld=kld)["kld"]
    # oracle: inf stands for a value far above the rest; numpy's percentiles of that data
    huge = np.where(np.isinf(kld), 1e300, kld)
    for key, p in ppldelta.analysis.PCTS_KLD:
        want = float(np.percentile(huge, p))
        if want > 1e290:
            assert a[key] == b[key] == math.inf, key
        else:
            assert a[key] == want and math.isfinite(b[key]), key
    assert (a["mean"] == math.inf) == (b["mean"] == math.inf) == (math.inf in kld)


# ----------------------------------------------------------------------------- item 6: ignored targets

def _logits(seed, n=40, v=17):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 2, (n, v)).astype(np.float32)
    b = (a + rng.normal(0, 0.3, a.shape)).astype(np.float32)
    t = rng.integers(0, v, n)
    return a, b, t


def _run_logits(kind, a, b, t, **kw):
    if kind == "analyze":
        return ppldelta.analyze(None, None, original_logits=a, quantized_logits=b, targets=t,
                                n_bootstrap=100, **kw).to_dict()
    return ppldelta.Accumulator().update(None, None, original_logits=a, quantized_logits=b,
                                         targets=t, **kw).report(n_bootstrap=100).to_dict()


@pytest.mark.parametrize("kind", ["analyze", "accumulator"])
def test_ignored_targets_are_dropped_and_counted(kind):
    a, b, t = _logits(0)
    t[[0, 7, 8, 39]] = -100
    keep = t != -100
    labels = np.where(np.arange(40) < 20, "first", "second")
    r = _run_logits(kind, a, b, t, groups=labels)
    assert r["n_tokens"] == 36 and r["n_ignored"] == 4
    lp_o = ppldelta.token_log_probs(a, t)[keep]
    lp_q = ppldelta.token_log_probs(b, t)[keep]
    assert r["reference"] == ppldelta.perplexity_delta(lp_o, lp_q) == fsum_delta(lp_o, lp_q)
    k = ppldelta.kl_divergence(a, b)
    assert r["kld"]["mean"] == pytest.approx(float(k["kld"][keep].mean()), rel=1e-9)
    assert r["groups"]["first"]["n_tokens"] == 17 and r["groups"]["second"]["n_tokens"] == 19
    sel = keep & (labels == "second")
    assert r["groups"]["second"]["reference"] == fsum_delta(ppldelta.token_log_probs(a, t)[sel],
                                                            ppldelta.token_log_probs(b, t)[sel])


def test_ignored_targets_with_given_log_probs_and_dict_groups():
    a, b, t = _logits(1)
    t[[3, 4]] = -100
    keep = t != -100
    lo, lq = ppldelta.token_log_probs(a, t), ppldelta.token_log_probs(b, t)  # NaN where ignored
    want = ppldelta.perplexity_delta(lo[keep], lq[keep])
    for o, q in ((lo, lq), (lo[keep], lq[keep])):  # per position, or per scored token
        r = ppldelta.analyze(o, q, original_logits=a, quantized_logits=b, targets=t,
                             groups={"head": (0, 10), "tail": (10, 40)}, n_bootstrap=50)
        assert r["reference"] == want and r["n_ignored"] == 2
        assert r["groups"]["head"]["n_tokens"] == 8  # dict selections index positions
    with pytest.raises(ValueError, match="every target is ignore_index"):
        ppldelta.analyze(None, None, original_logits=a, quantized_logits=b, targets=np.full(40, -100))
    t2 = _logits(1)[2]
    t2[5] = -1
    r = ppldelta.analyze(None, None, original_logits=a, quantized_logits=b, targets=t2, ignore_index=-1,
                         n_bootstrap=50)
    assert r["n_ignored"] == 1


# ----------------------------------------------------------------------------- item 8: group labels

@pytest.mark.parametrize("run", BOTH)
def test_group_labels_are_compared_as_strings_in_both(run):
    o = [-1.0, -2.0, -1.5, -1.2, -0.5, -3.0]
    q = [-1.1, -2.0, -1.9, -1.2, -0.7, -3.5]
    mixed = np.array([1, "1", 2, "x", 2, "x"], dtype=object)
    r = run(o, q, groups=mixed)
    assert sorted(r["groups"]) == ["1", "2", "x"]
    assert r["groups"]["1"]["reference"] == fsum_delta(o[:2], q[:2])
    assert r["groups"]["2"]["n_tokens"] == 2


def test_group_labels_merge_across_updates_as_in_one_call():
    o = [-1.0, -2.0, -1.5, -1.2]
    q = [-1.1, -2.0, -1.9, -1.2]
    acc = ppldelta.Accumulator(block_size=1)
    acc.update(o[:2], q[:2], groups=[1, 2]).update(o[2:], q[2:], groups=["1", "2"])
    got = acc.report(n_bootstrap=50)["groups"]
    want = ppldelta.analyze(o, q, groups=np.array([1, 2, "1", "2"], dtype=object), n_bootstrap=50)["groups"]
    assert {k: v["reference"] for k, v in got.items()} == {k: v["reference"] for k, v in want.items()}
    with pytest.raises(ValueError, match="two groups are named '1'"):
        ppldelta.analyze(o, q, groups={1: (0, 2), "1": (2, 4)})


# ----------------------------------------------------------------------------- item 5 + DLPack: the one adapter

@pytest.mark.parametrize("run", BOTH)
def test_masked_arrays_are_a_type_error(run):
    o = np.ma.masked_invalid(np.array([-1.0, math.nan, -2.0]))
    q = np.array([-1.0, -1.0, -2.0])
    with pytest.raises(TypeError, match=r"original_log_probs is a masked array.*compressed\(\)"):
        run(o, q)
    with pytest.raises(TypeError, match=r"kld is a masked array"):
        run(q, q, kld=np.ma.array([0.1, 0.2, 0.3], mask=[0, 1, 0]))
    with pytest.raises(TypeError, match=r"masked array"):
        ppldelta.kl_divergence(np.ma.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"masked array"):
        ppldelta.paired_outcomes(np.ma.array([1, 0]), [1, 0])


@pytest.mark.parametrize("run", BOTH)
def test_dlpack_only_inputs_work_everywhere(run):
    rng = np.random.default_rng(4)
    o = -rng.exponential(2.0, 50)
    q = o - 0.05
    kld = rng.exponential(0.05, 50)
    want = run(o, q, kld=kld)
    got = run(DLPackOnly(o), DLPackOnly(q), kld=DLPackOnly(kld))
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert got["reference"] == ppldelta.perplexity_delta(DLPackOnly(o), DLPackOnly(q))


def test_dlpack_only_logits_and_outcomes():
    a, b, t = _logits(2)
    want = ppldelta.kl_divergence(a, b, targets=t)
    got = ppldelta.kl_divergence(DLPackOnly(a), DLPackOnly(b), targets=DLPackOnly(t))
    np.testing.assert_array_equal(got["kld"], want["kld"])
    np.testing.assert_array_equal(got["original_log_probs"], want["original_log_probs"])
    co = np.array([True, False, True])
    assert ppldelta.paired_outcomes(DLPackOnly(co), co).n == 3


@needs_torch
def test_torch_float64_log_probs_keep_their_precision():
    import torch

    o = torch.tensor([-1.0000000001, -2.0], dtype=torch.float64)
    q = torch.tensor([-1.0, -2.0000000003], dtype=torch.float64)
    r = ppldelta.analyze(o, q, n_bootstrap=40)
    assert r["ln_ppl_ratio"]["value"] == pytest.approx(((2.0000000003 - 2.0) - (1.0000000001 - 1.0)) / 2,
                                                       rel=1e-6)


def test_a_chunk_whose_original_mean_overflows_is_fine_when_the_total_is_not():
    o = [-2000.0] + [-1.0] * 20
    q = [-2000.5] + [-1.2] * 20
    acc = ppldelta.Accumulator(block_size=4).update(o[:1], q[:1]).update(o[1:], q[1:])
    assert acc.report(n_bootstrap=40)["reference"] == ppldelta.perplexity_delta(o, q) == fsum_delta(o, q)
    with pytest.raises(ValueError, match="original model's perplexity overflows"):
        ppldelta.Accumulator().update([-math.inf, -1.0], [-1.0, -1.0])


def test_p_value_agrees_with_the_interval_on_skewed_bootstraps():
    """The verdict comes from the percentile interval; its p is the dual test (twice the smaller
    share of replicates beyond 0): a skewed bootstrap distribution (heavy-tailed per-token
    differences) never gives "a real loss" beside p > 0.05 or the reverse, but within one
    replicate of the boundary (a re-centred test disagreed by 0.007 on a real GGUF variant)."""
    rng = np.random.default_rng(1)
    B = 1000
    for t in range(40):
        n = 3000
        o = -rng.exponential(2.0, n)
        heavy = rng.pareto(1.5, n) * (rng.random(n) < 0.05) * rng.choice([1, -0.3], n)
        q = np.minimum(o - heavy * 0.2 - rng.normal(0, 0.05, n) + rng.normal(0.002 * (t % 5), 0.01, n), 0)
        r = ppldelta.analyze(o, q, n_bootstrap=B)
        lo, hi = r["ln_ppl_ratio"]["ci"]
        p = r["significance"]["p_value"]
        sig = lo > 0 or hi < 0
        assert sig == r["significance"]["verdict"].startswith("significant")
        assert sig == (p < 0.05) or abs(p - 0.05) <= 2 * 2 / (B + 1), (t, lo, hi, p)


def test_too_few_bootstrap_replicates_refused():
    """With B replicates the dual test's smallest p is 2/(B + 1): below 2/(1 - c) - 1 replicates a
    change could never be shown at confidence c, yet the interpolated interval could exclude 0 (B = 1
    gave a one-point "CI" and "significant degradation" beside p = 1).  Refused, on every entry
    point that bootstraps; the boundary is exact (39 at 95 %, 199 at 99 %); 0 means none."""
    o = -np.random.default_rng(0).exponential(2.0, 200)
    q = o - 0.05
    acc = ppldelta.Accumulator(block_size=10).update(o, q)
    for fn in (lambda **kw: ppldelta.analyze(o, q, **kw), lambda **kw: acc.report(**kw)):
        for b, c in ((1, 0.95), (38, 0.95), (198, 0.99), (18, 0.9)):
            with pytest.raises(ValueError, match=rf"n_bootstrap={b} is too few .* at least {round(2 / (1 - c) - 1)}"):
                fn(n_bootstrap=b, confidence=c)
        for b in (-1, True, 2.5, "100"):
            with pytest.raises(ValueError, match="n_bootstrap must be an integer >= 0"):
                fn(n_bootstrap=b)
        for b, c in ((39, 0.95), (199, 0.99), (19, 0.9), (np.int64(40), 0.95)):
            r = fn(n_bootstrap=b, confidence=c)
            assert r["significance"]["p_value"] >= 2 / (int(b) + 1) and r["ln_ppl_ratio"]["ci"][0] > 0
            assert r["significance"]["p_value"] <= 1 - c + 1e-12  # the floor can show the change
        r = fn(n_bootstrap=0)
        assert r["ln_ppl_ratio"]["ci"] == [None, None] and r["significance"]["p_value"] is None


def test_default_replicates_follow_the_confidence(tmp_path, capsys):
    """The default n_bootstrap grows with the confidence (at least 25 replicates beyond each end):
    after the floor above was enforced, confidence=0.999 with a fixed default of 1000 was refused
    everywhere, `ppldelta compare --confidence 0.999` included, which has no replicates option.
    The label of a 99.8 % interval is '99.8%', not '100%'."""
    from ppldelta.cli import main

    o = -np.random.default_rng(2).exponential(2.0, 400)
    q = o - np.random.default_rng(3).exponential(0.05, 400)
    for c, b in ((0.9, 1000), (0.95, 1000), (0.99, 5000), (0.998, 25000), (0.999, 50000)):
        r = ppldelta.analyze(o, q, confidence=c)
        assert r["bootstrap"]["n_bootstrap"] == b and r["ln_ppl_ratio"]["ci"][0] is not None
        assert ppldelta.Accumulator(block_size=20).update(o, q).report(confidence=c)["bootstrap"]["n_bootstrap"] == b
    assert "99.8% CI" in str(ppldelta.analyze(o, q, confidence=0.998)) and "100%" not in str(
        ppldelta.analyze(o, q, confidence=0.998))
    np.save(tmp_path / "o.npy", o)
    np.save(tmp_path / "q.npy", q)
    assert main(["compare", str(tmp_path / "o.npy"), str(tmp_path / "q.npy"), "--confidence", "0.999"]) == 0
    assert "99.9% CI" in capsys.readouterr().out


def test_an_infinite_loss_has_the_floor_p_of_the_dual_test():
    """A -inf quantized token makes every replicate +inf: no replicate at or below 0, so the dual
    test's p is its floor 2/(B + 1), as for any finite loss that no replicate crosses (it was
    1/(B + 1), below the floor the README states)."""
    o = np.full(300, -1.0)
    q = o - 0.01
    finite = ppldelta.analyze(o, q, n_bootstrap=200)["significance"]["p_value"]
    q[7] = -np.inf
    r = ppldelta.analyze(o, q, n_bootstrap=200)
    assert r["significance"]["p_value"] == finite == 2 / 201
    assert r["ln_ppl_ratio"]["ci"] == [math.inf, math.inf]


def test_negative_kld_refused_but_rounding_kept():
    o = -np.random.default_rng(0).exponential(2.0, 100)
    q = o - 0.01
    for fn in (lambda k: ppldelta.analyze(o, q, kld=k), lambda k: ppldelta.Accumulator().update(o, q, kld=k)):
        with pytest.raises(ValueError, match=r"kld\[3\] = -5.0 is not a KL divergence"):
            fn(np.r_[0.0, 0.0, 0.0, -5.0, np.zeros(96)])
    r = ppldelta.analyze(o, q, kld=np.r_[-1e-8, np.zeros(99)])  # a float32 zero's rounding
    assert r["kld"]["mean"] == pytest.approx(-1e-10, abs=1e-15)


def test_headline_and_significance_agree_when_the_ci_rounds_to_one():
    o = np.full(1000, -1e-3)
    q = np.nextafter(o, -1)  # a loss of one ulp per token: ln ratio CI > 0, its exp rounds to 1.0
    r = ppldelta.analyze(o, q)
    assert r["significance"]["verdict"] == "significant degradation"
    assert not r["verdict"]["headline"].startswith(("no measurable loss", "inconclusive"))
    assert "a real loss" in r["verdict"]["reason"]
