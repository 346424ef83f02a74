"""ppldelta vs llama.cpp's llama-perplexity / llama-tokenize and llama-cpp-python, on a real model.

- tokens: llama-cpp-python's tokens of ``prompt_bytes(text)`` equal llama-tokenize's of the file
  and the tokens stored in the base logits file;
- the base file: ``read_logits_file`` decodes it to llama.cpp's own "Mean PPL(base)";
- exact logits: ``llamacpp.token_log_probs`` through llama-cpp-python gives the PPL (and ±)
  llama-perplexity prints, for the original and every variant;
- KLD: ``llamacpp.kld_statistics`` (base file + the variant's exact logits) prints every line
  of ``llama-perplexity --kl-divergence``'s final block, digit for digit."""
import math

import numpy as np
import pytest

import _agree
from conftest import make_llama
from ppldelta import llamacpp


def _ppl_and_unc(log_probs):
    """llama-perplexity's PPL and ± from per-token log-probs (its formula)."""
    nll = -np.asarray(log_probs, dtype=np.float64)
    n = nll.size
    m = nll.sum() / n
    var = (nll * nll).sum() / n - m * m
    return math.exp(m), math.sqrt(var / (n - 1)) * math.exp(m)


def test_tokens_equal_llama_tokenize(cfg, text, tokens, base_llama, base_run, table):
    out = _agree.run([cfg.bin / "llama-tokenize", "-m", cfg.gguf, "-f", text[1], "--ids", "--log-disable"],
                     cfg.out / "tokenize.log")
    ids = np.asarray(_agree.parse_token_ids(out), dtype=np.int64)
    # llama-tokenize -f keeps the file's trailing newline (llama-perplexity -f drops it)
    data = llamacpp.prompt_bytes(text[0].encode("utf-8"), strip_newline=False)
    ours = np.asarray(base_llama.tokenize(data, add_bos=True), dtype=np.int64)
    assert ids.size == ours.size, f"llama-tokenize gives {ids.size} tokens, llama-cpp-python {ours.size}"
    diff = np.flatnonzero(ids != ours)
    assert diff.size == 0, (f"tokens differ first at {diff[0]}: llama-tokenize {ids[diff[0]]}, "
                            f"llama-cpp-python {ours[diff[0]]}")
    table.add("llama-tokenize", "-f text (escapes processed, trailing newline kept)", "token ids",
              ids.size, ours.size, "identical ids", digits="all ids")
    with llamacpp.read_logits_file(base_run[1]) as lf:
        stored = np.asarray(lf.tokens).reshape(-1)
        assert lf.n_chunk == cfg.chunks and lf.n_ctx == 512
    assert np.array_equal(stored, tokens[: stored.size]), "the base file holds other tokens"
    table.add("llama-perplexity --kl-divergence-base", "-f text (one trailing newline dropped, escapes "
              "processed)", "tokens in the base file", stored.size, stored.size, "identical ids",
              digits="all ids")


def test_base_file_reads_as_llama_cpp_reads_it(cfg, base_run, kld_runs, table):
    with llamacpp.read_logits_file(base_run[1]) as lf:
        lp = lf.target_log_probs()
    ppl, unc = _ppl_and_unc(lp)
    for q, log in kld_runs.items():
        printed = _agree.parse_kld_block(log)["ppl_base"]
        assert printed[0].agrees(ppl), f"{q}: Mean PPL(base) {printed[0].text}, read_logits_file {ppl!r}"
        assert printed[1].agrees(unc), f"{q}: ± {printed[1].text}, read_logits_file {unc!r}"
    table.add("llama-perplexity --kl-divergence", "llama.cpp (base file)", "Mean PPL(base)", printed[0], ppl,
              "every printed digit")


