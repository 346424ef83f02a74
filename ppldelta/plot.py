"""Plots of ppldelta results (matplotlib, the ``plot`` extra: ``pip install ppldelta[plot]``).

Each function draws on ``ax`` when one is given, otherwise on a new standalone
``matplotlib.figure.Figure`` (not registered with pyplot: no GUI backend, no global state,
nothing to close), and returns the Axes; none calls ``show()``.  Save with
``ax.figure.savefig(path)``; in Jupyter pass an ``ax`` from ``plt.subplots()`` or
``display(ax.figure)``.  This module imports without matplotlib.
"""
from __future__ import annotations

import numpy as np

from ._adapt import as_f64, as_per_token
from ._core import QUALITIES
from .bands import expected_band
from .bands import formats as band_formats
from .report import Report, Sample, conf_label

# the quality word of a band's high end (the reference's 1/5/10 % thresholds) -> band colour
_ACCEPTABLE_COLOR = dict(zip(QUALITIES, ("#59a14f", "#edc948", "#f28e2b", "#e15759")))
_ROW_PT = 11  # height of one label row, points (fontsize 8 plus its box)
_LOG_TICKS = (0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2, 3, 5, 10, 20, 50, 100, 1e3, 1e4, 1e5)


def _new_axes(ax, figsize):
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained").add_subplot()


def _as_report(report) -> Report:
    """A Report, from a Report or its to_dict()."""
    return report if isinstance(report, Report) else Report(report)


def _ci_errorbar(ax, pos, cis, *, horizontal=False, **kw):
    """Error bars spanning exactly [lo, hi] at each position (drawn from the interval's middle,
    so a percentile CI that does not contain the point estimate is still drawn as it is).
    Intervals given as None or (None, None) are skipped; returns the ErrorbarContainer."""
    rows = [(p, ci[0], ci[1]) for p, ci in zip(pos, cis) if ci is not None and ci[0] is not None]
    if not rows:
        return None
    p, lo, hi = (np.asarray(c, dtype=np.float64) for c in zip(*rows))
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    if horizontal:
        return ax.errorbar(mid, p, xerr=half, fmt="none", capsize=4, **kw)
    return ax.errorbar(p, mid, yerr=half, fmt="none", capsize=4, **kw)


def _axes_x(ax, x):
    """Where data coordinate x lies across the axes, 0 (left) .. 1 (right), at the current limits."""
    return ax.transAxes.inverted().transform(ax.transData.transform((x, 0)))[0]


def _headroom(ax, rows, log=False):
    """Raise the y limit so that the data stay below a band of ``rows`` label rows at the top of
    the axes; returns the band's lower edge in axes fraction."""
    height_pt = max(ax.bbox.height * 72 / ax.figure.dpi * 0.8, 60)  # layout shrinks the axes a little
    top = 1 - min(0.5, (rows * _ROW_PT + 8) / height_pt)
    lo, hi = ax.get_ylim()
    if log:
        lo, hi = np.log10(lo), np.log10(hi)
    hi = lo + (hi - lo) / (top - 0.02)
    ax.set_ylim(*((10 ** lo, 10 ** hi) if log else (lo, hi)))
    return top


def _marks(ax, marks, log=False):
    """Vertical marker lines (each also a legend label) that stop below a band at the top of the
    axes, where each label is written on a row of its own, in the line's colour: labels cannot
    overlap each other, the bars or another line."""
    top = _headroom(ax, len(marks), log)
    for i, (x, label, color, style) in enumerate(marks):
        ax.axvline(x, ymax=top, color=color, linestyle=style, linewidth=1.4, label=label)
        leftwards = _axes_x(ax, x) > 0.5
        ax.annotate(label, xy=(x, 1), xycoords=("data", "axes fraction"),
                    xytext=(0, -4 - i * _ROW_PT), textcoords="offset points",
                    ha="right" if leftwards else "left", va="top", fontsize=8, color=color)


