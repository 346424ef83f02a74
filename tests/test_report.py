"""The one report builder (ppldelta.report): its typed schema, Report(dict) round trips, the
builder against moments computed here, the one home of the reference formula and the bands, and
the import graph that keeps it the only builder."""
import ast
import json
import math
import pathlib
import warnings

import numpy as np
import pytest

import ppldelta
from ppldelta import _core, report
from oracle import fsum_delta

PKG = pathlib.Path(ppldelta.__file__).parent


def _data(n=600, seed=1):
    rng = np.random.default_rng(seed)
    o = -rng.exponential(2.0, n)
    q = np.minimum(o - rng.normal(0.03, 0.1, n), 0)
    return o, q, rng.exponential(0.02, n), rng.random(n) < 0.9, np.where(np.arange(n) % 3, "prose", "code")


def test_schema_version_typed_fields_and_round_trip():
    o, q, kld, same, labels = _data()
    r = ppldelta.analyze(o, q, kld=kld, same_top1=same, groups=labels, expected="awq", n_bootstrap=50)
    d = r.to_dict()
    assert d["schema_version"] == report.SCHEMA_VERSION == 1
    assert list(d)[-1] == "schema_version" and "kld_reverse" not in d and "q_top1_in_base_top5" not in d
    assert isinstance(r.ppl.quantized, report.Estimate) and isinstance(r.kld, report.Distribution)
    assert isinstance(r.delta_p, report.DeltaP) and isinstance(r.groups["code"], report.GroupResult)
    assert isinstance(r.verdict, report.Verdict) and isinstance(r.expected, report.Expected)
    assert r.kld.percentiles["p99"] == d["kld"]["p99"] == r.kld["p99"]
    assert r.groups["code"].reference == d["groups"]["code"]["reference"] == r["groups"]["code"]["reference"]
    back = ppldelta.Report(json.loads(json.dumps(d)))
    assert back.to_dict() == d and str(back) == str(r) and back.to_markdown() == r.to_markdown()
    old = {k: v for k, v in d.items() if k not in ("schema_version", "verdict", "suffers_most_significant")}
    assert ppldelta.Report(old).to_dict() == d  # an older dict: the headline is recomputed
    assert "schema_version" in report.__doc__ and all(f"``{k}``" in report.__doc__ for k in d)


