"""The first run (`ppldelta demo`): a realistic variant in full, a table that fits a terminal,
what the data is and how to run it on your own model, one headline verdict, honest wording for
groups and p-values, unrounded numbers, flips in every format, and the published bands."""
import html
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ppldelta
from ppldelta.bands import expected_band, formats
from ppldelta.cli import main
from ppldelta.demo import load_demo


@pytest.fixture(scope="module")
def data():
    return load_demo()


def _run(capsys, *args):
    assert main(["demo", *args]) == 0
    return capsys.readouterr().out


def test_text_fits_100_columns_and_features_a_realistic_variant(capsys, data):
    out = _run(capsys)
    too_wide = [ln for ln in out.splitlines() if len(ln) > 100]
    assert not too_wide
    assert "Full report for rtn4_g128" in out and "Full report for rtn2_g64" not in out
    report = out.split("Full report for rtn4_g128", 1)[1]
    assert report.index("== Verdict ==") < report.index("== Perplexity delta ==")
    table = out.split("\n\n")[1].splitlines()
    assert table[0].startswith("variant") and [r.split()[0] for r in table[1:]] == list(data.variants)
    # the other variants are in the table, not in full
    assert out.count("== llama.cpp statistics ==") == 1
    assert _run(capsys, "--variant", "rtn8_g128").count("Full report for rtn8_g128") == 1


@pytest.mark.parametrize("fmt", ["text", "markdown"])
def test_says_what_the_original_is_and_how_to_run_on_your_model(capsys, fmt):
    out = " ".join(_run(capsys, "--format", fmt).split())
    assert "Q4_1 GGUF" in out and "dequantized to float32" in out and "not a 16-bit model" in out
    assert "ppldelta compare original.npy quantized.npy" in out


def test_table_values_are_rounded_once(capsys, data):
    out = _run(capsys)
    n = data.original.size
    for v in data.variants:
        ppl_o = math.exp(-math.fsum(data.original.astype(float)) / n)
        ppl_q = math.exp(-math.fsum(data.log_probs[v].astype(float)) / n)
        row = next(ln for ln in out.splitlines() if ln.startswith(v + " "))
        if ppl_q < 1e4:
            assert row.split()[1] == f"{ppl_q:,.3f}"
            assert row.split()[2] == f"{(ppl_q / ppl_o - 1) * 100:+,.2f}"
    row = next(ln for ln in out.splitlines() if ln.startswith("rtn4_g128 "))
    assert row.split()[1] == "12.314"  # 12.314478...: not 12.3145 rounded again to 12.315


def test_json_is_strict_and_has_the_flips(capsys, data):
    out = _run(capsys, "--format", "json")
    j = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert j["featured"] == "rtn4_g128" and "Q4_1" in j["note"]
    orig = np.argmax(data.mc_scores["original"], axis=1)
    for v in data.variants:
        var = np.argmax(data.mc_scores[v], axis=1)
        f = j["flips"][v]
        assert f["flips"] == int(np.count_nonzero(orig != var))
        right_o, right_q = orig == data.mc_answers, var == data.mc_answers
        assert f["right_to_wrong"] == int(np.count_nonzero(right_o & ~right_q))
        assert set(j["reports"][v]["verdict"]) == {"headline", "reason"}


def _shifted(shift, n=6000, seed=0, noise=0.02):
    rng = np.random.default_rng(seed)
    o = -rng.exponential(2.0, n)
    return o, np.minimum(o - shift + rng.normal(0, noise, n), 0)


def test_one_headline_when_the_three_vocabularies_disagree():
    # +0.3 %: 'excellent' by the reference, a significant degradation, and above the published Q8_0 band
    o, q = _shifted(0.003)
    r = ppldelta.analyze(o, q, expected="gguf-q8_0", n_bootstrap=300)
    d = r.to_dict()
    assert d["reference"]["quality"] == "excellent" and d["significance"]["verdict"] == "significant degradation"
    lo, hi = d["ppl_ratio"]["ci"]
    assert lo > expected_band("q8_0").high  # the oracle: the whole CI lies above the published band
    assert d["verdict"]["headline"] == "negligible loss, worse than expected"
    assert "\n" not in d["verdict"]["reason"] and "GGUF Q8_0" in d["verdict"]["reason"]
    text = str(r)
    assert text.splitlines()[:2] == ["== Verdict ==", f"{'verdict':<34}: negligible loss, worse than expected"]
    assert "| verdict | negligible loss, worse than expected |" in r.to_markdown()
    assert html.escape("negligible loss, worse than expected") in r._repr_html_()


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-0.05, 0.3), seed=st.integers(0, 2**16))
def test_headline_follows_ci_and_quality(shift, seed):
    o, q = _shifted(shift, n=800, seed=seed, noise=0.3)
    d = ppldelta.analyze(o, q, n_bootstrap=200, expected="gptq-4").to_dict()
    lo, hi = d["ppl_ratio"]["ci"]
    b = expected_band("gptq-4")
    size = ({"excellent": "negligible loss", "good": "small loss", "acceptable": "clear loss",
             "poor": "large loss"}[d["reference"]["quality"]] if lo > 1 else
            "no loss (measurably better)" if hi < 1 else
            "no measurable loss" if d["reference"]["quality"] in ("excellent", "good") else "inconclusive")
    where = "worse than expected" if lo > b.high else "better than expected" if hi < b.low else "as expected"
    assert d["verdict"]["headline"] == f"{size}, {where}"