def delta_histogram(original_log_probs, quantized_log_probs, ax=None, bins=100):
    """Histogram of the per-token change in log-prob, quantized - original (log count axis, so the
    tails show), with the mean (= -ln PPL ratio) and the median marked.  Non-finite differences
    (a -inf log-prob) are left out of the histogram and counted in the title."""
    lo = as_f64(original_log_probs, "original_log_probs")
    lq = as_f64(quantized_log_probs, "quantized_log_probs")
    if lo.shape != lq.shape:
        raise ValueError(f"length mismatch: {lo.size} original log-probs, {lq.size} quantized")
    with np.errstate(invalid="ignore"):
        d = lq - lo
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("no finite log-prob differences to plot")
    ax = _new_axes(ax, (7, 4))
    ax.hist(d, bins=bins, color="#4e79a7", alpha=0.8, log=True)
    mean, median = float(d.mean()), float(np.median(d))
    _marks(ax, [(mean, f"mean {mean:+.4f}", "#e15759", "-"), (median, f"median {median:+.4f}", "black", "--")],
           log=True)
    dropped = lo.size - d.size
    with np.errstate(invalid="ignore", over="ignore"):  # the ratio of all tokens, as analyze's
        ratio = float(np.exp(np.mean(lo) - np.mean(lq)))
    ax.set_title(f"Per-token log-prob change, {d.size:,} tokens"
                 + (f" ({dropped:,} non-finite left out)" if dropped else "")
                 + f"; PPL ratio {ratio:.4g}"
                 + (f" (drawn tokens alone: {np.exp(-mean):.4g})" if dropped else ""))
    ax.set_xlabel("Δ log-prob = quantized − original (nats; < 0: the quantized model is worse)")
    ax.set_ylabel("tokens")
    return ax


def kld_distribution(kld, ax=None, percentiles=(50, 90, 99, 99.9), bins=80):
    """Histogram of per-token KL divergence on a log x axis, with the percentiles (linear
    interpolation, as in analyze()) marked and labelled.  Values at or below the smallest
    positive value shown (exact zeros, rounding) are counted in the first bin."""
    k_all = as_f64(kld, "kld")
    k_all = as_per_token(k_all, "kld", k_all.size)  # NaN and negatives refused, as analyze does
    k = k_all[np.isfinite(k_all)]
    if k.size == 0:
        raise ValueError("no finite KL divergence values to plot")
    n_inf = k_all.size - k.size
    pos = k[k > 0]
    top = float(k.max()) if pos.size else 1.0
    floor = max(float(pos.min()), top * 1e-9) if pos.size else 1e-9
    edges = np.geomspace(floor, max(top, floor * 10), bins + 1)
    ax = _new_axes(ax, (7, 4))
    ax.hist(np.clip(k, floor, None), bins=edges, color="#76b7b2", alpha=0.9)
    ax.set_xscale("log")
    ax.set_xlim(edges[0], edges[-1])
    colors = ("#4e79a7", "#f28e2b", "#e15759", "#b07aa1", "#9c755f", "#59a14f")
    # percentiles of every token, as analyze's (an infinite one is named, not drawn)
    pv = list(Sample(k_all).percentiles(list(enumerate(percentiles))).values())
    _marks(ax, [(max(float(v), floor), f"p{p:g} = {v:.3g}", colors[i % len(colors)], "--")
                for i, (p, v) in enumerate(zip(percentiles, pv)) if v < np.inf])
    beyond = [f"p{p:g}" for p, v in zip(percentiles, pv) if v == np.inf]
    ax.set_title(f"Per-token KL divergence, {k_all.size:,} tokens (mean {k_all.mean():.4g} nats)"
                 + (f"; {n_inf:,} infinite, not drawn" + (f" ({', '.join(beyond)} = inf)" if beyond else "")
                    if n_inf else ""))
    ax.set_xlabel("KL(P_original ‖ P_quantized) per token, nats (log scale)")
    ax.set_ylabel("tokens")
    return ax


