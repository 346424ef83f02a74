"""The job's parsers on printouts of the shape llama-perplexity and llama-tokenize write (run
first: a changed printout fails here, naming the line, instead of reading as a disagreement)."""
import pytest

import _agree
from ppldelta import llamacpp

BASE_LOG = """\
perplexity: calculating perplexity over 12 chunks, n_ctx=512, batch_size=512, n_seq=1
perplexity: 0.41 seconds per pass - ETA 0.08 minutes
[1]9.6012,[2]10.0418,[3]10.3166,[4]10.6436,[5]10.5539,[6]10.9310,
0.00.180.621 I Final estimate: PPL = 10.8727 +/- 0.21870
"""

KLD_LOG = """\
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1       9.6197 ±    0.6032       0.00193 ±    0.00201       0.00331 ±    0.00025     1.708 ±  0.156 %    97.255 ±  1.025 %

====== Perplexity statistics ======
Mean PPL(Q)                   :  10.893460 ±   0.219119
Mean PPL(base)                :  10.872704 ±   0.218700
Cor(ln(PPL(Q)), ln(PPL(base))):  99.86%
Mean ln(PPL(Q)/PPL(base))     :   0.001906 ±   0.000539
Mean PPL(Q)/PPL(base)         :   1.001908 ±   0.000540
Mean PPL(Q)-PPL(base)         :   0.020756 ±   0.005875

====== KL divergence statistics ======
Mean    KLD:   0.004026 ±   0.000123
Maximum KLD:   0.267436
99.9%   KLD:   0.125468
99.0%   KLD:   0.031574
95.0%   KLD:   0.012950
90.0%   KLD:   0.008824
Median  KLD:   0.002344
10.0%   KLD:   0.000228
 5.0%   KLD:   0.000101
 1.0%   KLD:   0.000017
 0.1%   KLD:  -0.000002
Minimum KLD:  -0.000004

====== Token probability statistics ======
Mean    Δp: -0.031 ± 0.025 %
Maximum Δp: 12.612%
99.9%   Δp:  9.338%
99.0%   Δp:  4.345%
95.0%   Δp:  2.039%
90.0%   Δp:  1.264%
75.0%   Δp:  0.338%
Median  Δp:  0.000%
25.0%   Δp: -0.376%
10.0%   Δp: -1.405%
 5.0%   Δp: -2.292%
 1.0%   Δp: -4.848%
 0.1%   Δp: -10.120%
Minimum Δp: -14.806%
RMS Δp    :  1.644 ± 0.059 %
Same top p: 97.157 ± 0.301 %
"""


def test_final_estimate():
    v, u = _agree.parse_final_estimate(BASE_LOG)
    assert (v.text, v.decimals, u.text, u.decimals) == ("10.8727", 4, "0.21870", 5)
    assert v.agrees(10.87274999) and v.agrees(10.87265) and not v.agrees(10.87276)
    with pytest.raises(_agree.ParseError):
        _agree.parse_final_estimate("no estimate here")


def test_kld_block():
    b = _agree.parse_kld_block(KLD_LOG)
    assert len(b) == len(_agree._KLD_LINES)
    assert b["ppl"][0].text == "10.893460" and b["ppl"][1].text == "0.219119"
    assert b["cor"].text == "99.86" and b["kld_0.1"].text == "-0.000002"
    assert b["delta_p"][0].text == "-0.031" and b["dp_0.1"].text == "-10.120"
    assert b["same_top"][1].decimals == 3
    with pytest.raises(_agree.ParseError, match="Same top p"):
        _agree.parse_kld_block(KLD_LOG.replace("Same top p", "Same top"))
    with pytest.raises(_agree.ParseError, match="no '======"):
        _agree.parse_kld_block(BASE_LOG)


def test_kld_block_round_trip_through_ppldelta_format():
    """format_kld_statistics prints what the parser reads back, for every key."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 500
    nll = rng.exponential(2, n).astype(np.float32)
    nll_b = (nll + rng.normal(0, 0.05, n)).astype(np.float32)
    stats = llamacpp._summarize(nll, nll_b, rng.exponential(0.01, n), rng.random(n) < 0.9)
    parsed = _agree.parse_kld_block(llamacpp.format_kld_statistics(stats))
    ours = _agree.stats_as_printed(stats)
    assert set(parsed) == set(ours)
    for k, p in parsed.items():
        for pp, oo in (zip(p, ours[k]) if isinstance(p, tuple) else [(p, ours[k])]):
            assert pp.agrees(oo), (k, pp.text, oo)


def test_token_ids():
    assert _agree.parse_token_ids("some log\n[1, 22, 333]\n") == [1, 22, 333]
    assert _agree.parse_token_ids("[]\n") == []
    with pytest.raises(_agree.ParseError):
        _agree.parse_token_ids("1 -> 'a'\n")


def test_agreeing_digits():
    assert _agree.agreeing_digits(18.761064, 18.761064) == "all"
    assert _agree.agreeing_digits(18.761064, 18.761065) == "7"
    assert _agree.agreeing_digits(1.0, 2.0) == "0"
