"""Helpers of the agreement job (.ci/agreement): its settings, the text, running llama.cpp's
tools, parsing their printouts, and the table of tool's number vs ppldelta's number.

Nothing here imports llama_cpp, torch or lm_eval at module level: the parsers are tested on
their own first (test_0_parsers.py), so a change in a tool's output reads as a parsing failure
with the text that did not parse, not as a disagreement."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


# ---------------------------------------------------------------------------- settings
@dataclass
class Config:
    out: Path  # work directory of this run (logs, logits files, lm-eval outputs)
    bin: Path  # llama.cpp tools
    gguf: Path  # the original model (GGUF)
    models: Path  # cache of requantized variants
    table: Path  # where the markdown table goes
    text: Path | None  # PPLDELTA_AGREEMENT_TEXT, or None for the default text
    chunks: int
    threads: int
    variants: list = field(default_factory=list)

    @classmethod
    def from_env(cls) -> "Config":
        env = os.environ
        out = Path(env.get("PPLDELTA_AGREEMENT_DIR", "build-agreement")).resolve()
        need = [k for k in ("PPLDELTA_LLAMA_BIN", "PPLDELTA_AGREEMENT_GGUF") if not env.get(k)]
        if need:
            raise RuntimeError(f"{', '.join(need)} not set: run the job with bash .ci/agreement")
        return cls(
            out=out,
            bin=Path(env["PPLDELTA_LLAMA_BIN"]),
            gguf=Path(env["PPLDELTA_AGREEMENT_GGUF"]),
            models=Path(env.get("PPLDELTA_AGREEMENT_MODELS", str(out / "models"))),
            table=Path(env.get("PPLDELTA_AGREEMENT_TABLE", str(out / "agreement.md"))),
            text=Path(env["PPLDELTA_AGREEMENT_TEXT"]) if env.get("PPLDELTA_AGREEMENT_TEXT") else None,
            chunks=int(env.get("PPLDELTA_AGREEMENT_CHUNKS", "12")),
            threads=int(env.get("PPLDELTA_AGREEMENT_THREADS", "2")),
            variants=env.get("PPLDELTA_AGREEMENT_VARIANTS", "Q8_0 Q4_K_M").split(),
        )


# ---------------------------------------------------------------------------- the text
def default_text() -> str:
    """English prose every CPython carries: the help texts of the language reference
    (``pydoc_data.topics``), sorted by topic and joined with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def text_description(cfg: Config) -> str:
    if cfg.text is None:
        v = sys.version_info
        return f"pydoc_data.topics of CPython {v.major}.{v.minor}.{v.micro} (sorted, blank-line joined)"
    return f"{cfg.text.name} ({cfg.text.stat().st_size} bytes)"


def read_text(cfg: Config) -> str:
    if cfg.text is None:
        return default_text()
    return cfg.text.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- tools
