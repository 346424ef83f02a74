"""ppldelta.plot: each plot renders to a valid PNG and holds the artists it promises, with the
numbers of the report it was drawn from."""
import subprocess
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import ppldelta  # noqa: E402
from ppldelta import plot  # noqa: E402
from ppldelta.bands import expected_band, formats  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pair(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    o = -rng.exponential(2.0, n)
    q = np.minimum(o - 0.05 + rng.normal(0, 0.3, n), 0)
    q[n // 2:] = np.minimum(q[n // 2:] - 0.05, 0)  # the second group suffers more
    kld = rng.exponential(0.05, n)
    kld[:10] = 0.0  # exact agreement happens; the log axis must cope
    return o, q, kld


@pytest.fixture(scope="module")
def report():
    o, q, kld = _pair()
    labels = np.repeat(["prose", "code", "math"], [2000, 1000, 1000])
    return ppldelta.analyze(o, q, groups=labels, kld=kld, expected="gptq-4", n_bootstrap=300)


def _save(ax, tmp_path, name):
    path = tmp_path / f"{name}.png"
    ax.figure.savefig(path, dpi=80)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    return path


def _errorbar_spans(ax):
    """(position, low end, high end) of every error bar segment on the axes."""
    out = []
    for c in ax.containers:
        if isinstance(c, matplotlib.container.ErrorbarContainer):
            for seg in c.lines[2][0].get_segments():
                (x0, y0), (x1, y1) = seg
                out.append((x0, min(y0, y1), max(y0, y1)) if x0 == x1 else (y0, min(x0, x1), max(x0, x1)))
    return sorted(out)


def _band_container(ax):
    (c,) = [c for c in ax.containers if c.get_label() == "expected band (published)"]
    return c


def test_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import ppldelta.plot as p\n"
            "try:\n    p.kld_distribution([0.1, 0.2])\nexcept ImportError:\n    print('needs matplotlib')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "needs matplotlib"


def test_delta_histogram(tmp_path):
    o, q, _ = _pair()
    q = q.copy()
    q[7] = -np.inf  # left out, and said so
    ax = plot.delta_histogram(o, q, bins=50)
    _save(ax, tmp_path, "delta")
    d = np.delete(q - o, 7)
    labels = {ln.get_label() for ln in ax.get_lines()}
    assert labels == {f"mean {d.mean():+.4f}", f"median {np.median(d):+.4f}"}
    assert len(ax.patches) == 50
    assert sum(p.get_height() for p in ax.patches) == d.size
    assert "1 non-finite left out" in ax.get_title()
    # the title's PPL ratio is analyze's, over every token (it was the drawn tokens' 1.05 for inf)
    assert ppldelta.analyze(o, q, n_bootstrap=0)["ppl_ratio"]["value"] == np.inf
    assert "PPL ratio inf (drawn tokens alone: " in ax.get_title()
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="length mismatch"):
        plot.delta_histogram(o, q[:-1])


def test_kld_distribution(tmp_path):
    _, _, kld = _pair()
    pcts = (50, 90, 99, 99.9)
    ax = plot.kld_distribution(kld, percentiles=pcts)
    _save(ax, tmp_path, "kld")
    assert ax.get_xscale() == "log"
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == [f"p{p:g} = {v:.3g}" for p, v in zip(pcts, np.percentile(kld, pcts))]
    for ln, v in zip(lines, np.percentile(kld, pcts)):
        assert ln.get_xdata()[0] == pytest.approx(v)
    texts = [t.get_text() for t in ax.texts]
    assert all(ln.get_label() in texts for ln in lines)  # written beside each line, not only in a legend
    assert sum(p.get_height() for p in ax.patches) == kld.size  # zeros counted in the first bin


def test_kld_distribution_names_what_it_cannot_draw():
    """+inf KLDs were dropped without a word (the title's mean and the percentiles were of the
    finite ones: 0.1 beside analyze's inf); NaN and -5 were drawn.  Oracle: analyze."""
    k = np.full(1000, 0.1)
    k[:10] = np.inf
    ax = plot.kld_distribution(k, percentiles=(50, 99, 99.9))
    r = ppldelta.analyze(np.full(1000, -1.0), np.full(1000, -1.1), kld=k, n_bootstrap=0)["kld"]
    assert r["mean"] == r["p99"] == r["p99.9"] == np.inf and r["median"] == 0.1
    assert ax.get_title().endswith("1,000 tokens (mean inf nats); 10 infinite, not drawn (p99, p99.9 = inf)")
    assert [ln.get_label() for ln in ax.get_lines()] == ["p50 = 0.1"]
    for bad, msg in ((np.r_[0.1, np.nan], "kld contains NaN at index 1"), (np.r_[0.1, -5.0], r"kld\[1\] = -5.0")):
        with pytest.raises(ValueError, match=msg):
            plot.kld_distribution(bad)


def test_group_deltas(tmp_path, report):
    d = report.to_dict()
    ax = plot.group_deltas(report)
    _save(ax, tmp_path, "groups")
    names = list(d["groups"])
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]
    assert len(bars) == 1 and len(bars[0].patches) == len(names) == 3
    rel = [d["groups"][g]["reference"]["relative_delta_pct"] for g in names]
    assert [p.get_height() for p in bars[0].patches] == pytest.approx(rel)
    spans = _errorbar_spans(ax)
    assert len(spans) == 3
    for i, g in enumerate(names):
        lo, hi = d["groups"][g]["ppl_ratio"]["ci"]
        assert spans[i] == pytest.approx((i, (lo - 1) * 100, (hi - 1) * 100))
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    for g, v, t in zip(names, rel, ticks):
        assert t.startswith(g) and f"{v:+.2f} %" in t
    colors = [tuple(p.get_facecolor()) for p in bars[0].patches]
    if d["suffers_most_significant"]:
        worst = names.index(d["suffers_most"])
        assert "suffers most" in ticks[worst] and sum("suffers most" in t for t in ticks) == 1
        assert all(c != colors[worst] for i, c in enumerate(colors) if i != worst)
    else:  # no group is singled out when the CIs overlap
        assert not any("suffers most" in t for t in ticks) and len(set(colors)) == 1
    with pytest.raises(ValueError, match="no groups"):
        plot.group_deltas(ppldelta.analyze(*_pair(200)[:2], n_bootstrap=40))


