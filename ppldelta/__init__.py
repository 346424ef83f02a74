"""ppldelta: how much quality did quantization cost?

Exact, memory-bandwidth perplexity deltas (C core), with the analytics around them.

>>> import ppldelta
>>> ppldelta.perplexity_delta([-2.1, -2.3, -1.9], [-2.2, -2.4, -2.0])["quality"]
'poor'
"""
from ._core import POSITIVE_TOLERANCE, perplexity, perplexity_delta, simd, supported_simd

__version__ = "0.1.0"

__all__ = [
    "POSITIVE_TOLERANCE",
    "perplexity",
    "perplexity_delta",
    "simd",
    "supported_simd",
]
