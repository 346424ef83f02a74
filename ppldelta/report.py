"""The one report builder: ``build`` turns moments into a typed ``Report``.

``analyze`` and ``Accumulator.report`` both reduce their tokens to ``Moments`` (a count, exactly
rounded sums, sums of squares and products, a percentile source per distribution, bootstrap
block sums, per-group moments, counts of flags) and call ``build``; nothing else assembles a
report.  The statistics follow llama.cpp's ``--kl-divergence`` final block (same names, same
meaning: a "±" is the standard error of the mean, sqrt(var / (n - 1)); the ratio's and
difference's errors subtract the covariance of the paired per-token values; Δp is
p_Q(target) - p_base(target) in percentage points; percentiles interpolate linearly), plus a
paired block bootstrap of ln(PPL_Q / PPL_O) (resampling loop in C), per-group results and the
expected band.

Schema of ``Report.to_dict()`` (``schema_version`` = SCHEMA_VERSION = 1); each key is also an
attribute of ``Report`` holding the typed object named in brackets.  None marks a value that is
undefined (too few tokens, infinite values) or an input that was not given.

- ``reference`` (dict): the five fields of ppldelta.perplexity_delta, bit for bit
  (original_perplexity, quantized_perplexity, absolute_delta, relative_delta_pct, quality).
- ``n_tokens``, ``n_ignored``: tokens scored; positions dropped because their target was
  ignore_index.  ``confidence``: of the bootstrap intervals.  ``protocol``: as passed.
- ``ppl`` [Perplexities]: ``original`` / ``quantized`` [Estimate: value, stderr], llama.cpp's
  Mean PPL(base) / PPL(Q).  ``correlation``: Cor(ln PPL(Q), ln PPL(base)) of the per-token NLLs.
- ``ln_ppl_ratio`` [LnRatio: value, stderr, ci, bootstrap_stderr]: mean of nll_Q - nll_O; ci
  and bootstrap_stderr from the block bootstrap.
- ``ppl_ratio`` [Ratio: value, stderr, ci]: PPL(Q)/PPL(base) = exp(ln_ppl_ratio).
- ``ppl_diff`` [Estimate]: PPL(Q) - PPL(base).
- ``significance`` [Significance: verdict, p_value (bootstrap: the percentile test dual to the CI, so
  it agrees with the verdict), z_p_value (normal approx.)].
- ``bootstrap`` [Bootstrap: n_bootstrap, block_size, n_blocks, seed].
- ``kld`` [Distribution: mean, stderr, then the PCTS_KLD keys max ... min], KL(base || Q) in
  nats; ``kld_reverse`` (present only when given): KL(Q || base).
- ``kld_definition`` (str, in every report): what ``kld`` measures: 'full vocabulary' (two full
  logits rows, or per-token values given as such), or 'reference top-K estimate (K=..)' when the
  values are estimates from a stored reference (ppldelta.refstats) with certified bounds.
- ``kld_bounds`` [Bounds: mean [lo, hi], then the PCTS_KLD keys, each [lo, hi]] (present only
  when per-token bounds were given): the mean of the per-token lower / upper bounds, and each
  percentile of the lower bounds and of the upper bounds (order statistics are monotone, so the
  true percentile lies between them; from an Accumulator's histograms, up to their bin error).
  ``kld_reverse_bounds``: the same for KL(Q || base).
- ``delta_p`` [DeltaP: mean, stderr, the PCTS_DP keys, rms, rms_stderr], in percent.
- ``same_top1`` [Rate: pct, stderr]; ``top1_in_top5``, ``top1_in_top10`` (float, %); and, from
  logits only, ``q_top1_in_base_top5``, ``q_top1_in_base_top10`` (present only then).
- ``groups`` (dict name -> [GroupResult: n_tokens, reference, ln_ppl_ratio {value, ci},
  ppl_ratio {value, ci}, significance (str), kld_mean, same_top1_pct]); ``suffers_most``: the
  group with the largest relative delta; ``suffers_most_significant``: whether its CI lies
  above every other group's.
- ``expected`` [Expected: format, band [low, high], open_ended, acceptable, ratio, verdict,
  ci_verdict]: against ppldelta.expected_band.
- ``verdict`` [Verdict: headline, reason]: the report's one-line answer.
- ``schema_version`` (int).
"""
from __future__ import annotations

import html
import math
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass

import numpy as np

from . import _core
from .bands import expected_band

