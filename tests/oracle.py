"""Pure-Python oracles the C core is tested against (written here, independent of the package)."""
import math


def reference_delta(original, quantized):
    """shared/seeds/000: the reference, verbatim in its formulas and order."""
    n = len(original)
    assert n == len(quantized) and n > 0
    avg_orig = sum(original) / n
    avg_quant = sum(quantized) / n
    ppl_orig = math.exp(-avg_orig)
    ppl_quant = math.exp(-avg_quant)
    absolute_delta = ppl_quant - ppl_orig
    relative_delta_pct = (absolute_delta / ppl_orig) * 100 if ppl_orig > 0 else 0.0
    if relative_delta_pct < 1.0:
        quality = "excellent"
    elif relative_delta_pct < 5.0:
        quality = "good"
    elif relative_delta_pct < 10.0:
        quality = "acceptable"
    else:
        quality = "poor"
    return {
        "original_perplexity": round(ppl_orig, 4),
        "quantized_perplexity": round(ppl_quant, 4),
        "absolute_delta": round(absolute_delta, 4),
        "relative_delta_pct": round(relative_delta_pct, 4),
        "quality": quality,
    }


def fsum_delta(original, quantized):
    """The reference's formulas on an exactly rounded sum (math.fsum): the contract."""
    original = [float(v) for v in original]
    quantized = [float(v) for v in quantized]
    n = len(original)
    ppl_orig = math.exp(-(math.fsum(original) / n))
    ppl_quant = math.exp(-(math.fsum(quantized) / n))
    absolute_delta = ppl_quant - ppl_orig
    relative = (absolute_delta / ppl_orig) * 100
    quality = ("excellent" if relative < 1.0 else "good" if relative < 5.0
               else "acceptable" if relative < 10.0 else "poor")
    return {
        "original_perplexity": round(ppl_orig, 4),
        "quantized_perplexity": round(ppl_quant, 4),
        "absolute_delta": round(absolute_delta, 4),
        "relative_delta_pct": round(relative, 4),
        "quality": quality,
    }


def fsum_perplexity(values):
    values = [float(v) for v in values]
    return math.exp(-(math.fsum(values) / len(values)))
