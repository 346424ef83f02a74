"""llamacpp.kld_statistics / format_kld_statistics / prompt_bytes against oracles written here:
a line-by-line Python transcription of llama.cpp's perplexity.cpp (kl_divergence, log_softmax
with a base row, the percentile lambda) and of common_params_parse's ``-f`` handling.  The real
tool is compared in tests/agreement (PPLDELTA_AGREEMENT=1, .ci/agreement)."""
import math

import numpy as np
import pytest

from ppldelta import llamacpp

f32 = np.float32


def _oracle(base_path, quant_chunks):
    """perplexity.cpp's kl_divergence, one scalar at a time (float32 where the C++ is float)."""
    lf = llamacpp.read_logits_file(base_path)
    n_vocab, first, rows = lf.n_vocab, lf.first_scored, lf.rows_per_chunk
    acc = dict.fromkeys(["nll", "nll2", "b", "b2", "nb", "k", "k2", "pd", "pd2", "pd4"], 0.0)
    same = count = 0
    kld_values, p_diff_values = [], []
    for c, logits in enumerate(quant_chunks):
        for r in range(rows):
            x = [f32(v) for v in logits[r]]
            tok = int(lf.tokens[c, first + r + 1])
            stored = lf._rows[c, r]
            scale, min_lp = np.frombuffer(stored[:4].tobytes(), dtype=f32)
            imax, mx = 0, x[0]
            for i in range(1, n_vocab):
                if x[i] > mx:
                    mx, imax = x[i], i
            s = 0.0
            for i in range(n_vocab):
                s += float(f32(math.exp(float(f32(x[i] - mx)))))
            lse = f32(math.log(s))
            nll = f32(f32(mx + lse) - x[tok])
            nb = f32(-f32(f32(scale * f32(stored[4 + tok])) + min_lp))
            acc["nll"] += float(nll); acc["nll2"] += float(f32(nll * nll))
            acc["b"] += float(nb); acc["b2"] += float(f32(nb * nb)); acc["nb"] += float(f32(nll * nb))
            mxl = f32(mx + lse)
            k, imax_b, pmax = 0.0, -1, f32(0)
            for i in range(n_vocab):
                lpb = f32(f32(scale * f32(stored[4 + i])) + min_lp)
                if i == 0 or lpb > pmax:
                    pmax, imax_b = lpb, i
                if lpb > f32(-16):
                    pb = f32(math.exp(float(lpb)))
                    k += float(f32(pb * f32(f32(lpb - x[i]) + mxl)))
            acc["k"] += k; acc["k2"] += k * k
            count += 1
            same += imax == imax_b
            pd = f32(f32(math.exp(-float(nll))) - f32(math.exp(-float(nb))))
            pd2 = float(f32(pd * pd))
            acc["pd"] += float(pd); acc["pd2"] += pd2; acc["pd4"] += pd2 * pd2
            kld_values.append(f32(k)); p_diff_values.append(pd)
    lf.close()

    def mu(s, s2):
        f = s / count
        d = s2 / count - f * f
        return f, (math.sqrt(d / (count - 1)) if d > 0 and count > 10 else 0.0)

    def pct(v, fr):
        p = f32(f32(fr) * f32(len(v) - 1))
        ip = int(p)
        p = f32(p - f32(ip))
        return float(f32(f32(f32(1) - p) * v[ip]) + f32(p * v[min(ip + 1, len(v) - 1)]))

    def med(v):
        n = len(v)
        return float(f32(f32(0.5) * f32(v[n // 2] + v[n // 2 - 1]))) if n % 2 == 0 else float(v[n // 2])

    kv, pv = sorted(kld_values), sorted(p_diff_values)
    lp, lpu = mu(acc["nll"], acc["nll2"])
    lb, lbu = mu(acc["b"], acc["b2"])
    cov = (acc["nb"] / count - (acc["nll"] / count) * (acc["b"] / count)) / (count - 1)
    ppl, pb = math.exp(lp), math.exp(lb)
    lr_unc = math.sqrt(lpu ** 2 + lbu ** 2 - 2 * cov)
    mse, mse_u = mu(acc["pd2"], acc["pd4"])
    top = same / count
    return {
        "ppl": (ppl, ppl * lpu), "ppl_base": (pb, pb * lbu), "cor": cov / (lpu * lbu),
        "ln_ratio": (lp - lb, lr_unc), "ratio": (math.exp(lp - lb), math.exp(lp - lb) * lr_unc),
        "diff": (ppl - pb, math.sqrt((ppl * lpu) ** 2 + (pb * lbu) ** 2 - 2 * ppl * pb * cov)),
        "kld": mu(acc["k"], acc["k2"]), "delta_p": mu(acc["pd"], acc["pd2"]),
        "rms_delta_p": (math.sqrt(mse), 0.5 / math.sqrt(mse) * mse_u),
        "same_top": (top, math.sqrt(top * (1 - top) / (count - 1))),
        "kld_percentiles": {"max": float(kv[-1]), "min": float(kv[0]), "median": med(kv),
                            **{f: pct(kv, f) for f in llamacpp.KLD_PERCENTILES}},
        "delta_p_percentiles": {"max": float(pv[-1]), "min": float(pv[0]), "median": med(pv),
                                **{f: pct(pv, f) for f in llamacpp.DELTA_P_PERCENTILES}},
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    rng = np.random.default_rng(12)
    n_ctx, n_vocab, n_chunk = 32, 37, 5  # odd vocabulary: a pad slot per row
    tokens = rng.integers(0, n_vocab, n_ctx * n_chunk)
    base = (rng.normal(0, 4, (n_chunk, n_ctx, n_vocab))).astype(np.float32)
    base[:, :, 3] -= 40  # entries far below the -16 cutoff (skipped) in every row
    quant = (base + rng.normal(0, 0.3, base.shape)).astype(np.float32)
    path = tmp_path_factory.mktemp("kld") / "base.kld"
    llamacpp.write_logits_file(path, tokens, base, n_ctx)
    return path, quant, n_ctx


def _close(a, b):
    return a == pytest.approx(b, rel=2e-6, abs=1e-9)


def test_kld_statistics_match_the_transcribed_cpp(pair):
    path, quant, n_ctx = pair
    first = n_ctx // 2
    got = llamacpp.kld_statistics(path, [q[first:n_ctx - 1] for q in quant])
    want = _oracle(path, [q[first:n_ctx - 1] for q in quant])
    assert got["definition"] == "llama.cpp" and got["n"] == 5 * 15
    for key in ("ppl", "ppl_base", "ln_ratio", "ratio", "diff", "kld", "delta_p", "rms_delta_p", "same_top"):
        assert _close(got[key][0], want[key][0]) and _close(got[key][1], want[key][1]), key
    assert _close(got["cor"], want["cor"])
    for key in ("kld_percentiles", "delta_p_percentiles"):
        assert set(got[key]) == set(want[key])
        for f in want[key]:
            assert _close(got[key][f], want[key][f]), (key, f)
    # whole chunks (n_ctx rows) and a 3-D array are accepted too, with the same result
    again = llamacpp.kld_statistics(llamacpp.read_logits_file(path), quant)
    assert format_eq(again, got)


def format_eq(a, b):
    return llamacpp.format_kld_statistics(a) == llamacpp.format_kld_statistics(b)


def test_cutoff_and_float_fractions_matter(pair):
    path, quant, n_ctx = pair
    first = n_ctx // 2
    got = llamacpp.kld_statistics(path, [q[first:n_ctx - 1] for q in quant])
    # the full-vocabulary KL of the same decoded base rows and exact quant logits is larger
    lf = llamacpp.read_logits_file(path)
    full = []
    for c in range(lf.n_chunk):
        lb = lf.chunk_log_probs(c).astype(np.float64)
        x = quant[c, first:n_ctx - 1].astype(np.float64)
        lq = x - x.max(1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        full.append((np.exp(lb) * (lb - lq)).sum(1))
    assert np.mean(np.concatenate(full)) != pytest.approx(got["kld"][0], rel=1e-9)
    # percentile positions come from float32 fractions: 0.999f * (n - 1)
    v = np.sort(np.random.default_rng(1).random(4079).astype(np.float32))
    p = float(np.float32(0.999) * np.float32(4078))
    ip = int(p)
    assert llamacpp._percentile_f32(v, 0.999) == pytest.approx(
        (1 - (p - ip)) * float(v[ip]) + (p - ip) * float(v[ip + 1]), rel=1e-6)


def test_format_is_llama_cpp_printout(pair):
    path, quant, n_ctx = pair
    text = llamacpp.format_kld_statistics(llamacpp.kld_statistics(path, quant))
    lines = text.splitlines()
    assert lines[0] == "====== Perplexity statistics ======"
    assert lines[1].startswith("Mean PPL(Q)                   : ") and " ± " in lines[1]
    assert "99.9%   KLD: " in text and " 0.1%   KLD: " in text and "75.0%   Δp: " in text
    assert lines[-1].startswith("Same top p: ") and lines[-1].endswith(" %")
    assert len(lines) == 39


def test_kld_statistics_checks(pair):
    path, quant, n_ctx = pair
    with pytest.raises(ValueError, match="chunks"):
        llamacpp.kld_statistics(path, quant[:3])
    with pytest.raises(ValueError, match="shape"):
        llamacpp.kld_statistics(path, quant[:, :, :5])


@pytest.mark.parametrize("data, want", [
    (b"plain text\n", b"plain text"),
    (b"two newlines\n\n", b"two newlines\n"),
    (b"no newline", b"no newline"),
    (b"a\\nb\\tc\\\\d\\'e\\\"f\n", b"a\nb\tc\\d'e\"f"),
    (b"\\x41\\x4a\\x-1\\x 7\\xzz\\x4", b"AJ\xff\x07\\xzz\\x4"),
    (b"\\q stays, trailing \\", b"\\q stays, trailing \\"),
])
def test_prompt_bytes(data, want):
    assert llamacpp.prompt_bytes(data) == want
    assert llamacpp.prompt_bytes(data, escape=False) == (data[:-1] if data.endswith(b"\n") else data)
