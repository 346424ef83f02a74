"""Expected relative perplexity per quantization format (seed 001's table) and verdicts."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Band:
    format: str
    bits: int
    low: float           # expected PPL(Q)/PPL(FP16), lower end
    high: float          # upper end of the table's range
    open_ended: bool     # "1.15-1.30+": somewhat above `high` is still typical
    acceptable: str      # seed 001's "Acceptable?" column

    # Decision: "1.30+" reads as "1.30 and a little more", not "anything": up to 1.5 counts as
    # within the band, so a broken 2-bit model (ratio 40) is still reported as worse.
    OPEN_END = 1.5

    def verdict(self, ratio: float) -> str:
        """'better than expected', 'within expected band' or 'worse than expected'."""
        if ratio < self.low:
            return "better than expected"
        if ratio <= (self.OPEN_END if self.open_ended else self.high):
            return "within expected band"
        return "worse than expected"

    def to_dict(self):
        return asdict(self)


_TABLE = {
    "fp16": Band("FP16", 16, 1.00, 1.00, False, "Yes"),
    "gptq-8": Band("GPTQ", 8, 1.02, 1.05, False, "Yes"),
    "gguf-q8_0": Band("GGUF Q8", 8, 1.03, 1.06, False, "Yes"),
    "gptq-4": Band("GPTQ", 4, 1.05, 1.10, False, "Usually"),
    "awq-4": Band("AWQ", 4, 1.04, 1.08, False, "Usually"),
    "gguf-q4_k_m": Band("GGUF Q4_K_M", 4, 1.05, 1.12, False, "Usually"),
    "gguf-q3_k_m": Band("GGUF Q3_K_M", 3, 1.10, 1.20, False, "Marginal"),
    "gguf-q2_k": Band("GGUF Q2_K", 2, 1.15, 1.30, True, "Problematic"),
}
_ALIASES = {
    "bf16": "fp16", "f16": "fp16", "fp16": "fp16", "baseline": "fp16",
    "gptq8": "gptq-8", "gptq-8bit": "gptq-8", "gptq-int8": "gptq-8",
    "q8": "gguf-q8_0", "q8_0": "gguf-q8_0", "gguf-q8": "gguf-q8_0", "gguf-8": "gguf-q8_0",
    "gptq4": "gptq-4", "gptq-4bit": "gptq-4", "gptq-int4": "gptq-4",
    "awq": "awq-4", "awq4": "awq-4", "awq-4bit": "awq-4",
    "q4_k_m": "gguf-q4_k_m", "gguf-q4": "gguf-q4_k_m",
    "q3_k_m": "gguf-q3_k_m", "gguf-q3": "gguf-q3_k_m",
    "q2_k": "gguf-q2_k", "gguf-q2": "gguf-q2_k",
}


def formats() -> list[str]:
    """Canonical format names accepted by expected_band."""
    return list(_TABLE)


def expected_band(fmt: str) -> Band:
    """The expected PPL(Q)/PPL(FP16) band for a format name such as 'gptq-4', 'AWQ',
    'gguf-q4_k_m', 'Q2_K' (case, spaces and underscores/hyphens are forgiven)."""
    key = re.sub(r"[\s]+", "-", str(fmt).strip().lower())
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", "_"), key))
    if key not in _TABLE:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(_TABLE)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return _TABLE[key]