def test_exact_logits_reproduce_final_estimate(cfg, base_run, tokens, base_llama, table):
    n = cfg.chunks * 512
    v, u = _agree.parse_final_estimate(base_run[0])
    # llama-cpp-python's exact logits with llama.cpp's float32 NLL: every printed digit
    nll = np.concatenate([llamacpp._nll_f32(x, tokens[i * 512 + 257: (i + 1) * 512])[0]
                          for i, x in enumerate(llamacpp.chunk_logits(base_llama, tokens[:n], n_ctx=512))])
    ppl, unc = _ppl_and_unc(-nll.astype(np.float64))
    assert v.agrees(ppl), f"llama-perplexity PPL = {v.text}, ppldelta {ppl!r}"
    assert u.agrees(unc), f"llama-perplexity +/- {u.text}, ppldelta {unc!r}"
    table.add("llama-perplexity", "llama.cpp (llama-cpp-python logits, float32 NLL)", "PPL", v, ppl,
              "every printed digit")
    table.add("llama-perplexity", "llama.cpp (llama-cpp-python logits, float32 NLL)", "PPL ±", u, unc,
              "every printed digit")
    # token_log_probs (a float64 log-softmax of the same logits): as close as llama.cpp's float32 allows
    lp = llamacpp.token_log_probs(base_llama, tokens[:n], n_ctx=512)
    ppl64, _ = _ppl_and_unc(lp)
    assert ppl64 == pytest.approx(v.value, rel=1e-5), (v.text, ppl64)
    assert np.max(np.abs(lp + nll)) < 1e-4
    table.add("llama-perplexity", "llama.cpp (token_log_probs, float64)", "PPL", v, ppl64, "rel 1e-5")


def _compare_block(printed: dict, ours: dict) -> list:
    bad = []
    for key, p in printed.items():
        o = ours[key]
        pairs = zip(p, o) if isinstance(p, tuple) else [(p, o)]
        for i, (pp, oo) in enumerate(pairs):
            if not pp.agrees(oo):
                bad.append(f"{key}{'±' if i else ''}: llama.cpp {pp.text}, ppldelta {oo!r}")
    return bad


@pytest.mark.parametrize("variant", ["0", "1"])
def test_kld_statistics_equal_llama_perplexity(cfg, variant, variants, kld_runs, base_run, table):
    q = list(variants)[int(variant)] if int(variant) < len(variants) else pytest.skip("one variant only")
    printed = _agree.parse_kld_block(kld_runs[q])
    llama = make_llama(variants[q])
    with llamacpp.read_logits_file(base_run[1]) as lf:
        # exact logits of the variant through llama-cpp-python, same chunks as the base file
        stats = llamacpp.kld_statistics(lf, llamacpp.chunk_logits(llama, lf.tokens, n_ctx=lf.n_ctx))
        lp = llamacpp.token_log_probs(llama, np.asarray(lf.tokens).reshape(-1), n_ctx=lf.n_ctx)
    del llama
    ours = _agree.stats_as_printed(stats)
    bad = _compare_block(printed, ours)
    assert not bad, f"{q}: ppldelta's llama.cpp KLD statistics differ from llama-perplexity's:\n" + "\n".join(bad)
    # token_log_probs (float64 log-softmax) gives the same Mean PPL(Q)
    # token_log_probs (a float64 log-softmax of the same logits) is as close as llama.cpp's own
    # float32 rounding of each token's NLL allows
    ppl_q, _ = _ppl_and_unc(lp)
    assert ppl_q == pytest.approx(printed["ppl"][0].value, rel=1e-6), (
        f"{q}: Mean PPL(Q) {printed['ppl'][0].text}, token_log_probs {ppl_q!r}")
    table.add("llama-perplexity --kl-divergence", f"llama.cpp ({q}, token_log_probs, float64)", "Mean PPL(Q)",
              printed["ppl"][0], ppl_q, "rel 1e-6")
    n_lines = sum(len(p) if isinstance(p, tuple) else 1 for p in printed.values())
    proto = f"llama.cpp KLD ({q})"
    table.add("llama-perplexity --kl-divergence", proto, "Mean PPL(Q)", printed["ppl"][0], ours["ppl"][0],
              "every printed digit")
    table.add("llama-perplexity --kl-divergence", proto, "Mean KLD", printed["kld"][0], ours["kld"][0],
              "every printed digit")
    table.add("llama-perplexity --kl-divergence", proto, "99.9% KLD", printed["kld_99.9"], ours["kld_99.9"],
              "every printed digit")
    table.add("llama-perplexity --kl-divergence", proto, "Same top p %", printed["same_top"][0],
              ours["same_top"][0], "every printed digit")
    table.notes.append(f"{q}: all {n_lines} numbers of llama-perplexity's final KLD block agree at every "
                       "printed digit (llamacpp.kld_statistics: base file + llama-cpp-python's exact logits).")