def test_p_value_below_0001_reads_lt_0001():
    o, q = _shifted(0.05)
    r = ppldelta.analyze(o, q, n_bootstrap=3000)
    assert r["significance"]["p_value"] == pytest.approx(2 / 3001)  # no replicate at or below 0
    for text in (str(r), r.to_markdown(), r._repr_html_()):
        assert "0.000999" not in text and ("p &lt; 0.001" in text or "p < 0.001" in text)


def test_suffers_most_only_when_groups_differ():
    o, q = _shifted(0.02, n=4000, noise=0.3)
    same = ppldelta.analyze(o, q, groups=np.repeat(["a", "b"], 2000), n_bootstrap=300)
    (ca, cb) = (same["groups"][g]["ppl_ratio"]["ci"] for g in "ab")
    assert ca[0] <= cb[1] and cb[0] <= ca[1]  # the oracle: the CIs overlap
    assert same["suffers_most_significant"] is False
    assert "no group significantly (CIs overlap" in str(same)
    q2 = q.copy()
    q2[2000:] -= 0.2  # b is clearly worse
    apart = ppldelta.analyze(o, q2, groups=np.repeat(["a", "b"], 2000), n_bootstrap=300)
    assert apart["groups"]["b"]["ppl_ratio"]["ci"][0] > apart["groups"]["a"]["ppl_ratio"]["ci"][1]
    assert apart["suffers_most_significant"] is True and apart["suffers_most"] == "b"
    assert "suffers most                      : b (its CI lies above" in str(apart)


# published numbers, as printed in llama.cpp's tools/perplexity README (LLaMA 3 8B and Llama 2 7B
# rows of its LLaMA 2 vs LLaMA 3 table) and torchao's quantization README
LLAMACPP = {"q8_0": ((1.000425, 1.000689), (0.000369, 0.001355), (97.674, 98.846)),
            "q6_k": ((1.002406, 1.003490), (0.002098, 0.005452), (96.031, 97.520)),
            "q4_k_m": ((1.014242, 1.028160), (0.012686, 0.031273), (91.901, 94.665)),
            "q2_k": ((1.107955, 1.564849), (0.108903, 0.445132), (71.138, 85.584))}


@pytest.mark.parametrize("fmt", list(LLAMACPP))
def test_llamacpp_bands_hold_the_published_measurements(fmt):
    b = expected_band(fmt)
    ratios, kld, top = LLAMACPP[fmt]
    assert b.low - 5e-5 <= ratios[0] and ratios[1] <= b.high + 5e-5
    assert b.kld == kld and b.same_top1 == top
    assert "llama.cpp tools/perplexity/README.md" in b.source


def test_every_band_names_its_source_and_old_keys_still_work():
    for k in formats():
        b = expected_band(k)
        assert b.source and b.low <= b.high and b.to_dict()["source"] == b.source
    for old in ("fp16", "gptq-8", "gguf-q8_0", "gptq-4", "awq-4", "gguf-q4_k_m", "gguf-q3_k_m", "gguf-q2_k",
                "GPTQ-4", "AWQ", "Q2_K", "q4_k_m"):
        expected_band(old)
    assert expected_band("int8 weight only").low == pytest.approx(12.204 / 12.212, abs=5e-5)
    assert expected_band("fp8").high == pytest.approx(7.62 / 7.54, abs=5e-5)
    for new in ("Q4_0", "Q5_K_M", "Q6_K", "NF4", "FP8", "int8-weight-only"):
        assert expected_band(new).source
    with pytest.raises(ValueError, match="unknown quantization format 'int3-magic'"):
        expected_band("int3-magic")