def test_expected_bands(tmp_path, report):
    ratios = {"from report": report, "q4 pair": (1.07, (1.05, 1.09)), "unlabelled": (1.5, (1.4, 1.6)),
              "bare": 1.01, "far off": (45891.0, (28000.0, 69000.0))}
    fmts = {"q4 pair": "gguf-q4_k_m", "bare": "fp16", "far off": "Q2_K"}
    ax = plot.expected_bands(ratios, formats=fmts)
    _save(ax, tmp_path, "bands")
    keys = formats()
    bands = _band_container(ax)
    assert len(bands.patches) == len(keys)
    for patch, k in zip(bands.patches, keys):
        b = expected_band(k)
        if b.high > b.low:
            assert (patch.get_x(), patch.get_x() + patch.get_width()) == pytest.approx((b.low, b.high))
        else:  # FP16: a sliver centred on 1.00
            assert patch.get_x() < b.low < patch.get_x() + patch.get_width()
    # rows: the eight formats, then one per variant without a format
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert len(ticks) == len(keys) + 1 and ticks[-1] == "unlabelled"
    b = expected_band("gptq-4")
    assert ticks[keys.index("gptq-4")] == f"GPTQ  {b.low:.3f}–{b.high:.3f}"
    # points sit on the row of their format (report.expected for the report)
    pts = dict(zip(*[ln.get_data() for ln in ax.get_lines() if ln.get_label() == "measured PPL ratio"][0][::-1]))
    rows = {round(y): x for y, x in pts.items()}
    assert rows[keys.index("gptq-4")] == pytest.approx(report["ppl_ratio"]["value"])
    n = len(keys)
    assert rows[keys.index("gguf-q4_k_m")] == 1.07 and rows[keys.index("fp16")] == 1.01 and rows[n] == 1.5
    # error bars are the CIs; the one past xmax is at the edge, its value written
    spans = {round(y): (lo, hi) for y, lo, hi in _errorbar_spans(ax)}
    assert spans[keys.index("gptq-4")] == pytest.approx(tuple(report["ppl_ratio"]["ci"]))
    assert spans[keys.index("gguf-q4_k_m")] == pytest.approx((1.05, 1.09))
    assert spans[n] == pytest.approx((1.4, 1.6))
    assert keys.index("fp16") not in spans  # a bare ratio has no interval
    assert ax.get_xlim()[1] == 3.0 and ax.get_xscale() == "log"
    assert any(t.get_text() == "far off: 45,891× →" for t in ax.texts)


