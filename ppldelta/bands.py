"""Expected quality per quantization format, from public measurements, and verdicts.

Each band is the range of the published results for one format (PPL(Q)/PPL(original), and
where published the mean KL divergence and the same-top-1 rate), across the models the source
measured; ``source`` names where every number comes from.  A band is a yardstick measured on
other (larger) models: a small model, another text or another quantizer lands elsewhere.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ._core import quality

_LLAMACPP = ("llama.cpp tools/perplexity/README.md (github.com/ggml-org/llama.cpp; WikiText-2 test, "
             "n_ctx 512, no imatrix): ")
_TORCHAO = ("torchao torchao/quantization/README.md, Benchmarks (github.com/pytorch/ao; lm-eval wikitext "
            "word perplexity, bf16 base): ")
_HQQ = ("HQQ blog, Badri & Shaji 2023, Table 1 (mobiusml.github.io/hqq_blog; WikiText-2 perplexity, "
        "FP16 base): ")


@dataclass(frozen=True)
class Band:
    format: str
    bits: int
    low: float                     # PPL(Q)/PPL(original): lowest published ratio
    high: float                    # highest published ratio
    open_ended: bool = False       # kept for old callers; no published band is open-ended
    acceptable: str = ""           # the reference's quality word for the band's high end
    kld: tuple | None = None       # published mean KLD range, nats (None: not published)
    same_top1: tuple | None = None  # published same-top-1 range, % (None: not published)
    source: str = ""

    def verdict(self, ratio: float) -> str:
        """'better than expected', 'within expected band' or 'worse than expected'."""
        return _where(ratio, (self.low, self.high))

    def to_dict(self):
        return asdict(self)


def _where(x, rng, higher_is_worse=True):
    lo, hi = rng
    if x < lo:
        return "better than expected" if higher_is_worse else "worse than expected"
    if x > hi:
        return "worse than expected" if higher_is_worse else "better than expected"
    return "within expected band"


def _band(fmt, bits, low, high, source, kld=None, same_top1=None):
    # acceptable: the reference's quality word (its 1 / 5 / 10 % thresholds) of the band's high end
    return Band(fmt, bits, low, high, False, quality((high - 1) * 100), kld, same_top1, source)


# ratios are rounded to 4 decimals from the published perplexities (llama.cpp's LLaMA 3 8B
# scoreboard: PPL / (PPL - ΔPPL); its Llama 2 70B scoreboard: 1 + "Delta to fp16")
_TABLE = {
    "fp16": _band("FP16/BF16", 16, 1.0, 1.0004, "1 by definition; " + _LLAMACPP
                  + "LLaMA 3 8B BF16 vs FP16: ratio 1.000404, KLD 0.000025, same top 99.739 %",
                  (0.0, 0.000025), (99.739, 100.0)),
    "gguf-q8_0": _band("GGUF Q8_0", 8, 1.0004, 1.0007, _LLAMACPP + "LLaMA 3 8B 1.000425 (KLD 0.001355, same "
                       "top 97.674 %), Llama 2 7B 1.000689 (KLD 0.000369, same top 98.846 %)",
                       (0.000369, 0.001355), (97.674, 98.846)),
    "int8-weight-only": _band("int8 weight-only", 8, 0.9993, 1.0027, _TORCHAO + "int8wo: Llama-2-7B 12.204 vs "
                              "12.212, Llama-3-8B 7.447 vs 7.441, Llama-3.1-8B 7.56 vs 7.54"),
    "gptq-8": _band("GPTQ", 8, 1.0, 1.0019, _HQQ + "GPTQ_g128 8-bit: Llama-2-7B 5.19 vs 5.18, "
                    "Llama-2-13B 4.63 vs 4.63"),
    "bnb-int8": _band("bitsandbytes LLM.int8()", 8, 1.0077, 1.0086, _HQQ + "BNB 8-bit: Llama-2-7B 5.22 vs "
                      "5.18, Llama-2-13B 4.67 vs 4.63"),
    "fp8": _band("FP8", 8, 1.0080, 1.0106, _TORCHAO + "Llama-3.1-8B, base 7.54: float8wo 7.60, float8dq "
                 "per-row 7.61, per-tensor 7.62"),
    "int8-dynamic": _band("int8 dynamic (W8A8)", 8, 1.0041, 1.0188, _TORCHAO + "int8dq: Llama-2-7B 12.262 vs "
                          "12.212, Llama-3-8B 7.581 vs 7.441"),
    "gguf-q6_k": _band("GGUF Q6_K", 6, 1.0016, 1.0035, _LLAMACPP + "Llama 2 70B 1.0016, Llama 2 7B 1.002406 "
                       "(KLD 0.002098, same top 97.520 %), LLaMA 3 8B 1.003490 (KLD 0.005452, same top "
                       "96.031 %)", (0.002098, 0.005452), (96.031, 97.520)),
    "gguf-q5_k_m": _band("GGUF Q5_K_M", 5, 1.0040, 1.0091, _LLAMACPP + "Llama 2 70B 1.0040, LLaMA 3 8B "
                         "6.288607 / 6.231633 = 1.0091 (KLD 0.010762)", (0.010762, 0.010762)),
    "awq-4": _band("AWQ", 4, 1.0151, 1.0193, _HQQ + "AWQ_g64 4-bit: Llama-2-7B 5.28 vs 5.18, "
                   "Llama-2-13B 4.70 vs 4.63"),
    "gguf-q4_k_m": _band("GGUF Q4_K_M", 4, 1.0120, 1.0282, _LLAMACPP + "Llama 2 70B 1.0120, Llama 2 7B "
                         "1.014242 (KLD 0.012686, same top 94.665 %), LLaMA 3 8B 1.028160 (KLD 0.031273, "
                         "same top 91.901 %)", (0.012686, 0.031273), (91.901, 94.665)),
    "nf4": _band("bitsandbytes NF4", 4, 1.0346, 1.0483, _HQQ + "BNB_g64 4-bit (bitsandbytes 4-bit, blocks "
                 "of 64): Llama-2-7B 5.43 vs 5.18, Llama-2-13B 4.79 vs 4.63"),
    "gptq-4": _band("GPTQ", 4, 1.0216, 1.0645, _HQQ + "GPTQ_g64 4-bit: Llama-2-7B 5.38 vs 5.18, Llama-2-13B "
                    "4.73 vs 4.63; " + _TORCHAO + "int4wo-64-GPTQ: Llama-2-7B 12.527 vs 12.212, "
                    "Llama-3-8B 7.921 vs 7.441"),
    "gguf-q4_0": _band("GGUF Q4_0", 4, 1.0361, 1.0752, _LLAMACPP + "Llama 2 70B 1.0361, LLaMA 3 8B "
                       "6.700147 / 6.231633 = 1.0752 (KLD 0.071940)", (0.071940, 0.071940)),
    "int4-weight-only": _band("int4 weight-only (RTN, groups of 64)", 4, 1.0517, 1.1194, _TORCHAO
                              + "int4wo-64: Llama-2-7B 12.843 vs 12.212, Llama-3-8B 8.316 vs 7.441, "
                              "Llama-3.1-8B 8.44 vs 7.54"),
    "gguf-q3_k_m": _band("GGUF Q3_K_M", 3, 1.0472, 1.1054, _LLAMACPP + "Llama 2 70B 1.0472, LLaMA 3 8B "
                         "6.888498 / 6.231634 = 1.1054 (KLD 0.101913)", (0.101913, 0.101913)),
    "gguf-q2_k": _band("GGUF Q2_K", 2, 1.0882, 1.5648, _LLAMACPP + "Llama 2 70B 1.0882, Llama 2 7B 1.107955 "
                       "(KLD 0.108903, same top 85.584 %), LLaMA 3 8B 1.564849 (KLD 0.445132, same top "
                       "71.138 %)", (0.108903, 0.445132), (71.138, 85.584)),
}
_ALIASES = {
    "bf16": "fp16", "f16": "fp16", "baseline": "fp16",
    "gptq8": "gptq-8", "gptq-8bit": "gptq-8", "gptq-int8": "gptq-8",
    "q8": "gguf-q8_0", "q8_0": "gguf-q8_0", "gguf-q8": "gguf-q8_0", "gguf-8": "gguf-q8_0",
    "gptq4": "gptq-4", "gptq-4bit": "gptq-4", "gptq-int4": "gptq-4",
    "awq": "awq-4", "awq4": "awq-4", "awq-4bit": "awq-4",
    "q4_k_m": "gguf-q4_k_m", "gguf-q4": "gguf-q4_k_m",
    "q3_k_m": "gguf-q3_k_m", "gguf-q3": "gguf-q3_k_m",
    "q2_k": "gguf-q2_k", "gguf-q2": "gguf-q2_k",
    "q4_0": "gguf-q4_0", "q5_k_m": "gguf-q5_k_m", "q6_k": "gguf-q6_k",
    "nf4": "nf4", "bnb-nf4": "nf4", "bnb-4bit": "nf4", "bitsandbytes-nf4": "nf4", "bitsandbytes-4bit": "nf4",
    "bnb-8bit": "bnb-int8", "llm.int8": "bnb-int8", "llm.int8()": "bnb-int8", "bitsandbytes-int8": "bnb-int8",
    "float8": "fp8", "fp8-e4m3": "fp8", "float8wo": "fp8", "float8dq": "fp8", "w8a8-fp8": "fp8",
    "int8wo": "int8-weight-only", "int8-wo": "int8-weight-only", "w8a16": "int8-weight-only",
    "int8": "int8-weight-only",
    "int8dq": "int8-dynamic", "w8a8": "int8-dynamic", "int8-w8a8": "int8-dynamic",
    "int4wo": "int4-weight-only", "int4-wo": "int4-weight-only", "w4a16-rtn": "int4-weight-only",
    "rtn4": "int4-weight-only",
}


#: llama.cpp's file types (``general.file_type``, llama.h's LLAMA_FTYPE_*) that have a band here
_GGUF_FILE_TYPES = {1: "fp16", 32: "fp16", 7: "gguf-q8_0", 18: "gguf-q6_k", 17: "gguf-q5_k_m",
                    15: "gguf-q4_k_m", 2: "gguf-q4_0", 12: "gguf-q3_k_m", 10: "gguf-q2_k"}


def gguf_format(file_type) -> str | None:
    """The format name of a GGUF file's type (its ``general.file_type``: 7 is Q8_0, 15 Q4_K_M, ...),
    or None for a type without a published band (Q4_1, Q5_0, the K_S / K_L mixes, IQ types, F32)."""
    if isinstance(file_type, str) and file_type.strip().isdigit():  # metadata values are strings
        file_type = int(file_type)
    if not isinstance(file_type, int) or isinstance(file_type, bool):
        return None
    return _GGUF_FILE_TYPES.get(file_type)


def formats() -> list[str]:
    """Canonical format names accepted by expected_band (in order of increasing typical loss)."""
    return list(_TABLE)


def expected_band(fmt: str) -> Band:
    """The published band for a format name such as 'gptq-4', 'AWQ', 'gguf-q4_k_m', 'Q6_K',
    'nf4', 'fp8', 'int8-weight-only' (case, spaces and underscores/hyphens are forgiven)."""
    key = re.sub(r"[\s]+", "-", str(fmt).strip().lower())
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", "_"), _ALIASES.get(key.replace("_", "-"), key)))
    if key not in _TABLE:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(_TABLE)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return _TABLE[key]
