"""Pure-Python oracles the C core is tested against (written here, independent of the package)."""
import math


def reference_delta(original, quantized):
    """The reference perplexity-delta formula, verbatim in its formulas and order."""
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


def logits_oracle(a, b, targets):
    """The logits kernels' contract in NumPy float64, rows of (rows, vocab): log-softmax at the
    target, KL(P||Q) and KL(Q||P) (+inf where a token has P_j > 0 = Q_j, that is a finite logit
    against -inf, however small P_j is; clamped at 0), same top-1 (first argmax), and whether
    one model's top-1 is among the other's top-5 / top-10 (ranks by strictly greater logits)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)

    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))

    def kl(x, y, lx, ly):
        p = np.exp(lx)
        with np.errstate(all="ignore"):
            terms = np.where(p > 0, p * (lx - ly), 0.0)
        inf = ((x > -np.inf) & (y == -np.inf)).any(-1)
        return np.where(inf, np.inf, np.maximum(terms.sum(-1), 0.0))

    la, lb = log_softmax(a), log_softmax(b)
    rows = np.arange(a.shape[0])
    ia, ib = a.argmax(-1), b.argmax(-1)
    rank_b = (b > b[rows, ia][:, None]).sum(-1)
    rank_a = (a > a[rows, ib][:, None]).sum(-1)
    t = np.asarray(targets)
    return {"lp_a": la[rows, t], "lp_b": lb[rows, t], "kld": kl(a, b, la, lb), "kld_rev": kl(b, a, lb, la),
            "same": ia == ib, "top5": rank_b < 5, "top10": rank_b < 10, "rtop5": rank_a < 5,
            "rtop10": rank_a < 10}


def lane_errors_that_cancel(block):
    """Values whose TwoSum errors in one SIMD lane (+ulp/4, -2^-200, -ulp/4) sum to 0 in floating
    point while the exact sum needs the hidden -2^-200 to round: (values, math.fsum of them)."""
    import math

    import numpy as np

    B = 2.0 ** 40
    ulp = math.ulp(B)
    x = np.zeros(2 * block)
    x[0:128:32] = [-B, -0.75 * ulp, -2.0 ** -200, -0.25 * ulp]
    x[block] = -1.5 * ulp
    want = -(B + 3 * ulp)
    assert math.fsum(x.tolist()) == want
    return x, want
