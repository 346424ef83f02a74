"""ppldelta's GGUF route (``llamacpp.build_reference``, ``llamacpp.evaluate_against_reference``,
``ppldelta eval base.gguf quant.gguf``) against llama-perplexity on the real model:

- the reference built from the GGUF through llama-cpp-python has the records of the conversion of
  llama-perplexity's ``--kl-divergence-base`` file of the same chunks: the same windows and target
  tokens byte for byte; the target log-probs within the file's uint16 decode error (derived per
  row from the file: half a step on each side of the log-softmax, plus the probability mass the
  file's floor adds); the top-K ids identical wherever the exact log-probs are further apart
  than that error;
- ``ppldelta eval base.gguf Q8_0.gguf`` via the CLI (a text file that llama-perplexity's ``-f``
  reads as these 12 chunks): the quantized PPL equals llama-perplexity's Mean PPL(Q) at every
  printed digit, the original PPL its Final estimate; the exact full-vocabulary KLD of every
  token (both models' logits through llama-cpp-python) lies inside the certified bounds, and the
  mean inside the report's;
- an interrupted build resumes to the same bytes."""
import json

import numpy as np
import pytest

import _agree
from conftest import make_llama
from ppldelta import llamacpp, reffile
from ppldelta.cli import main
from ppldelta.hf import _reference as hf_reference
from ppldelta.logits import kl_divergence

N_CTX = 512


@pytest.fixture(scope="module")
def gguf_ref(cfg, tokens, base_llama):
    out = cfg.out / "base-gguf.ppldref"
    for p in (out, out.with_name(out.name + ".part"), out.with_name(out.name + ".part.journal")):
        p.unlink(missing_ok=True)
    return llamacpp.build_reference(base_llama, out, tokens=tokens[: cfg.chunks * N_CTX], n_ctx=N_CTX,
                                    progress=False)


def test_gguf_reference_equals_converted_base_file(cfg, gguf_ref, base_run, table):
    conv_path = llamacpp.convert_logits_file(base_run[1], cfg.out / "base-converted.ppldref", resume=False)
    ours, conv = reffile.read_reference(gguf_ref), reffile.read_reference(conv_path)
    assert ours.k == conv.k and list(ours.window_counts) == list(conv.window_counts)
    assert ours.records["token"].tobytes() == conv.records["token"].tobytes()
    a, c = ours.records, conv.records
    with llamacpp.read_logits_file(base_run[1]) as lf:
        rows = np.asarray(lf._rows).reshape(lf.n_scored, -1)
        n_vocab = lf.n_vocab
    params = np.ascontiguousarray(rows[:, :4]).view(np.float32).astype(np.float64)
    scale, floor = params[:, 0], params[:, 1]
    codes = rows[:, 4 : 4 + n_vocab]
    n_floor = (codes == 0).sum(axis=1)
    q_target = codes[np.arange(len(a)), a["token"]]
    eps = scale / 2 + 1e-5  # half a step, and the float32 arithmetic of the row parameters
    # log-softmax of the decoded row: the target off by eps, the normalizer by eps plus the mass
    # the floor adds (at most n_floor * e^floor)
    bound = 2 * eps - np.log1p(-np.minimum(n_floor * np.exp(floor + eps), 0.5))
    ok = q_target > 0  # a target at the floor decodes to the floor: its log-prob is not in the file
    diff = np.abs(a["lp"] - c["lp"])
    bad = np.flatnonzero(ok & (diff > bound))
    assert bad.size == 0, f"{bad.size} tokens off by more than the decode error, first {bad[0]}: " \
                          f"{a['lp'][bad[0]]!r} vs {c['lp'][bad[0]]!r} (bound {bound[bad[0]]!r})"
    assert ok.mean() > 0.99
    # top-K ids: equal wherever the exact log-probs are further apart than the decode error
    lps = a["lps"].astype(np.float64)
    gap = 2 * bound[:, None] + 1e-6
    sep = np.ones(lps.shape, bool)
    sep[:, 1:] &= (lps[:, :-1] - lps[:, 1:]) > gap
    sep[:, :-1] &= (lps[:, :-1] - lps[:, 1:]) > gap
    sep[:, -1] = False  # the K+1-th log-prob is not stored: the last place may swap
    sep &= lps > floor[:, None] + gap
    assert np.array_equal(a["ids"][sep], c["ids"][sep])
    table.add("llama-perplexity --kl-divergence-base (converted)", "llama.cpp (GGUF reference)",
              "target tokens of the records", len(c), len(a), "identical bytes", digits="all ids")
    table.add("llama-perplexity --kl-divergence-base (converted)", "llama.cpp (GGUF reference)",
              "largest |Δ target log-prob| (nats; decoded file vs exact)", 0.0, float(diff[ok].max()),
              "<= the row's uint16 decode error", digits="-")
    table.notes.append(f"GGUF reference vs the converted base file: {int(ok.sum())} of {len(a)} target "
                       f"log-probs within the decode error (the others sit at the file's floor); top-K ids "
                       f"equal at all {int(sep.sum())} of {sep.size} places separated by more than it.")