def group_deltas(report, ax=None):
    """Bars of each group's relative perplexity delta (the reference dict's
    ``relative_delta_pct``, written under each bar) with its bootstrap confidence interval,
    (ratio - 1) * 100, as error bars.  The group that suffers most is highlighted (red, and said
    so in the legend and under its bar) only when its CI lies above every other group's; the
    legend sits in headroom above the bars."""
    r = _as_report(report)
    groups = r.groups
    if not groups:
        raise ValueError("the report has no groups: run analyze(..., groups=labels)")
    names = list(groups)
    rel = [groups[g].reference["relative_delta_pct"] for g in names]
    cis = [[None if c is None else (c - 1) * 100 for c in groups[g].ppl_ratio.ci] for g in names]
    apart = r.suffers_most_significant
    worst = r.suffers_most if apart else None
    x = np.arange(len(names))
    ax = _new_axes(ax, (2 + 1.3 * len(names), 4))
    ax.bar(x, rel, width=0.6, color=["#e15759" if g == worst else "#4e79a7" for g in names], alpha=0.85)
    _ci_errorbar(ax, x, cis, color="black", label=f"{conf_label(r.confidence)} CI (block bootstrap)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{g}\n{v:+.2f} %\n{groups[g].n_tokens:,} tokens"
                      + ("\nsuffers most" if g == worst else "") for g, v in zip(names, rel)])
    ax.set_ylabel("relative perplexity delta, %")
    ax.set_title(f"Perplexity delta per group (overall {r.reference['relative_delta_pct']:+.2f} %)"
                 + ("" if apart or apart is None else "\nno group differs significantly (CIs overlap)"),
                 fontsize=10)
    ends = [v for v in rel + [c for ci in cis for c in ci if c is not None] if np.isfinite(v)]
    lo, hi = min(ends + [0.0]), max(ends + [0.0])
    pad = (hi - lo) * 0.05 or 1.0
    ax.set_ylim(lo - pad if lo < 0 else 0, hi + pad)
    _headroom(ax, 3 if worst is not None else 2)
    from matplotlib.patches import Patch  # swatches of their own: a bar legend entry takes its
    swatches = [Patch(color="#4e79a7", alpha=0.85, label="relative PPL delta")]  # first bar's colour
    if worst is not None:
        swatches.append(Patch(color="#e15759", alpha=0.85, label="suffers most: its CI lies above the others'"))
    ax.legend(handles=swatches + ax.get_legend_handles_labels()[0], loc="upper left", fontsize=8)
    return ax


def _measured(value, fmt):
    """(ratio, (lo, hi) | None, format | None) from a Report/dict or a (ratio, (lo, hi)) pair."""
    if isinstance(value, Report):
        return value.ppl_ratio.value, value.ppl_ratio.ci, fmt or (value.expected.format if value.expected else None)
    if hasattr(value, "to_dict") or isinstance(value, dict):  # a report's dict, or its strict JSON
        return _measured(value if hasattr(value, "to_dict") else Report(value), fmt)
    if isinstance(value, (tuple, list)):
        ratio, ci = value
        return float(ratio), ci, fmt
    return float(value), None, fmt


