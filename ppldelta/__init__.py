"""ppldelta: how much quality did quantization cost?

Exact, memory-bandwidth perplexity deltas (C core) with the analytics around them: KL divergence
and top-token agreement from logits, confidence intervals, per-domain breakdowns, flips.

>>> import ppldelta
>>> ppldelta.perplexity_delta([-2.1, -2.3, -1.9], [-2.2, -2.4, -2.0])["quality"]
'poor'
"""
from ._core import POSITIVE_TOLERANCE, perplexity, perplexity_delta, simd, supported_simd
from . import distributed, hf, llamacpp, lmeval, plot, protocols
from .accumulate import Accumulator
from .analysis import analyze
from .report import Report
from .bands import Band, expected_band
from .flips import FlipReport, choice_flips, paired_outcomes, pass_at_k
from .logits import kl_divergence, token_log_probs

__version__ = "0.1.0"

__all__ = [
    # submodules
    "distributed",
    "hf",
    "llamacpp",
    "lmeval",
    "plot",
    "protocols",
    # functions and types
    "Accumulator",
    "POSITIVE_TOLERANCE",
    "Band",
    "FlipReport",
    "Report",
    "analyze",
    "choice_flips",
    "expected_band",
    "kl_divergence",
    "paired_outcomes",
    "pass_at_k",
    "perplexity",
    "perplexity_delta",
    "simd",
    "supported_simd",
    "token_log_probs",
]