def test_expected_bands_linear_when_close():
    ax = plot.expected_bands({"a": (1.06, (1.04, 1.08))}, formats={"a": "awq"})
    assert ax.get_xscale() == "linear" and ax.get_xlim() == pytest.approx((0.98, 1.35))
    assert len(_band_container(ax).patches) == len(formats())


def test_draws_on_given_axes_without_pyplot_state(tmp_path, report):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    before = plt.get_fignums()
    fig = Figure(figsize=(14, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    o, q, kld = _pair()
    out = [plot.delta_histogram(o, q, ax=axes[0]), plot.kld_distribution(kld, ax=axes[1]),
           plot.group_deltas(report, ax=axes[2]), plot.expected_bands({"v": report}, ax=axes[3])]
    assert all(a is b for a, b in zip(out, axes))
    fig.savefig(tmp_path / "panel.png", dpi=60)
    assert (tmp_path / "panel.png").read_bytes()[:8] == PNG_MAGIC
    plot.kld_distribution(kld)  # a standalone figure: pyplot knows nothing of it
    assert plt.get_fignums() == before


# ------------------------------------------------------------------ geometry: nothing overlaps
def _boxes(ax):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(ax.figure)
    canvas.draw()  # the layout settles, then every extent is final
    return canvas.get_renderer()


def _hit(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _labels_clear(ax, patches):
    r = _boxes(ax)
    texts = [t.get_window_extent(r) for t in ax.texts]
    for i, a in enumerate(texts):
        assert not any(_hit(a, b) for b in texts[i + 1:]), "labels overlap each other"
        assert not any(_hit(a, p.get_window_extent(r)) for p in patches if p.get_height() > 0), "label on a bar"
        assert not any(_hit(a, ln.get_window_extent(r)) for ln in ax.get_lines()), "label crosses a line"
    fig_box = ax.figure.bbox
    lo, hi = sorted(ax.get_xlim())
    shown = [t for v, t in zip(ax.get_xticks(), ax.get_xticklabels()) if lo <= v <= hi]  # drawn ones
    for t in shown:
        if t.get_visible() and t.get_text():
            e = t.get_window_extent(r)
            assert fig_box.x0 <= e.x0 and e.x1 <= fig_box.x1 + 0.5, f"tick label {t.get_text()!r} clipped"


@pytest.mark.parametrize("figsize", [(7, 4), (5, 3.2)])
def test_marker_labels_never_overlap(figsize):
    from matplotlib.figure import Figure

    o, q, kld = _pair()
    ax = Figure(figsize=figsize, layout="constrained").add_subplot()
    plot.kld_distribution(kld, ax=ax, percentiles=(50, 90, 99, 99.9))
    _labels_clear(ax, ax.patches)
    ax = Figure(figsize=figsize, layout="constrained").add_subplot()
    plot.delta_histogram(o, np.minimum(o + 0.001, 0), ax=ax)  # mean and median almost on one x
    _labels_clear(ax, ax.patches)


def _legend_clear(ax):
    r = _boxes(ax)
    leg = ax.get_legend().get_window_extent(r)
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)][0]
    assert not any(_hit(leg, p.get_window_extent(r)) for p in bars.patches if np.isfinite(p.get_height()))
    for c in ax.containers:
        if isinstance(c, matplotlib.container.ErrorbarContainer):
            for seg in c.lines[2][0].get_segments():
                (x0, y0), (x1, y1) = ax.transData.transform(seg)
                assert not (leg.x0 < x0 < leg.x1 and min(y0, y1) < leg.y1 and leg.y0 < max(y0, y1))


def test_group_deltas_legend_clear_and_red_only_when_significant():
    o, q, _ = _pair()
    labels = np.repeat(["prose", "code"], 2000)
    close = ppldelta.analyze(o, q, groups=np.tile(["prose", "code"], 2000), n_bootstrap=300)  # alike
    q2 = q.copy()
    q2[2000:] -= 0.3
    far = ppldelta.analyze(o, q2, groups=labels, n_bootstrap=300)
    for r in (close, far):
        (a_lo, a_hi), (b_lo, b_hi) = (r["groups"][g]["ppl_ratio"]["ci"] for g in ("prose", "code"))
        apart = a_lo > b_hi or b_lo > a_hi  # the oracle: the CIs do not overlap
        ax = plot.group_deltas(r)
        _legend_clear(ax)
        bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)][0]
        reds = [tuple(p.get_facecolor()[:3]) == matplotlib.colors.to_rgb("#e15759") for p in bars.patches]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        if apart:
            assert reds == [False, True] and any("suffers most" in t for t in legend)
        else:
            assert not any(reds) and not any("suffers most" in t for t in legend)
            assert "no group differs significantly" in ax.get_title()
    assert far["suffers_most_significant"] and not close["suffers_most_significant"]