SCHEMA_VERSION = 1
FULL_VOCABULARY = "full vocabulary"
REFERENCE_ESTIMATE = "reference top-K estimate"
PCTS_KLD = [("max", 100), ("p99.9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("median", 50),
            ("p10", 10), ("p5", 5), ("p1", 1), ("p0.1", 0.1), ("min", 0)]
PCTS_DP = [("max", 100), ("p99.9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("p75", 75),
           ("median", 50), ("p25", 25), ("p10", 10), ("p5", 5), ("p1", 1), ("p0.1", 0.1), ("min", 0)]


# ============================================================================ moments: the builder's input

class Sample:
    """Percentiles of per-token values (numpy's 'linear' method; a rank that is, or interpolates
    towards, a +inf value is inf, where numpy gives NaN for 0 * inf)."""

    def __init__(self, values):
        self.values = values

    def percentiles(self, pcts) -> dict:
        x = self.values
        if np.isfinite(x).all():
            vals = np.percentile(x, [p for _, p in pcts])
        else:
            xs = np.sort(x)
            k = np.array([p for _, p in pcts]) / 100 * (xs.size - 1)
            lo, hi = np.floor(k).astype(np.intp), np.ceil(k).astype(np.intp)
            t, a, b = k - lo, xs[lo], xs[hi]
            with np.errstate(invalid="ignore"):  # numpy's lerp, in its two halves
                vals = np.where(t == 0, a, np.where(t < 0.5, a + (b - a) * t, b - (b - a) * (1 - t)))
            vals[np.isnan(vals)] = np.inf
        return {key: float(v) for (key, _), v in zip(pcts, vals)}


class Histogram:
    """Percentiles (numpy 'linear' ranks) from counts in fixed bins, interpolated within the bin
    (geometrically with ``log``, where a rank in the first bin, [0, its upper edge), reads as 0),
    clamped to the exact minimum and maximum; the ``n_inf`` largest of the ``n`` values are +inf."""

    def __init__(self, counts, edges, n, lo, hi, log, n_inf=0):
        self.counts, self.edges, self.n, self.lo, self.hi, self.log, self.n_inf = \
            counts, edges, n, lo, hi, log, n_inf

    def percentiles(self, pcts) -> dict:
        cum, out, n = np.cumsum(self.counts), {}, self.n
        for key, p in pcts:
            k = p / 100 * (n - 1)
            if p in (0, 100) or k > n - 1 - self.n_inf:
                out[key] = self.lo if p == 0 else self.hi if p == 100 else math.inf
                continue
            b = min(int(np.searchsorted(cum, k, side="right")), self.counts.size - 1)
            frac = (k - (cum[b - 1] if b > 0 else 0) + 0.5) / max(self.counts[b], 1)
            a, z = self.edges[b], self.edges[b + 1]
            if self.log:  # the first log bin [0, its first edge) reads as 0: exact zeros are the
                v = a * (z / a) ** frac if a > 0 else 0.0  # common case (a model against itself)
            else:
                v = a + (z - a) * frac
            out[key] = float(min(max(v, self.lo), self.hi))
        return out


@dataclass
class DistMoments:
    """One per-token distribution: sum and sum of squares of its values, and its percentiles."""

    sum: float
    sum_sq: float
    values: Sample | Histogram


@dataclass
class GroupMoments:
    """One group: its count, exactly rounded log-prob sums (-inf where one is -inf), bootstrap
    blocks (sums of nll_Q - nll_O, token counts) and its bootstrap stream (seed + stream + 1)."""

    name: str
    n: int
    sum_o: float
    sum_q: float
    blocks: tuple
    stream: int
    sum_kld: float | None = None
    n_same_top1: int | None = None


@dataclass
class Moments:
    """Everything a report is computed from.  Sums are of the log-probs o, q: ``sum_o``,
    ``sum_q`` exactly rounded (-inf where a value is -inf); squares and the product; Δp =
    exp(q) - exp(o) with its 2nd and 4th powers.  ``blocks``: (sums of nll_Q - nll_O, token
    counts) per bootstrap block in resampling order.  ``counts``: per-token flags set, by report
    key (same_top1, top1_in_top5, top1_in_top10, q_top1_in_base_top5, q_top1_in_base_top10)."""

    n: int
    sum_o: float
    sum_q: float
    sum_oo: float
    sum_qq: float
    sum_oq: float
    sum_dp: float
    sum_dp2: float
    sum_dp4: float
    dp: Sample | Histogram
    blocks: tuple
    block_size: int
    kld: DistMoments | None = None
    kld_reverse: DistMoments | None = None
    counts: dict = field(default_factory=dict)
    groups: list | None = None
    n_ignored: int = 0
    kld_bounds: tuple | None = None          # (DistMoments of the lower, of the upper bounds)
    kld_reverse_bounds: tuple | None = None
    kld_definition: str | None = None


def block_lengths(n: int, size: int) -> np.ndarray:
    """Token counts of the blocks of ``size`` consecutive tokens that cover n tokens."""
    return np.diff(np.append(np.arange(0, n, size), n)).astype(np.float64)


def block_sums(d, size: int):
    """(sums, token counts) of d over blocks of ``size`` consecutive tokens (a +inf term makes
    its block's sum inf: a token the quantized model gives probability 0)."""
    with np.errstate(over="ignore", invalid="ignore"):
        num = np.add.reduceat(d, np.arange(0, d.size, size)) if d.size else np.zeros(0)
    return num, block_lengths(d.size, size)


# ============================================================================ the typed report

_OMIT_NONE = {"omit_none": True}  # a key present only when the input was given


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float | None  # sqrt(var / (n - 1)) propagated; None where undefined


@dataclass(frozen=True)
class Perplexities:
    original: Estimate
    quantized: Estimate


@dataclass(frozen=True)
class LnRatio:
    value: float                   # mean of nll_Q - nll_O = ln(PPL(Q) / PPL(base))
    stderr: float | None           # from the paired moments (covariance subtracted)
    ci: list                       # [lo, hi] block bootstrap ([None, None] with too few blocks)
    bootstrap_stderr: float | None


@dataclass(frozen=True)
class Ratio:
    value: float                   # PPL(Q) / PPL(base)
    stderr: float | None
    ci: list                       # exp of LnRatio.ci


@dataclass(frozen=True)
class Significance:
    verdict: str                   # 'significant degradation' / '... improvement' / 'no significant change'
    p_value: float | None          # two-sided block bootstrap test of ln ratio = 0 (percentile, dual to the CI)
    z_p_value: float | None        # the same from the normal approximation


@dataclass(frozen=True)
class Bootstrap:
    n_bootstrap: int
    block_size: int
    n_blocks: int
    seed: int


@dataclass(frozen=True)
class Distribution:
    mean: float
    stderr: float | None
    percentiles: dict = field(metadata={"flatten": True})  # PCTS_* key -> value, flat in to_dict()

    def __getitem__(self, key):
        return getattr(self, key) if key in ("mean", "stderr", "rms", "rms_stderr") else self.percentiles[key]


@dataclass(frozen=True)
class Bounds:
    mean: list                     # [mean of the lower bounds, mean of the upper bounds]
    percentiles: dict = field(metadata={"flatten": True})  # PCTS_KLD key -> [lo, hi]


@dataclass(frozen=True)
class DeltaP(Distribution):
    rms: float = math.nan          # sqrt(mean Δp²), %
    rms_stderr: float | None = None


@dataclass(frozen=True)
class Rate:
    pct: float
    stderr: float | None


@dataclass(frozen=True)
class PointCI:
    value: float
    ci: list


@dataclass(frozen=True)
class GroupResult:
    n_tokens: int
    reference: dict                # perplexity_delta on the group's tokens alone
    ln_ppl_ratio: PointCI
    ppl_ratio: PointCI
    significance: str
    kld_mean: float | None
    same_top1_pct: float | None


@dataclass(frozen=True)
class Expected:
    format: str
    band: list                     # [low, high] published PPL ratio
    open_ended: bool
    acceptable: str                # the quality word of the band's high end
    ratio: float
    verdict: str                   # of the point estimate against the band
    ci_verdict: str | None         # of the CI: worse / better than expected, or consistent


@dataclass(frozen=True)
class Verdict:
    headline: str
    reason: str


@dataclass(init=False)
class Report:
    """Everything ppldelta.analyze (or Accumulator.report) measured; the schema is this module's
    docstring.  ``report["key"]`` and ``to_dict()`` give plain JSON-ready dicts; ``str()``
    reads like llama.cpp's final block; ``to_markdown()``; ``_repr_html_`` renders in
    notebooks.  ``Report(d)`` rebuilds a report from a ``to_dict()``."""

    reference: dict
    n_tokens: int
    n_ignored: int
    confidence: float
    protocol: object
    ppl: Perplexities
    correlation: float | None
    ln_ppl_ratio: LnRatio
    ppl_ratio: Ratio
    ppl_diff: Estimate
    significance: Significance
    bootstrap: Bootstrap
    kld: Distribution | None
    kld_reverse: Distribution | None = field(default=None, metadata=_OMIT_NONE)
    delta_p: DeltaP = None
    same_top1: Rate | None = None
    top1_in_top5: float | None = None
    top1_in_top10: float | None = None
    q_top1_in_base_top5: float | None = field(default=None, metadata=_OMIT_NONE)
    q_top1_in_base_top10: float | None = field(default=None, metadata=_OMIT_NONE)
    groups: dict | None = None
    suffers_most: str | None = None
    expected: Expected | None = None
    suffers_most_significant: bool | None = None
    verdict: Verdict | None = None
    kld_definition: str | None = None
    kld_bounds: Bounds | None = field(default=None, metadata=_OMIT_NONE)
    kld_reverse_bounds: Bounds | None = field(default=None, metadata=_OMIT_NONE)

    def __init__(self, data: dict | None = None, /, **values):
        if data is not None:
            values = _from_dict(data)
        for f in fields(self):
            if f.name not in values and f.default is not None and f.name != "delta_p":
                raise TypeError(f"Report needs {f.name!r}")
            setattr(self, f.name, values.get(f.name))
        if self.suffers_most_significant is None:  # one headline for every path that builds a report
            self.suffers_most_significant = _groups_apart(self)
        if self.verdict is None:
            self.verdict = _headline(self)
        if self.kld_definition is None:
            self.kld_definition = FULL_VOCABULARY

    def to_dict(self) -> dict:
        """The JSON-ready dict of the schema (a new dict each call)."""
        return {**_plain(self), "schema_version": SCHEMA_VERSION}

    @property
    def data(self) -> dict:
        """The report as a dict (kept for old callers: to_dict())."""
        return self.to_dict()

    def __getitem__(self, key):
        return self.to_dict()[key]

    # ------------------------------------------------------------------ rendering
    def _lines(self):
        r = self.reference
        pm = "\u00b1"

        def f(v, u=None, fmt="{:10.6f}"):
            s = fmt.format(v)
            return s + (f" {pm} " + fmt.format(u).strip() if u is not None else "")

        if self.verdict:
            yield ("Verdict", None)
            yield ("verdict", self.verdict.headline)
            yield ("why", self.verdict.reason)
        yield ("Perplexity delta", None)
        for k in ("original_perplexity", "quantized_perplexity", "absolute_delta", "relative_delta_pct"):
            yield (k, f"{r[k]}")
        yield ("quality", r["quality"])
        yield ("tokens", f"{self.n_tokens:,}")
        rb, ci, sig = self.ppl_ratio, self.ppl_ratio.ci, self.significance
        if ci[0] is not None:
            yield (f"PPL ratio {conf_label(self.confidence)} CI (block bootstrap)",
                   f"[{ci[0]:.6f}, {ci[1]:.6f}]  ({sig.verdict}, p {_p_eq(sig.p_value, self.bootstrap.n_bootstrap)})")
        if self.expected:
            e = self.expected
            yield (f"expected band ({e.format})",
                   f"{e.band[0]:.4f}-{e.band[1]:.4f}{'+' if e.open_ended else ''}: {e.verdict}")
        yield ("llama.cpp statistics", None)
        yield ("Mean PPL(Q)", f(self.ppl.quantized.value, self.ppl.quantized.stderr))
        yield ("Mean PPL(base)", f(self.ppl.original.value, self.ppl.original.stderr))
        if self.correlation is not None:
            yield ("Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * self.correlation:6.2f}%")
        yield ("Mean ln(PPL(Q)/PPL(base))", f(self.ln_ppl_ratio.value, self.ln_ppl_ratio.stderr))
        yield ("Mean PPL(Q)/PPL(base)", f(rb.value, rb.stderr))
        yield ("Mean PPL(Q)-PPL(base)", f(self.ppl_diff.value, self.ppl_diff.stderr))
        if self.kld:
            yield ("Mean    KLD", f(self.kld.mean, self.kld.stderr))
            for key, _ in PCTS_KLD:
                yield (f"{key:<6}  KLD", f(self.kld.percentiles[key]))
        if self.kld and self.kld_definition != FULL_VOCABULARY:
            yield ("KLD definition", self.kld_definition)
        if self.kld_bounds:
            yield ("KLD bounds (mean; p99)", _bounds_line(self.kld_bounds))
        if self.kld_reverse:
            yield ("Mean KLD(Q||base)", f(self.kld_reverse.mean, self.kld_reverse.stderr))
        if self.kld_reverse_bounds:
            yield ("KLD(Q||base) bounds (mean; p99)", _bounds_line(self.kld_reverse_bounds))
        dp = self.delta_p
        yield ("Mean    \u0394p", f(dp.mean, dp.stderr, "{:8.3f}") + " %")
        for key, _ in PCTS_DP:
            yield (f"{key:<6}  \u0394p", f(dp.percentiles[key], None, "{:8.3f}") + " %")
        yield ("RMS \u0394p", f(dp.rms, dp.rms_stderr, "{:8.3f}") + " %")
        if self.same_top1:
            yield ("Same top p", f(self.same_top1.pct, self.same_top1.stderr, "{:6.3f}") + " %")
        for k in (5, 10):
            if getattr(self, f"top1_in_top{k}") is not None:
                yield (f"base top-1 in Q top-{k}", f"{getattr(self, f'top1_in_top{k}'):6.3f} %")
        for k in (5, 10):
            if getattr(self, f"q_top1_in_base_top{k}") is not None:
                yield (f"Q top-1 in base top-{k}", f"{getattr(self, f'q_top1_in_base_top{k}'):6.3f} %")
        if self.groups:
            yield ("per group", None)
            for g, gd in self.groups.items():
                gr, gci = gd.reference, gd.ppl_ratio.ci
                cis = f" CI [{gci[0]:.4f}, {gci[1]:.4f}]" if gci[0] is not None else ""
                kl = f", KLD {gd.kld_mean:.4f}" if gd.kld_mean is not None else ""
                yield (f"{g} ({gd.n_tokens:,} tokens)",
                       f"PPL {gr['original_perplexity']} -> {gr['quantized_perplexity']} "
                       f"({gr['relative_delta_pct']:+.2f} %, {gr['quality']}){cis}{kl}")
            yield ("suffers most", _suffers_most_line(self))

    def __str__(self):
        out = []
        for k, v in self._lines():
            # long values wrap under themselves, so the report fits 100 columns
            out.append(f"\n== {k} ==" if v is None else f"{k:<34}: " + ("\n" + " " * 36).join(
                textwrap.wrap(str(v), 64, break_on_hyphens=False) or [""]))
        return "\n".join(out).lstrip("\n")

    def to_markdown(self) -> str:
        out = []
        for k, v in self._lines():
            out.append(f"\n**{k}**\n\n| statistic | value |\n|---|---|" if v is None else
                       f"| {md_cell(k)} | {md_cell(v)} |")
        return "\n".join(out).lstrip("\n")

    def _repr_html_(self):
        rows = []
        for k, v in self._lines():
            if v is None:
                rows.append(f"<tr><th colspan='2' style='text-align:left'>{html.escape(k)}</th></tr>")
            else:
                rows.append(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>")
        return "<table>" + "".join(rows) + "</table>"


def md_cell(x) -> str:
    """A markdown table cell: a '|' in it (a group label, a model's path) escaped."""
    return str(x).replace("|", "\\|")


def _plain(x):
    """A dataclass of the schema as plain dicts (flattened and omitted keys as marked)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if not is_dataclass(x):
        return x
    out = {}
    for f in fields(x):
        v = getattr(x, f.name)
        if f.metadata.get("flatten"):
            out.update(v)
        elif not (v is None and f.metadata.get("omit_none")):
            out[f.name] = _plain(v)
    return out


def _bounds_line(b):
    return (f"[{b.mean[0]:.6f}, {b.mean[1]:.6f}]; [{b.percentiles['p99'][0]:.6f}, "
            f"{b.percentiles['p99'][1]:.6f}]")


def _bounds_from(d):
    if not d:
        return None
    return Bounds(list(d["mean"]), {k: list(v) for k, v in d.items() if k != "mean"})


def _dist_from(d, cls=Distribution):
    if not d:
        return None
    named = {"mean", "stderr"} | ({"rms", "rms_stderr"} if cls is DeltaP else set())
    return cls(percentiles={k: v for k, v in d.items() if k not in named}, **{k: d[k] for k in named})


def _restore_nonfinite(d: dict) -> dict:
    """A to_dict() as strict JSON wrote it (io.to_json: NaN and infinities as null, their dotted
    paths in a top-level "nonfinite" map) with those values put back (a copy; keys may hold dots)."""
    marks = d.get("nonfinite")
    if not isinstance(marks, dict):
        return d

    def copied(x):
        return {k: copied(v) for k, v in x.items()} if isinstance(x, dict) else \
            [copied(v) for v in x] if isinstance(x, list) else x

    d = copied({k: v for k, v in d.items() if k != "nonfinite"})

    def put(obj, rest, value):
        if isinstance(obj, list):
            head, _, tail = rest.partition(".")
            if head.isdigit() and int(head) < len(obj):
                if tail:
                    return put(obj[int(head)], tail, value)
                obj[int(head)] = value
                return True
            return False
        if isinstance(obj, dict):
            for k in sorted(obj, key=len, reverse=True):  # the longest key first: "a.b" before "a"
                if rest == k:
                    obj[k] = value
                    return True
                if rest.startswith(f"{k}.") and put(obj[k], rest[len(k) + 1:], value):
                    return True
        return False

    for path, text in marks.items():
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"report dict: nonfinite[{path!r}] = {text!r} is not 'inf', '-inf' or 'nan'") from None
        if not put(d, path, value):
            raise ValueError(f"report dict: nonfinite path {path!r} names no value of the report")
    return d


def _from_dict(d: dict) -> dict:
    """Report fields from a to_dict() (or an older report dict, or its strict JSON)."""
    d = _restore_nonfinite(d)
    v = {k: d.get(k) for k in ("reference", "n_tokens", "n_ignored", "confidence", "protocol", "correlation",
                               "top1_in_top5", "top1_in_top10", "q_top1_in_base_top5", "q_top1_in_base_top10",
                               "suffers_most", "suffers_most_significant", "kld_definition")}
    v["n_ignored"] = v["n_ignored"] or 0
    v["ppl"] = Perplexities(Estimate(**d["ppl"]["original"]), Estimate(**d["ppl"]["quantized"]))
    v.update(ln_ppl_ratio=LnRatio(**d["ln_ppl_ratio"]), ppl_ratio=Ratio(**d["ppl_ratio"]),
             ppl_diff=Estimate(**d["ppl_diff"]), significance=Significance(**d["significance"]),
             bootstrap=Bootstrap(**d["bootstrap"]), kld=_dist_from(d.get("kld")),
             kld_reverse=_dist_from(d.get("kld_reverse")), delta_p=_dist_from(d["delta_p"], DeltaP),
             same_top1=Rate(**d["same_top1"]) if d.get("same_top1") else None,
             expected=Expected(**d["expected"]) if d.get("expected") else None,
             verdict=Verdict(**d["verdict"]) if d.get("verdict") else None,
             kld_bounds=_bounds_from(d.get("kld_bounds")),
             kld_reverse_bounds=_bounds_from(d.get("kld_reverse_bounds")))
    g = d.get("groups")
    v["groups"] = g if not g else {name: GroupResult(**{
        **e, "ln_ppl_ratio": PointCI(**e["ln_ppl_ratio"]), "ppl_ratio": PointCI(**e["ppl_ratio"])})
        for name, e in g.items()}
    return v


# ============================================================================ the builder

def check_confidence(confidence, n_bootstrap=None) -> int:
    """confidence in (0, 1); returns the bootstrap replicates to use: ``n_bootstrap``, or for
    None the default, max(1000, 50 / (1 - confidence)) (at least 25 replicates beyond each end
    of the interval: 1000 at 95 %, 5000 at 99 %).

    0 means no bootstrap.  The percentile test's smallest p is 2 / (n_bootstrap + 1) (no
    replicate beyond 0), so fewer than 2 / (1 - confidence) - 1 replicates (39 at 95 %) could
    never show a change at that level, while the interval's end points, interpolated between the
    few extreme replicates, could still exclude 0: a verdict of 'significant' beside a p above
    1 - confidence.  Refused."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    if n_bootstrap is None:
        return max(1000, math.ceil(50 / (1 - confidence) - 1e-9))
    if isinstance(n_bootstrap, (bool, np.bool_)) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0 (0: no bootstrap), got {n_bootstrap!r}")
    need = math.ceil(2 / (1 - confidence) - 1 - 1e-9)
    if 0 < n_bootstrap < need:
        raise ValueError(f"n_bootstrap={int(n_bootstrap)} is too few replicates for a {confidence:.4g} confidence "
                         f"interval: its smallest p would be 2/(n_bootstrap + 1) = {2 / (n_bootstrap + 1):.3g}, "
                         f"above {1 - confidence:.3g}; use at least {need} (None: the default), or 0 for none")
    return int(n_bootstrap)


def conf_label(confidence) -> str:
    """A confidence as a percent label: '95%', '99.8%' (never rounded up to '100%')."""
    return f"{float(confidence) * 100:.10g}%"


def build(m: Moments, *, confidence=0.95, n_bootstrap=None, seed=0, expected=None,
          protocol=None) -> Report:
    """The report of the moments ``m`` (the one place a report is assembled)."""
    n_bootstrap = check_confidence(confidence, n_bootstrap)
    n = m.n
    ref = reference(m.sum_o, m.sum_q, n)  # perplexity_delta's ValueError if PPL(base) is inf
    boot = _bootstrap(m.blocks, n_bootstrap, seed, confidence)
    stats = _paired_stats(n, -m.sum_o, -m.sum_q, m.sum_oo, m.sum_qq, m.sum_oq, boot)
    dp_mean, dp_unc = _unc(n, m.sum_dp, m.sum_dp2)
    rms, rms_unc = _rms(n, m.sum_dp2, m.sum_dp4)
    rep = dict(
        reference=ref, n_tokens=int(n), n_ignored=int(m.n_ignored), confidence=confidence, protocol=protocol,
        **stats, bootstrap=Bootstrap(int(n_bootstrap), int(m.block_size), boot["n_blocks"], seed),
        kld=_distribution(n, m.kld, PCTS_KLD), kld_reverse=_distribution(n, m.kld_reverse, PCTS_KLD),
        delta_p=DeltaP(_x100(dp_mean), _x100(dp_unc),
                       {k: _x100(v) for k, v in m.dp.percentiles(PCTS_DP).items()}, rms, rms_unc),
        same_top1=_rate(n, m.counts["same_top1"]) if "same_top1" in m.counts else None)
    for key in ("top1_in_top5", "top1_in_top10", "q_top1_in_base_top5", "q_top1_in_base_top10"):
        rep[key] = 100 * (m.counts[key] / n) if key in m.counts else None
    if m.groups is not None:
        rep["groups"] = {g.name: _group(g, n_bootstrap, seed, confidence) for g in m.groups}
        rep["suffers_most"] = max(rep["groups"], key=lambda k: rep["groups"][k].reference["relative_delta_pct"])
    rep["expected"] = _expected(expected, rep["ppl_ratio"].value, rep["ppl_ratio"].ci)
    rep["kld_bounds"] = _bounds(n, m.kld_bounds)
    rep["kld_reverse_bounds"] = _bounds(n, m.kld_reverse_bounds)
    rep["kld_definition"] = m.kld_definition or (
        REFERENCE_ESTIMATE if m.kld_bounds or m.kld_reverse_bounds else FULL_VOCABULARY)
    return Report(**rep)


def reference(sum_o: float, sum_q: float, n: int, where: str = "") -> dict:
    """The reference's dict from exactly rounded sums (so a group's dict equals perplexity_delta
    run on that group alone, errors included; ``where`` prefixes the error)."""
    try:
        return _core.reference(sum_o, sum_q, n)
    except ValueError as exc:
        if not where:
            raise
        raise ValueError(f"{where}{exc}") from None


def _x100(v):
    return None if v is None else 100 * v


def _fin(x):
    """x, or None where a standard error or correlation is undefined (inf or NaN)."""
    return x if x is not None and math.isfinite(x) else None


def _unc(n, s1, s2):
    """llama.cpp's mean_and_uncertainty from the count, sum and sum of squares (the uncertainty
    is None when n < 2 or the values are not all finite)."""
    m = s1 / n
    if n < 2 or not (math.isfinite(m) and math.isfinite(s2)):
        return m, None
    return m, math.sqrt(max(s2 / n - m * m, 0.0) / (n - 1))


def _exp(x):
    """math.exp, inf where it overflows (as C's exp)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _exp_ci(ci):
    """The ratio's interval from the ln-ratio's: bounds beyond the float range are inf."""
    return [_exp(c) if c is not None else None for c in ci]


def _paired_stats(n, so, sq, soo, sqq, soq, boot):
    """llama.cpp's paired statistics from the moments of nll_o and nll_q (sums of values,
    squares and products) and a bootstrap result.  An infinite PPL(Q) (a -inf log-prob, or a
    mean beyond exp's range) gives inf values, and None for the errors that are then undefined."""
    mo, uo = _unc(n, so, soo)
    mq, uq = _unc(n, sq, sqq)
    cov = _fin(((soq / n) - mo * mq) / (n - 1)) if (uo is not None and uq is not None) else None
    ppl_o, ppl_q = _exp(mo), _exp(mq)
    ppl_o_unc = _fin(ppl_o * uo) if uo is not None else None
    ppl_q_unc = _fin(ppl_q * uq) if uq is not None else None
    cor = _fin(cov / (uo * uq)) if (cov is not None and uo and uq) else None
    ln_ratio = mq - mo
    ln_ratio_unc = _fin(math.sqrt(max(uq * uq + uo * uo - 2 * cov, 0.0))) if cov is not None else None
    ratio = _exp(ln_ratio)
    diff_unc = None
    if cov is not None and ppl_o_unc is not None and ppl_q_unc is not None:
        diff_unc = _fin(math.sqrt(max(ppl_q_unc * ppl_q_unc + ppl_o_unc * ppl_o_unc - 2 * ppl_o * ppl_q * cov, 0.0)))
    z_p = math.erfc(abs(ln_ratio) / ln_ratio_unc / math.sqrt(2)) if ln_ratio_unc else None
    return dict(
        ppl=Perplexities(Estimate(ppl_o, ppl_o_unc), Estimate(ppl_q, ppl_q_unc)), correlation=cor,
        ln_ppl_ratio=LnRatio(ln_ratio, ln_ratio_unc, boot["ci"], boot["stderr"]),
        ppl_ratio=Ratio(ratio, _fin(ratio * ln_ratio_unc) if ln_ratio_unc is not None else None, _exp_ci(boot["ci"])),
        ppl_diff=Estimate(ppl_q - ppl_o, diff_unc),
        significance=Significance(_significance(boot["ci"]), boot["p_value"], z_p))


def _bootstrap(blocks, n_boot, seed, confidence):
    """Paired block bootstrap of mean(d), d = nll_Q - nll_O per token, from the blocks' sums and
    token counts (the resampling loop is _core.block_bootstrap)."""
    num, den = blocks
    if num.size < 2 or n_boot < 1 or np.isnan(num).any():
        return {"ci": [None, None], "stderr": None, "p_value": None, "n_blocks": int(num.size)}
    if not np.isfinite(num).all():  # +inf: a token the quantized model gives probability 0
        return {"ci": [math.inf, math.inf], "stderr": None, "p_value": 2 / (int(n_boot) + 1),  # no replicate <= 0
                "n_blocks": int(num.size)}
    reps = _core.block_bootstrap(num, den, int(n_boot), int(seed) & (2 ** 64 - 1))
    a = (1 - confidence) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    # two-sided test of mean(d) = 0 dual to the percentile interval above (twice the smaller share
    # of replicates on either side of 0, +1 corrected): the interval excludes 0 exactly where p is
    # below 1 - confidence, up to one replicate, so the verdict (from the interval) and p never
    # disagree on a skewed bootstrap distribution, as a test re-centred on the null can
    k = min(np.count_nonzero(reps <= 0), np.count_nonzero(reps >= 0))
    p = min(1.0, 2 * (k + 1) / (reps.size + 1))
    return {"ci": [float(lo), float(hi)], "stderr": float(np.std(reps, ddof=1)), "p_value": float(p),
            "n_blocks": int(num.size)}


def _significance(ci):
    lo, hi = ci
    if lo is None:
        return "undetermined (too few tokens for a confidence interval)"
    return "significant degradation" if lo > 0 else "significant improvement" if hi < 0 else \
        "no significant change"


def _distribution(n, dm: DistMoments | None, pcts):
    if dm is None:
        return None
    mean, unc = _unc(n, dm.sum, dm.sum_sq)
    return Distribution(mean, unc, dm.values.percentiles(pcts))


def _bounds(n, pair):
    """Bounds on the mean and on each KLD percentile from the per-token lower / upper bounds."""
    if pair is None:
        return None
    lo, hi = (dm.values.percentiles(PCTS_KLD) for dm in pair)
    return Bounds([pair[0].sum / n, pair[1].sum / n], {k: [lo[k], hi[k]] for k, _ in PCTS_KLD})


def _rms(n, s2, s4):
    """RMS Δp and its error (llama.cpp: 0.5 / rms * uncertainty of the mean square), in %."""
    mse, mse_unc = _unc(n, s2, s4)
    rms = math.sqrt(mse)
    return 100 * rms, (100 * 0.5 / rms * mse_unc) if (mse_unc is not None and rms > 0) else None


def _rate(n, hits):
    p = hits / n
    return Rate(100 * p, 100 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None)


def _group(g: GroupMoments, n_bootstrap, seed, confidence) -> GroupResult:
    mean_d = (g.sum_o - g.sum_q) / g.n  # mean of nll_q - nll_o
    boot = _bootstrap(g.blocks, n_bootstrap, seed + g.stream + 1, confidence)
    return GroupResult(
        int(g.n), reference(g.sum_o, g.sum_q, g.n, f"group {g.name!r}: "), PointCI(mean_d, boot["ci"]),
        PointCI(_exp(mean_d), _exp_ci(boot["ci"])), _significance(boot["ci"]),
        None if g.sum_kld is None else g.sum_kld / g.n,
        None if g.n_same_top1 is None else 100 * (g.n_same_top1 / g.n))


def _expected(expected, ratio, ci):
    if expected is None:
        return None
    band = expected_band(expected)
    return Expected(expected, [band.low, band.high], band.open_ended, band.acceptable, ratio, band.verdict(ratio),
                    None if ci[0] is None else
                    "worse than expected" if band.verdict(ci[0]) == "worse than expected" else
                    "better than expected" if band.verdict(ci[1]) == "better than expected" else
                    "consistent with the band")


# ============================================================================ the headline and its wording

_LOSS = dict(zip(_core.QUALITIES, ("negligible loss", "small loss", "clear loss", "large loss")))


def _p_eq(p, n_boot=None):
    """'= 0.0123', '< 0.001' below 0.001, or for a bootstrap p at its floor 2 / (n_boot + 1) (no
    replicate beyond 0: all that n_boot replicates can say) '<= 0.002'."""
    if p is None:
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    if n_boot and p <= 2 / (n_boot + 1) * (1 + 1e-12):
        return f"<= {p:.3g}"
    return f"= {p:.3g}"


def _pct(ratio):
    """A PPL ratio as a signed relative change in percent."""
    x = (ratio - 1) * 100
    return f"{x:+.2f} %" if abs(x) < 1e4 else f"{x:+.3g} %"


def _groups_apart(r: Report):
    """Whether the group that suffers most differs significantly from every other group: its CI of
    the PPL ratio lies entirely above theirs (None without two groups with CIs)."""
    g, worst = r.groups, r.suffers_most
    if not g or worst is None or len(g) < 2:
        return None
    lo = g[worst].ppl_ratio.ci[0]
    his = [v.ppl_ratio.ci[1] for k, v in g.items() if k != worst]
    if lo is None or None in his:
        return None
    return bool(all(lo > h for h in his))


def _suffers_most_line(r: Report):
    worst, apart = r.suffers_most, r.suffers_most_significant
    if apart:
        return f"{worst} (its CI lies above every other group's)"
    why = "CIs overlap" if apart is False else "no CIs"
    return f"no group significantly ({why}; highest point estimate: {worst})"


def _headline(r: Report) -> Verdict:
    """The size of the loss (the reference's quality band, when the bootstrap CI excludes no
    change), and where the CI lies against the format's published band."""
    ratio, ci, q = r.ppl_ratio.value, r.ppl_ratio.ci, r.reference["quality"]
    if ci[0] is None:
        loss, why = f"{q} (no confidence interval)", f"PPL {_pct(ratio)}, too few tokens for a confidence interval"
    else:
        span = f"PPL {_pct(ratio)}, {conf_label(r.confidence)} CI {_pct(ci[0])} to {_pct(ci[1])}, " \
               f"p {_p_eq(r.significance.p_value, r.bootstrap.n_bootstrap)}"
        lnlo, lnhi = r.ln_ppl_ratio.ci  # the significance's own test (exp may round a tiny CI to 1)
        if lnlo > 0:
            loss, why = _LOSS[q], f"{span}: a real loss, '{q}' by the 1/5/10 % thresholds"
        elif lnhi < 0:
            loss, why = "no loss (measurably better)", f"{span}: the quantized model predicts better"
        else:
            loss = "no measurable loss" if q in _core.QUALITIES[:2] else "inconclusive"
            why = f"{span}: the CI includes no change"
    if not r.expected:
        return Verdict(loss, why)
    band = expected_band(r.expected.format)
    lo, hi = (ratio, ratio) if ci[0] is None else ci
    where = ("worse than expected" if lo > band.high else "better than expected" if hi < band.low
             else "as expected")
    why += f"; published for {band.format}: PPL {_pct(band.low)} to {_pct(band.high)}"
    if r.kld and band.kld:
        why += f", mean KLD {_span(band.kld, '{:.4g}')} (here {r.kld.mean:.4g})"
    if r.same_top1 and band.same_top1:
        why += f", same top-1 {_span(band.same_top1, '{:.1f}')} % (here {r.same_top1.pct:.1f} %)"
    return Verdict(f"{loss}, {where}", why)


def _span(rng, fmt):
    lo, hi = (fmt.format(v) for v in rng)
    return lo if lo == hi else f"{lo}-{hi}"