def expected_bands(reports_or_ratios, formats=None, ax=None, xmax=3.0):
    """The published bands (ppldelta.expected_band) as one shaded band per format, coloured by
    the quality word of the band's high end, and each variant's
    measured PPL ratio with its confidence interval, on the row of its format (``formats``:
    name -> format; a Report made with ``expected=`` brings its own) or on a row of its own.

    ``reports_or_ratios``: name -> Report, its to_dict(), (ratio, (lo, hi)) or a bare ratio.
    The x axis turns logarithmic past a ratio of 2 and stops at ``xmax``; a variant beyond it
    is drawn as a triangle at the edge with its value written."""
    keys = band_formats()
    bands = [expected_band(k) for k in keys]
    row_of = {b: i for i, b in enumerate(bands)}
    formats = formats or {}
    pts = []  # (name, ratio, ci, row)
    extra = []
    for name, value in reports_or_ratios.items():
        ratio, ci, fmt = _measured(value, formats.get(name))
        if fmt is not None:
            row = row_of[expected_band(fmt)]
        else:
            row = len(bands) + len(extra)
            extra.append(name)
        pts.append((name, ratio, ci if ci is not None and ci[0] is not None else None, row))

    ends = [v for _, r, ci, _ in pts for v in ((r,) + (tuple(ci) if ci else ())) if np.isfinite(v)]
    right = min(max([1.35] + [v * 1.08 for v in ends]), xmax)
    left = min([0.98] + [v * 0.98 for v in ends])
    log = right > 2

    n_rows = len(bands) + len(extra)
    ax = _new_axes(ax, (9, 0.45 * n_rows + 1.6))
    if log:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ticks, gap = [], np.log(right / left) / 12  # keep tick labels apart
        for t in (t for t in _LOG_TICKS if left <= t <= right):
            if not ticks or np.log(t / ticks[-1]) >= gap:
                ticks.append(t)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(left, right)
    ax.set_ylim(n_rows - 0.5, -0.5)

    lows = np.array([b.low for b in bands])
    widths = np.array([b.high - b.low for b in bands])
    sliver = (right / left) ** 0.006 if log else 1 + 0.006 * (right - left)  # FP16: a point band
    thin = widths == 0
    lows, widths = np.where(thin, lows / sliver, lows), np.where(thin, lows * (sliver - 1 / sliver), widths)
    colors = [_ACCEPTABLE_COLOR.get(b.acceptable, "0.7") for b in bands]
    ax.barh(np.arange(len(bands)), widths, left=lows, height=0.7, alpha=0.5, color=colors,
            label="expected band (published)")
    for i, b in enumerate(bands):
        if b.open_ended and right > b.high:  # "1.30+": anything above the low end is typical
            ax.barh(i, right - b.high, left=b.high, height=0.7, alpha=0.12, hatch="//", color=colors[i],
                    edgecolor=colors[i], linewidth=0)
    ax.axvline(1.0, color="0.4", linewidth=0.8)

    # points: several variants on one row are spread over it
    per_row = {}
    for p in pts:
        per_row.setdefault(p[3], []).append(p)
    ys, xs, cis, clipped = [], [], [], []
    for row, items in per_row.items():
        step = min(0.25, 0.6 / len(items))
        for j, (name, ratio, ci, _) in enumerate(items):
            y = row + (j - (len(items) - 1) / 2) * step
            ys.append(y)
            cis.append(ci)
            xs.append(ratio if ratio <= right else np.nan)
            if ratio > right:
                clipped.append((name, ratio, y))
                continue
            lo, hi = ci if ci else (ratio, ratio)
            leftwards = _axes_x(ax, hi) > 0.8
            ax.annotate(name, (lo if leftwards else hi, y), xytext=(-5 if leftwards else 5, 0), fontsize=8,
                        textcoords="offset points", ha="right" if leftwards else "left", va="center")
    _ci_errorbar(ax, ys, cis, horizontal=True, color="black", linewidth=1.2, label="confidence interval")
    ax.plot(xs, ys, "o", color="black", markersize=5, label="measured PPL ratio")
    for name, ratio, y in clipped:
        ax.plot([right], [y], ">", color="#e15759", markersize=8, clip_on=False)
        ax.annotate(f"{name}: {ratio:,.{2 if ratio < 100 else 0}f}× →", (right, y), xytext=(-8, 0),
                    textcoords="offset points", ha="right", va="center", fontsize=8, color="#e15759")

    labels = [f"{b.format}  {b.low:.3f}" + (f"–{b.high:.3f}" if b.high != b.low else "")
              + ("+" if b.open_ended else "") for b in bands]
    ax.set_yticks(np.arange(n_rows), labels + extra)
    ax.set_xlabel("PPL(quantized) / PPL(original)" + (" (log scale)" if log else ""))
    ax.set_title("Measured perplexity ratio vs the expected band of its format", loc="left")
    ax.legend(loc="upper right", fontsize=8)
    return ax