def test_group_deltas_legend_swatch_stays_blue_when_the_first_group_is_worst():
    """The legend's "relative PPL delta" swatch took the first bar's colour: red when the worst
    group came first."""
    o, q, _ = _pair()
    q2 = q.copy()
    q2[:2000] -= 0.3  # the first group ("a") suffers most
    r = ppldelta.analyze(o, q2, groups=np.repeat(["a", "b"], 2000), n_bootstrap=300)
    assert r["suffers_most"] == "a" and r["suffers_most_significant"]
    ax = plot.group_deltas(r)
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)][0]
    assert matplotlib.colors.to_hex(bars.patches[0].get_facecolor()) == "#e15759"
    swatch = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert matplotlib.colors.to_hex(swatch["relative PPL delta"].get_facecolor()) == "#4e79a7"


def test_reports_read_back_from_strict_json_plot_and_print():
    """`ppldelta compare --format json` writes infinities as null plus a "nonfinite" map; a Report
    built from that dict crashed on str() and in every plot (TypeError deep in matplotlib), and
    quality_vs_size drew an infinite mean nowhere.  Oracle: the report the JSON came from."""
    import json

    from ppldelta.io import to_json

    o = np.full(1000, -2.0)
    q = o - 0.05
    q[5] = -np.inf
    k = np.full(1000, 0.01)
    k[5] = np.inf
    r = ppldelta.analyze(o, q, kld=k, groups=["a.b", "c"] * 500, expected="gptq-4")
    d = json.loads(to_json(r.to_dict()))
    assert d["ppl_ratio"]["value"] is None and d["nonfinite"]["groups.c.ppl_ratio.value"] == "inf"
    back = ppldelta.Report(d)
    assert back.to_dict() == r.to_dict() and str(back) == str(r)
    plot.expected_bands({"q": d})
    plot.group_deltas(d)
    fine = ppldelta.analyze(o, o - 0.05, kld=np.full(1000, 0.01))
    ax = plot.quality_vs_size({"q": d, "ok": fine})
    texts = [t.get_text() for t in ax.texts]
    assert "q (inf)" in texts and "ok" in texts
    (up,) = [ln for ln in ax.get_lines() if ln.get_marker() == "^"]
    assert up.get_ydata()[0] == pytest.approx(0.1)  # ten times the largest finite value drawn
    with pytest.raises(ValueError, match="names no value"):
        ppldelta.Report({**d, "nonfinite": {"no.such.path": "inf"}})