def test_builder_on_moments_computed_here_equals_analyze():
    o, q, kld, same, labels = _data(900, 2)
    bs = 30
    d = o - q
    blocks = (np.add.reduceat(d, np.arange(0, d.size, bs)), np.full(d.size // bs, float(bs)))
    dp = np.exp(q) - np.exp(o)
    groups = []
    for i, name in enumerate(["code", "prose"]):
        sel = labels == name
        gd = d[sel]
        gbs = min(bs, gd.size // 2)
        starts = np.arange(0, gd.size, gbs)
        groups.append(report.GroupMoments(
            name, int(sel.sum()), math.fsum(o[sel]), math.fsum(q[sel]),
            (np.add.reduceat(gd, starts), np.diff(np.append(starts, gd.size)).astype(float)), i,
            float(np.sum(kld[sel])), int(same[sel].sum())))
    m = report.Moments(o.size, math.fsum(o), math.fsum(q), math.fsum(o * o), math.fsum(q * q), math.fsum(o * q),
                       math.fsum(dp), math.fsum(dp * dp), math.fsum(dp ** 4), report.Sample(dp), blocks, bs,
                       report.DistMoments(math.fsum(kld), math.fsum(kld * kld), report.Sample(kld)),
                       counts={"same_top1": int(same.sum())}, groups=groups)
    built = report.build(m, n_bootstrap=200, seed=4).to_dict()
    got = ppldelta.analyze(o, q, kld=kld, same_top1=same, groups=labels, block_size=bs, n_bootstrap=200,
                           seed=4).to_dict()
    assert built["reference"] == got["reference"] == fsum_delta(o, q)
    assert built["groups"]["code"]["reference"] == fsum_delta(o[labels == "code"], q[labels == "code"])

    def close(a, b):
        if isinstance(a, dict):
            assert list(a) == list(b)
            for k in a:
                close(a[k], b[k])
        elif isinstance(a, list):
            for x, y in zip(a, b):
                close(x, y)
        elif isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-9, abs=1e-12)
        else:
            assert a == b

    close(built, got)
    # the llama.cpp formulas, by hand
    nq = -q
    assert built["ppl"]["quantized"]["value"] == pytest.approx(math.exp(nq.mean()), rel=1e-13)
    assert built["delta_p"]["rms"] == pytest.approx(100 * math.sqrt(np.mean(dp ** 2)), rel=1e-13)
    assert built["same_top1"]["pct"] == pytest.approx(100 * same.mean(), rel=1e-15)


def test_histogram_percentiles_are_close_to_the_sample_ones():
    x = np.random.default_rng(5).exponential(0.1, 5000)
    edges = np.concatenate([[0.0], np.logspace(-12, 3, 1501)])
    h = report.Histogram(np.histogram(x, edges)[0], edges, x.size, float(x.min()), float(x.max()), True)
    exact = report.Sample(x).percentiles(report.PCTS_KLD)
    approx = h.percentiles(report.PCTS_KLD)
    for k, v in exact.items():  # the sparse extreme tails (p0.1, p99.9) may fall between bins
        assert k in ("p0.1", "p99.9") or approx[k] == pytest.approx(v, rel=0.05), k
    assert approx["min"] == x.min() and approx["max"] == x.max()


def test_histogram_percentiles_of_exact_zeros_are_zero():
    """Exact zeros (tokens whose distributions a quantizer left unchanged) are the first log bin's
    common case: its percentiles read 0 (they had interpolated to 5e-13 for 0), within 1e-12 of
    the sample's in any case, through the Accumulator too."""
    rng = np.random.default_rng(6)
    edges = np.concatenate([[0.0], np.logspace(-12, 3, 1501)])
    for x in (np.r_[np.zeros(90), np.full(10, 0.01)], np.r_[np.zeros(50), rng.uniform(0, 1e-12, 50)],
              np.r_[rng.uniform(2e-13, 8e-13, 99), 0.5]):
        h = report.Histogram(np.histogram(x, edges)[0], edges, x.size, float(x.min()), float(x.max()), True)
        exact = report.Sample(x).percentiles(report.PCTS_KLD)
        approx = h.percentiles(report.PCTS_KLD)
        for k, v in exact.items():
            if v < 1e-12:
                assert abs(approx[k] - v) < 1e-12 and x.min() <= approx[k] <= x.max(), k
    o = -np.ones(100)
    k = np.r_[np.zeros(90), np.full(10, 0.01)]
    got = ppldelta.Accumulator().update(o, o - 0.01, kld=k).report(n_bootstrap=0)["kld"]
    want = ppldelta.analyze(o, o - 0.01, kld=k, n_bootstrap=0)["kld"]
    for key in ("p0.1", "p1", "p5", "p10", "median"):
        assert got[key] == want[key] == 0.0, key


def test_one_home_for_the_reference_formula_and_the_bands():
    assert report.reference(-30.0, -33.0, 10) == _core.reference(-30.0, -33.0, 10) == \
        ppldelta.perplexity_delta([-3.0] * 10, [-3.3] * 10)
    with pytest.raises(ValueError, match=r"^group 'a': the original model's perplexity overflows"):
        report.reference(-8000.0, -1.0, 10, "group 'a': ")
    for fmt in ppldelta.bands.formats():
        b = ppldelta.expected_band(fmt)
        assert b.acceptable == _core.quality((b.high - 1) * 100)
    from ppldelta import cli

    assert tuple(cli.QUALITY_ORDER) == _core.QUALITIES
    sources = {p.name: p.read_text() for p in PKG.glob("*.py")}
    for name, text in sources.items():  # no Python copy of the thresholds or of the formula
        assert '"good" if' not in text and "< 5.0" not in text, name
        assert "math.exp(-(" not in text, name


def _imports(path):
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out += [(node.module or "", a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
    return out


def test_the_import_graph():
    """The adapter imports no sibling; the builder only _core and bands; accumulate no private
    name of analysis; no submodule imports the package root."""
    assert [m for m, _ in _imports(PKG / "_adapt.py") if m not in ("__future__", "numpy")] == []
    assert {m for m, _ in _imports(PKG / "report.py") if m and not m.startswith(("__", "numpy", "html", "math",
                                                                                  "textwrap", "dataclasses"))} \
        <= {"bands", ""}
    assert not [n for m, n in _imports(PKG / "accumulate.py") if m == "analysis"]
    for name in ("_adapt", "paired", "report", "analysis", "accumulate", "logits", "flips", "bands", "cli", "plot",
                 "demo", "distributed"):
        for m, n in _imports(PKG / f"{name}.py"):
            assert m != "ppldelta" and not (m == "" and n not in ("_core", "_adapt", "paired")), (name, m, n)


def test_no_overflow_warnings_where_infinities_are_expected():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = ppldelta.Accumulator(block_size=4)
        acc.update([-2.0] * 30, [-2.0] * 29 + [-math.inf], kld=[0.1] * 29 + [math.inf], groups=["a", "b"] * 15)
        acc.update([-1e300] * 3 + [-1.0], [-1e300] * 4, kld=[0.0] * 4, groups=["a"] * 4)
        with pytest.raises(ValueError, match="overflows"):
            acc.report()
        ppldelta.analyze([-2.0] * 30, [-2.0] * 29 + [-math.inf], groups=["a", "b"] * 15, n_bootstrap=40)