def run(cmd: list, log: Path, *, timeout: float = 1800, env: dict | None = None) -> str:
    """Run a command, its stdout+stderr to ``log``; RuntimeError with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                           env=env)
    text = log.read_text(encoding="utf-8", errors="replace")
    if p.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"{cmd[0]} failed (exit {p.returncode}, log {log}):\n{tail}")
    print(f"agreement: {Path(str(cmd[0])).name} took {time.perf_counter() - t:.1f}s ({log.name})")
    return text


# ---------------------------------------------------------------------------- parsing
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
_FINAL = re.compile(rf"Final estimate: PPL = ({_NUM}) \+/- ({_NUM})")


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class Printed:
    """A number as a tool printed it: its value and how many decimals it was printed with."""

    text: str

    @property
    def value(self) -> float:
        return float(self.text)

    @property
    def decimals(self) -> int:
        t = self.text.lstrip("+-")
        return len(t.split(".", 1)[1]) if "." in t else 0

    def agrees(self, x: float, *, scale: float = 1.0) -> bool:
        """Whether ``x * scale`` prints as this number (ties at the last digit allowed: the two
        sides sum in different orders, so a value exactly on a rounding boundary may go either
        way by 1e-12 relative)."""
        y = x * scale
        half = 0.5 * 10.0 ** -self.decimals
        return abs(y - self.value) <= half * (1 + 1e-9) + 1e-12 * abs(y)


def parse_final_estimate(text: str) -> tuple[Printed, Printed]:
    """``Final estimate: PPL = x +/- y`` of a llama-perplexity run."""
    m = _FINAL.findall(text)
    if len(m) != 1:
        raise ParseError(f"expected one 'Final estimate: PPL = x +/- y' line, found {len(m)}")
    return Printed(m[0][0]), Printed(m[0][1])


_KLD_LINES = [  # (key, regex after the label); ± values are (value, unc)
    ("ppl", r"Mean PPL\(Q\)\s*: N ± N"),
    ("ppl_base", r"Mean PPL\(base\)\s*: N ± N"),
    ("cor", r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\): N%"),
    ("ln_ratio", r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*: N ± N"),
    ("ratio", r"Mean PPL\(Q\)/PPL\(base\)\s*: N ± N"),
    ("diff", r"Mean PPL\(Q\)-PPL\(base\)\s*: N ± N"),
    ("kld", r"Mean\s+KLD: N ± N"),
    ("kld_max", r"Maximum KLD: N"),
    ("kld_99.9", r"99\.9%\s+KLD: N"),
    ("kld_99.0", r"99\.0%\s+KLD: N"),
    ("kld_95.0", r"95\.0%\s+KLD: N"),
    ("kld_90.0", r"90\.0%\s+KLD: N"),
    ("kld_median", r"Median\s+KLD: N"),
    ("kld_10.0", r"10\.0%\s+KLD: N"),
    ("kld_5.0", r" 5\.0%\s+KLD: N"),
    ("kld_1.0", r" 1\.0%\s+KLD: N"),
    ("kld_0.1", r" 0\.1%\s+KLD: N"),
    ("kld_min", r"Minimum KLD: N"),
    ("delta_p", r"Mean\s+Δp: N ± N %"),
    ("dp_max", r"Maximum Δp: N%"),
    ("dp_99.9", r"99\.9%\s+Δp: N%"),
    ("dp_99.0", r"99\.0%\s+Δp: N%"),
    ("dp_95.0", r"95\.0%\s+Δp: N%"),
    ("dp_90.0", r"90\.0%\s+Δp: N%"),
    ("dp_75.0", r"75\.0%\s+Δp: N%"),
    ("dp_median", r"Median\s+Δp: N%"),
    ("dp_25.0", r"25\.0%\s+Δp: N%"),
    ("dp_10.0", r"10\.0%\s+Δp: N%"),
    ("dp_5.0", r" 5\.0%\s+Δp: N%"),
    ("dp_1.0", r" 1\.0%\s+Δp: N%"),
    ("dp_0.1", r" 0\.1%\s+Δp: N%"),
    ("dp_min", r"Minimum Δp: N%"),
    ("rms_delta_p", r"RMS Δp\s*: N ± N %"),
    ("same_top", r"Same top p: N ± N %"),
]


def parse_kld_block(text: str) -> dict:
    """The final statistics block of ``llama-perplexity --kl-divergence``:
    ``{key: Printed or (Printed, Printed)}`` (keys as in _KLD_LINES; percent values as printed,
    i.e. in percent).  ParseError naming the first line that is missing."""
    start = text.rfind("====== Perplexity statistics ======")
    if start < 0:
        raise ParseError("no '====== Perplexity statistics ======' block (fewer than 100 scored tokens?)")
    block = text[start:]
    out = {}
    for key, pattern in _KLD_LINES:
        m = re.search("^" + pattern.replace("N", rf"\s*({_NUM})") + r"\s*$", block, flags=re.M)
        if m is None:
            raise ParseError(f"line {key!r} ({pattern}) not found in the KLD block:\n{block[:3000]}")
        vals = [Printed(g) for g in m.groups()]
        out[key] = vals[0] if len(vals) == 1 else tuple(vals)
    return out


def parse_token_ids(text: str) -> list:
    """The ``[1, 2, 3]`` list printed by ``llama-tokenize --ids``."""
    m = re.findall(r"^\[[\d, ]*\]$", text, flags=re.M)
    if len(m) != 1:
        raise ParseError(f"expected one '[id, id, ...]' line from llama-tokenize --ids, found {len(m)}")
    body = m[0][1:-1].strip()
    return [int(t) for t in body.split(",")] if body else []


def stats_as_printed(stats: dict) -> dict:
    """ppldelta.llamacpp.kld_statistics' values under parse_kld_block's keys, in the units
    llama.cpp prints (percent where it prints percent)."""
    kp, pp = stats["kld_percentiles"], stats["delta_p_percentiles"]
    out = {k: stats[k] for k in ("ppl", "ppl_base", "ln_ratio", "ratio", "diff", "kld")}
    out["cor"] = 100 * stats["cor"]
    for k in ("delta_p", "rms_delta_p", "same_top"):
        out[k] = (100 * stats[k][0], 100 * stats[k][1])
    for name, f in [("max", "max"), ("median", "median"), ("min", "min")] + [
            (f"{100 * f:.1f}", f) for f in (0.999, 0.99, 0.95, 0.9, 0.1, 0.05, 0.01, 0.001)]:
        out[f"kld_{name}"] = kp[f]
    for name, f in [("max", "max"), ("median", "median"), ("min", "min")] + [
            (f"{100 * f:.1f}", f) for f in (0.999, 0.99, 0.95, 0.9, 0.75, 0.25, 0.1, 0.05, 0.01, 0.001)]:
        out[f"dp_{name}"] = 100 * pp[f]
    return out


# ---------------------------------------------------------------------------- the table
def agreeing_digits(tool: float, ours: float) -> str:
    """Significant digits in which two numbers agree (``all`` when equal)."""
    if tool == ours:
        return "all"
    if not (math.isfinite(tool) and math.isfinite(ours)) or tool == 0:
        return "0"
    rel = abs(tool - ours) / abs(tool)
    return str(max(0, int(math.floor(-math.log10(rel)))))


@dataclass
class Row:
    tool: str
    protocol: str
    quantity: str
    tools: str  # the tool's number as it printed it (or full precision)
    ours: str
    agree: str
    check: str  # what is asserted


class Table:
    def __init__(self):
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(self, tool, protocol, quantity, tools_number, ours, check, *, digits=None):
        if isinstance(tools_number, Printed):
            t_text, t_val = tools_number.text, tools_number.value
            o_text = f"{ours:.{tools_number.decimals + 3}f}"
            if digits is None and tools_number.agrees(ours):
                n_sig = len(t_text.lstrip("+-").replace(".", "").lstrip("0")) or 1
                digits = f"all {n_sig} printed"
        else:
            t_val = float(tools_number)
            t_text, o_text = f"{t_val:.12g}", f"{float(ours):.12g}"
        agree = digits if digits is not None else agreeing_digits(t_val, float(ours))
        self.rows.append(Row(tool, protocol, quantity, t_text, o_text, agree, check))

    def markdown(self, header: str = "") -> str:
        lines = [header] if header else []
        lines += ["| tool | protocol | quantity | tool's number | ppldelta's number | digits that agree | asserted |",
                  "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.tool} | {r.protocol} | {r.quantity} | {r.tools} | {r.ours} | {r.agree} | {r.check} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"