def quality_vs_size(reports, sizes=None, ax=None):
    """Quality against size: each variant's mean KLD (log scale) with the certified bounds of the
    mean (the report's ``kld_bounds``) as error bars, against its bits per weight when every
    variant's is known, else its weight files' size, else its place in ``reports``; each point
    labelled with its name.  A mean or bound at or below zero is drawn at the axis floor (a tenth
    of the smallest positive value).

    ``reports``: name -> Report or its to_dict(), each with a KLD; ``sizes``: name ->
    {"bytes": ..., "bits_per_weight": ...} (``ppldelta eval``'s JSON), None or a missing key
    meaning unknown."""
    items = [(name, _as_report(rep)) for name, rep in reports.items()]
    if not items:
        raise ValueError("no reports to plot")
    missing = [name for name, r in items if r.kld is None]
    if missing:
        raise ValueError(f"no KLD in the report of {', '.join(missing)}")
    sizes = sizes or {}

    def known(key):
        vals = [(sizes.get(name) or {}).get(key) for name, _ in items]
        return None if any(v is None for v in vals) else [float(v) for v in vals]

    x, xlabel = known("bits_per_weight"), "bits per weight (8 × weight files' bytes / parameters)"
    if x is None and known("bytes") is not None:
        x, xlabel = [b / 1e6 for b in known("bytes")], "weight files, MB"
    if x is None:
        x, xlabel = list(range(1, len(items) + 1)), "variant (size unknown)"
    y = [float(r.kld.mean) for _, r in items]
    bounds = [tuple(r.kld_bounds.mean) if r.kld_bounds and None not in r.kld_bounds.mean else None
              for _, r in items]
    positive = [v for v in y + [b for bb in bounds if bb for b in bb] if np.isfinite(v) and v > 0]
    floor = min(positive) / 10 if positive else 1e-6
    ceil = max(positive) * 10 if positive else 1.0  # an infinite mean: a triangle up here, said so
    inf = [not np.isfinite(v) for v in y]
    ys = [ceil if i else max(v, floor) for v, i in zip(y, inf)]
    ax = _new_axes(ax, (7, 4.5))
    ax.set_yscale("log")
    _ci_errorbar(ax, x, [None if b is None else (max(b[0], floor), max(b[1], floor)) for b in bounds],
                 color="black", linewidth=1.2, label="certified bounds of the mean")
    ax.plot([xi for xi, i in zip(x, inf) if not i], [yi for yi, i in zip(ys, inf) if not i], "o",
            color="#4e79a7", markersize=6, label="KLD mean")
    if any(inf):
        ax.plot([xi for xi, i in zip(x, inf) if i], [yi for yi, i in zip(ys, inf) if i], "^",
                color="#e15759", markersize=8, label="KLD mean infinite (a token the variant deems impossible)")
    for name, xi, yi, i in zip((n for n, _ in items), x, ys, inf):
        ax.annotate(name.replace("$", r"\$") + (" (inf)" if i else ""), (xi, yi), xytext=(6, 4),
                    textcoords="offset points", fontsize=8)
    if xlabel.startswith("variant"):
        ax.set_xticks(x, [n.replace("$", r"\$") for n, _ in items], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KL(original ‖ variant), nats (log scale)")
    ax.set_title("Quality against size (lower is better)", loc="left")
    ax.legend(loc="best", fontsize=8)
    return ax