def _prompt_file(cfg, text, tokens, base_llama):
    """A prefix of the job's text file that llama-perplexity's -f reads as exactly the job's chunks
    and a tail shorter than a chunk (cut at a character, found in a few tokenizations)."""
    n = cfg.chunks * N_CTX
    raw = text[0]
    cut = int(len(raw) * (n + N_CTX // 2) / len(tokens))
    for _ in range(30):
        data = raw[:cut].encode("utf-8") + b"\n"
        ids = np.asarray(base_llama.tokenize(llamacpp.prompt_bytes(data), add_bos=True), dtype=np.int64)
        if n + 64 <= ids.size < n + N_CTX - 64:
            break
        cut = int(cut * (n + N_CTX // 2) / ids.size)
    assert np.array_equal(ids[:n], tokens[:n]) and n <= ids.size < n + N_CTX, (ids.size, n)
    path = cfg.out / "chunks.txt"
    path.write_bytes(data)
    return path


def test_cli_eval_gguf_equals_llama_perplexity(cfg, text, tokens, base_llama, base_run, kld_runs, variants,
                                               gguf_ref, capsys, table):
    q = "Q8_0" if "Q8_0" in variants else list(variants)[0]
    text = _prompt_file(cfg, text, tokens, base_llama)
    ref_path = cfg.out / "cli-base.ppldref"
    ref_path.unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["eval", str(cfg.gguf), str(variants[q]), "--text", str(text), "--max-length", str(N_CTX),
                 "--reference", str(ref_path), "--format", "json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # the CLI's reference (text -> tokens as llama-perplexity -f) is the API's, record for record
    assert reffile.read_reference(ref_path).records.tobytes() == reffile.read_reference(gguf_ref).records.tobytes()
    rep = doc["variants"][0]["report"]
    ppl_q, ppl_base = rep["ppl"]["quantized"]["value"], rep["ppl"]["original"]["value"]
    printed = _agree.parse_kld_block(kld_runs[q])
    final, _ = _agree.parse_final_estimate(base_run[0])
    assert printed["ppl"][0].agrees(ppl_q), f"{q}: Mean PPL(Q) {printed['ppl'][0].text}, ppldelta eval {ppl_q!r}"
    assert final.agrees(ppl_base), f"Final estimate PPL = {final.text}, ppldelta eval {ppl_base!r}"
    table.add("llama-perplexity --kl-divergence", f"llama.cpp (ppldelta eval base.gguf {q}.gguf)", "Mean PPL(Q)",
              printed["ppl"][0], ppl_q, "every printed digit")
    table.add("llama-perplexity", "llama.cpp (ppldelta eval base.gguf, the reference)", "PPL", final, ppl_base,
              "every printed digit")
    # the exact full-vocabulary KLD of each token, from both models' logits through llama-cpp-python
    n = cfg.chunks * N_CTX
    llama = make_llama(variants[q])
    ids = tokens[:n]
    exact = np.concatenate([kl_divergence(np.asarray(b, np.float64), np.asarray(x, np.float64), topk=False)["kld"]
                            for b, x in zip(llamacpp.chunk_logits(base_llama, ids, n_ctx=N_CTX),
                                            llamacpp.chunk_logits(llama, ids, n_ctx=N_CTX))])
    cols = hf_reference.compare_to_reference(llamacpp._Model(llama), gguf_ref, progress=False,
                                             bos_token_id=False)
    del llama
    tol = 1e-9 * (1 + exact)
    out = np.flatnonzero((exact < cols["kld_lo"] - tol) | (exact > cols["kld_hi"] + tol))
    assert out.size == 0, f"{out.size} tokens' exact KLD outside the certified bounds, first {out[0]}: " \
                          f"{exact[out[0]]!r} not in [{cols['kld_lo'][out[0]]!r}, {cols['kld_hi'][out[0]]!r}]"
    lo, hi = rep["kld_bounds"]["mean"] if isinstance(rep["kld_bounds"], dict) else rep["kld_bounds"][0]
    kld_est = rep["kld"]["mean"]
    assert lo <= exact.mean() <= hi and lo <= kld_est <= hi
    assert kld_est == pytest.approx(exact.mean(), rel=0.05)
    table.add("exact full-vocabulary KL (llama-cpp-python logits of both)", f"llama.cpp (ppldelta eval, {q})",
              "mean KLD: the top-K estimate", float(exact.mean()), kld_est,
              f"exact in the certified bounds [{lo:.6f}, {hi:.6f}], every token too")
    table.add("llama-perplexity --kl-divergence", f"llama.cpp (ppldelta eval, {q})", "Mean KLD (llama.cpp's "
              "definition: base entries above -16 only)", printed["kld"][0], kld_est, "reported, not asserted")


class _Killed(Exception):
    pass


class _Dies:
    """A Llama that dies on its n-th evaluation (the build is killed there)."""

    def __init__(self, llama, n):
        self._llama, self._left = llama, n

    def __getattr__(self, name):
        return getattr(self._llama, name)

    def eval(self, chunk):
        self._left -= 1
        if self._left < 0:
            raise _Killed("killed")
        return self._llama.eval(chunk)


def test_interrupted_gguf_build_resumes_to_the_same_bytes(cfg, tokens, base_llama, gguf_ref, table):
    out = cfg.out / "base-gguf-resumed.ppldref"
    for p in (out, out.with_name(out.name + ".part"), out.with_name(out.name + ".part.journal")):
        p.unlink(missing_ok=True)
    ids = tokens[: cfg.chunks * N_CTX]
    with pytest.raises(_Killed):
        llamacpp.build_reference(_Dies(base_llama, cfg.chunks // 2), out, tokens=ids, n_ctx=N_CTX, progress=False)
    assert not out.exists()
    llamacpp.build_reference(base_llama, out, tokens=ids, n_ctx=N_CTX, progress=False)
    assert out.read_bytes() == open(gguf_ref, "rb").read()
    table.add("ppldelta (uninterrupted build)", "llama.cpp (GGUF reference, killed and resumed)", "file bytes",
              out.stat().st_size, out.stat().st_size, "identical bytes", digits="all")
