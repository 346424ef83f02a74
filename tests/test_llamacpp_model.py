"""GGUF models as reference producers (ppldelta.llamacpp.build_reference /
evaluate_against_reference and the CLI's GGUF route).  Most tests run a stand-in for
llama-cpp-python's ``Llama`` (NumPy logits, the attributes ppldelta reads), so they run everywhere;
the oracles are written here: llama-perplexity's chunks (BOS over each chunk's first token, second
half scored) and a float64 log-softmax.  The last tests run the real llama-cpp-python on a GGUF
(PPLDELTA_TEST_GGUF, or the agreement job's cached SmolLM2) and skip without it."""
import hashlib
import json
import os
import sys
import types

import numpy as np
import pytest

from ppldelta import llamacpp, reffile
from ppldelta.cli import main

V = 40
GGUF = os.environ.get("PPLDELTA_TEST_GGUF",
                      os.path.expanduser("~/.cache/ppldelta/models/SmolLM2-135M-Instruct.Q4_1.gguf"))


class FakeLlama:
    """What ppldelta reads of a llama_cpp.Llama: logits of position p depend on the token at p,
    the chunk's first token (so BOS matters) and p."""

    def __init__(self, path, n_ctx=8, add_bos=True, shift=0.0, vocab=None, fail_after=None, file_type=None):
        g = np.random.default_rng(7)
        self.W = g.normal(size=(V, V)).astype(np.float32)
        self.W += np.float32(shift) * g.normal(size=(V, V)).astype(np.float32)
        self.model_path = str(path)
        # llama-cpp-python 0.3's layout: the parameter count on _model (there is no Llama.n_params)
        self._model = types.SimpleNamespace(add_bos_token=lambda: add_bos, desc=lambda: "fake",
                                            n_params=lambda: 1000)
        self.metadata = {"general.file_type": str(file_type)} if file_type is not None else {}
        self._logits_all = True
        self.input_ids = np.zeros(n_ctx, np.intc)
        self.scores = np.zeros((n_ctx, V), np.float32)
        self.vocab = vocab or [f"t{i}" for i in range(V)]
        self.fail_after, self.evals = fail_after, 0

    def logits(self, chunk):
        chunk = np.asarray(chunk)
        return (self.W[chunk] + np.float32(0.5) * self.W[chunk[0]]
                + np.float32(0.01) * np.arange(chunk.size, dtype=np.float32)[:, None])

    def n_ctx(self):
        return 256  # llama.cpp pads the context; the buffers keep what was asked for

    def n_vocab(self):
        return V

    def token_bos(self):
        return 1

    def reset(self):
        pass

    def eval(self, chunk):
        self.evals += 1
        if self.fail_after is not None and self.evals > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.scores[:len(chunk)] = self.logits(chunk)

    def tokenize(self, data, add_bos=True, special=False):
        ids = [2 + b % (V - 2) for b in data]
        return ([1] if add_bos and self._model.add_bos_token() else []) + ids

    def detokenize(self, tokens, prev_tokens=None, special=False):
        return b"".join(b"" if t == 1 else b"x" for t in tokens)  # one byte per token but BOS


@pytest.fixture(autouse=True)
def _no_llama_cpp_needed(monkeypatch):
    monkeypatch.setattr(llamacpp, "_vocab_tokens", lambda llama: list(llama.vocab))
    monkeypatch.setattr(llamacpp, "_llama_cpp", lambda: types.SimpleNamespace(__version__="test"))


@pytest.fixture
def gguf(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + bytes(range(200)))
    return p


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _oracle(fake, ids, L, bos):
    """(targets, float64 log-probs rows) of llama-perplexity's chunks, by hand."""
    t, rows = [], []
    for c in range(len(ids) // L):
        chunk = np.array(ids[c * L:(c + 1) * L])
        if bos:
            chunk[0] = 1
        rows.append(_log_softmax(fake.logits(chunk))[L // 2:L - 1])
        t.append(np.asarray(ids[c * L + L // 2 + 1:(c + 1) * L]))
    return np.concatenate(t), np.concatenate(rows)


@pytest.mark.parametrize("L,bos", [(8, True), (9, False), (6, True)])
def test_build_is_llama_perplexity_chunks(tmp_path, gguf, L, bos):
    fake = FakeLlama(gguf, n_ctx=L, add_bos=bos)
    ids = np.random.default_rng(3).integers(0, V, 5 * L + 3)
    out = llamacpp.build_reference(fake, tmp_path / "r.ppldref", tokens=ids, k=5, progress=False)
    ref = reffile.read_reference(out)
    t, lp = _oracle(fake, ids, L, bos)
    rec = ref.records
    assert np.array_equal(rec["token"], t)
    np.testing.assert_allclose(rec["lp"], lp[np.arange(t.size), t], rtol=0, atol=1e-12)
    assert np.array_equal(rec["ids"], np.argsort(-lp, axis=1, kind="stable")[:, :5])
    assert list(ref.window_counts) == [L - 1 - L // 2] * 5
    h = ref.header
    assert h["protocol"]["name"] == "llama.cpp" and h["protocol"]["max_length"] == L
    assert h["protocol"]["bos"] == (1 if bos else None) and h["protocol"]["bos_from"] == "vocabulary"
    assert h["tokenizer_sha256"] == reffile.vocab_sha256([f"t{i}" for i in range(V)])
    assert h["model"]["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert h["model"]["gguf_bytes"] == 204 and h["model"]["name"] == "m.gguf"


def test_text_is_read_as_llama_perplexity_reads_it(tmp_path, gguf):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a\\tb " * 20 + b"\n")  # -f: one trailing newline dropped, escapes processed
    fake = FakeLlama(gguf)
    out = llamacpp.build_reference(fake, tmp_path / "r.ppldref", texts=str(f), k=3, progress=False)
    ref = reffile.read_reference(out)
    want = fake.tokenize(b"a\tb " * 20)
    assert reffile.tokens_sha256(np.asarray(want, "<i4")) == ref.header["tokens_sha256"]
    assert ref.header["text"]["text_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    # a list of strings is tokenized as it is (joined with a blank line)
    out2 = llamacpp.build_reference(fake, tmp_path / "r2.ppldref", texts=["x\\ty " * 10, "z" * 30], k=3,
                                    progress=False)
    want2 = fake.tokenize(("x\\ty " * 10 + "\n\n" + "z" * 30).encode())
    assert reffile.read_reference(out2).header["tokens_sha256"] == reffile.tokens_sha256(np.asarray(want2, "<i4"))


def test_text_groups_recorded(tmp_path, gguf):
    """groups= (one label per text): each token goes to the text its first byte is in (BOS and the
    blank line that joins two texts to the text before); the header records the runs, and every
    evaluation reports the groups; a file or tokens with groups, or a wrong count, is refused."""
    fake = FakeLlama(gguf, n_ctx=8)
    texts = ["ab" * 10, "cd" * 7, "ef" * 9]
    out = llamacpp.build_reference(fake, tmp_path / "r.ppldref", texts=texts, groups=["p", "c", "p"],
                                   k=3, progress=False)
    h = reffile.read_reference(out).header
    assert h["groups"] == {"names": ["p", "c"], "runs": [[0, 0], [1 + 20 + 2, 1], [1 + 22 + 14 + 2, 0]]}
    rep = llamacpp.evaluate_against_reference(FakeLlama(gguf, 8, shift=0.05), out, progress=False)
    pos = rep.per_token["target_positions"]
    want = np.where((pos >= 23) & (pos < 39), "c", "p")
    assert np.array_equal(rep.per_token["groups"], want)
    for g in ("p", "c"):
        lo, lq = (rep.per_token[k][want == g] for k in ("original_log_probs", "quantized_log_probs"))
        assert rep.groups[g].reference["original_perplexity"] == round(np.exp(-np.mean(lo)), 4)
        assert rep.groups[g].reference["quantized_perplexity"] == round(np.exp(-np.mean(lq)), 4)
    f = tmp_path / "t.txt"
    f.write_text("abc " * 20)
    for kw, msg in ((dict(texts=str(f), groups=["a"]), "groups needs texts as a list"),
                    (dict(tokens=[3, 4, 5] * 9, groups=["a"]), "groups needs texts as a list"),
                    (dict(texts=texts, groups=["a", "b"]), "groups has 2 labels for 3 texts")):
        with pytest.raises(ValueError, match=msg):
            llamacpp.build_reference(fake, tmp_path / "x.ppldref", k=3, progress=False, **kw)


def test_choice_scores_and_flips_of_gguf_models(tmp_path, gguf):
    """Multiple-choice items through a GGUF model's own loop: the stored scores are lm-eval's rule
    by hand (request (context, " " + choice); one byte per token here, so the continuation is the
    choice's bytes with the delimiter; an empty context is BOS), and the flips count by hand."""
    import math

    L = 8
    base, quant = FakeLlama(gguf, L), FakeLlama(gguf, L, shift=2.0)
    g = np.random.default_rng(5)
    word = lambda n: "".join(chr(97 + int(x)) for x in g.integers(0, 26, n))  # noqa: E731
    items = [{"context": word(i % 4), "choices": [word(int(g.integers(1, 4))) for _ in range(2 + i % 2)],
              "answer": i % 2} for i in range(40)]
    out = llamacpp.build_reference(base, tmp_path / "r.ppldref", tokens=np.arange(3 * L) % V, k=3,
                                   progress=False, choices=items)

    def oracle(fake):
        s = np.full((len(items), 3), -np.inf)
        for i, it in enumerate(items):
            for j, c in enumerate(it["choices"]):
                ctx = fake.tokenize(it["context"].encode(), add_bos=False) or [1]
                cont = fake.tokenize((" " + c).encode(), add_bos=False)
                seq = ctx + cont
                lp = _log_softmax(fake.logits(np.array(seq[-(L + 1):][:-1])))
                s[i, j] = math.fsum(lp[len(lp) - len(cont) + k, cont[k]] for k in range(len(cont)))
        return s

    so, sq = oracle(base), oracle(quant)
    entry = reffile.read_reference(out).header["choices"]
    assert entry["max_length"] == L and entry["prefix_token"] == 1
    np.testing.assert_allclose(ch_stored(entry, items), so, rtol=1e-12)
    fl = llamacpp.choice_flips(quant, out, items, progress=False)
    ans = np.array([it["answer"] for it in items])
    po, pq = so.argmax(1), sq.argmax(1)
    assert (fl.flips, fl.right_to_wrong, fl.wrong_to_right) == (
        int((po != pq).sum()), int(((po == ans) & (pq != ans)).sum()), int(((po != ans) & (pq == ans)).sum()))
    assert fl.flips > 0


def ch_stored(entry, items):
    from ppldelta.choices import stored_scores

    return stored_scores(entry, items)


def test_evaluate_variant_against_reference(tmp_path, gguf):
    L = 8
    base, quant = FakeLlama(gguf, L), FakeLlama(gguf, L, shift=0.05)
    ids = np.random.default_rng(4).integers(0, V, 6 * L)
    out = llamacpp.build_reference(base, tmp_path / "r.ppldref", tokens=ids, k=6, progress=False)
    same = llamacpp.evaluate_against_reference(base, out, progress=False)
    assert same.ppl_ratio.value == 1.0 and same.kld.mean == pytest.approx(0.0, abs=1e-7)
    assert same.kld_bounds.mean[0] <= 0.0 <= same.kld_bounds.mean[1]
    rep = llamacpp.evaluate_against_reference(quant, out, progress=False)
    t, lb = _oracle(base, ids, L, True)
    _, lq = _oracle(quant, ids, L, True)
    r = np.arange(t.size)
    assert rep.ppl.original.value == pytest.approx(np.exp(-lb[r, t].mean()), rel=1e-12)
    assert rep.ppl.quantized.value == pytest.approx(np.exp(-lq[r, t].mean()), rel=1e-12)
    kl = (np.exp(lb) * (lb - lq)).sum(axis=1).mean()  # the full-vocabulary KL, inside the bounds
    lo, hi = rep.kld_bounds.mean
    assert lo - 1e-7 <= kl <= hi + 1e-7


def test_vocabulary_and_text_mismatch_refused(tmp_path, gguf):
    fake = FakeLlama(gguf)
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 20)
    out = llamacpp.build_reference(fake, tmp_path / "r.ppldref", texts=str(f), k=3, progress=False)
    other = FakeLlama(gguf, vocab=[f"u{i}" for i in range(V)])
    with pytest.raises(ValueError, match="vocabulary"):
        llamacpp.evaluate_against_reference(other, out, progress=False)
    g = tmp_path / "g.txt"
    g.write_text("other words " * 20)
    with pytest.raises(ValueError, match="text differs"):
        llamacpp.evaluate_against_reference(fake, out, texts=str(g), progress=False)
    assert llamacpp.evaluate_against_reference(fake, out, texts=str(f), progress=False).ppl_ratio.value == 1.0
    with pytest.raises(ValueError, match="smaller than"):  # a context shorter than the reference's chunks
        llamacpp.evaluate_against_reference(FakeLlama(gguf, n_ctx=4), out, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        llamacpp.build_reference(fake, tmp_path / "x.ppldref", progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llamacpp.build_reference(fake, tmp_path / "x.ppldref", tokens=[3] * 20 + [V], progress=False)


def test_no_torch_needed(tmp_path, gguf, monkeypatch):
    for name in ("torch", "torch.distributed", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import torch raises ImportError
    ids = np.random.default_rng(8).integers(0, V, 4 * 8)
    out = llamacpp.build_reference(FakeLlama(gguf), tmp_path / "r.ppldref", tokens=ids, k=4, progress=False)
    rep = llamacpp.evaluate_against_reference(FakeLlama(gguf, shift=0.05), out, progress=False)
    assert rep.ppl.quantized.value > 0 and rep.kld.mean > 0


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path, gguf):
    ids = np.random.default_rng(5).integers(0, V, 7 * 8)
    whole = llamacpp.build_reference(FakeLlama(gguf), tmp_path / "a.ppldref", tokens=ids, k=4, progress=False)
    out = tmp_path / "b.ppldref"
    with pytest.raises(KeyboardInterrupt):
        llamacpp.build_reference(FakeLlama(gguf, fail_after=3), out, tokens=ids, k=4, progress=False)
    assert not out.exists() and os.path.exists(f"{out}.part")
    again = FakeLlama(gguf)
    llamacpp.build_reference(again, out, tokens=ids, k=4, progress=False)
    assert again.evals == 4  # only the chunks the first build did not finish
    assert out.read_bytes() == open(whole, "rb").read()
    llamacpp.build_reference(again, out, tokens=ids, k=4, progress=False)  # finished: returned as it is
    assert again.evals == 4


def test_three_producers_agree(tmp_path, gguf):
    """A GGUF build, the hf build of the same logits (protocol="llama.cpp") and the conversion of
    a llama.cpp logits file of them: the same windows, tokens and record order; the first two
    the same bytes."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from _models import tiny_gpt2
    from ppldelta import hf

    L = 16
    model = tiny_gpt2(vocab=V).double()  # float64 logits on both sides: the same bytes
    fake = FakeLlama(gguf, n_ctx=L)
    fake.scores = np.zeros((L, V), np.float64)

    def logits(chunk):
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(chunk)[None], dtype=torch.long)).logits[0].numpy()

    fake.logits = logits
    ids = np.random.default_rng(6).integers(0, V, 4 * L + 5)
    a = reffile.read_reference(llamacpp.build_reference(fake, tmp_path / "a.ppldref", tokens=ids, k=8,
                                                        progress=False))
    b = reffile.read_reference(hf.build_reference(model, input_ids=ids, out=tmp_path / "b.ppldref",
                                                  protocol="llama.cpp", max_length=L, bos_token_id=1, k=8,
                                                  progress=False))
    assert a.records.tobytes() == b.records.tobytes()
    assert list(a.window_counts) == list(b.window_counts)
    chunks = [logits(np.r_[1, ids[c * L + 1:(c + 1) * L]]) for c in range(len(ids) // L)]
    llamacpp.write_logits_file(tmp_path / "c.kld", ids, chunks, L)
    c = reffile.read_reference(llamacpp.convert_logits_file(tmp_path / "c.kld", tmp_path / "c.ppldref", k=8))
    assert np.array_equal(c.records["token"], a.records["token"])
    assert list(c.window_counts) == list(a.window_counts)


# ---------------------------------------------------------------------------- the CLI
def test_cli_gguf_route(tmp_path, gguf, monkeypatch, capsys):
    g2 = tmp_path / "q.gguf"
    g2.write_bytes(b"GGUF" + bytes(10))
    made = {}

    def load(path, n_ctx=512, **kw):
        made[os.path.basename(path)] = n_ctx
        q = path.endswith("q.gguf")
        return FakeLlama(path, n_ctx, shift=0.05 if q else 0.0, file_type=15 if q else None)  # Q4_K_M

    monkeypatch.setattr(llamacpp, "load_gguf", load)
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog " * 4)
    out = tmp_path / "r.ppldref"
    assert main(["reference", "build", str(gguf), "--text", str(f), "--max-length", "8", "-o", str(out),
                 "--top-k", "5", "--no-progress"]) == 0
    assert made == {"m.gguf": 8}
    capsys.readouterr()
    assert main(["eval", str(out), str(g2), "--text", str(f), "--format", "json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert made["q.gguf"] == 8  # the context is the reference's window
    assert doc["variants"][0]["size"] == {"bytes": 14, "parameters": 1000, "bits_per_weight": 8 * 14 / 1000}
    # the expected band from the file's type (general.file_type 15: Q4_K_M), or the one asked for
    assert doc["variants"][0]["report"]["expected"]["format"] == "gguf-q4_k_m"
    assert main(["eval", str(out), str(g2), "--text", str(f), "--format", "json", "--no-progress",
                 "--expected", "q8_0"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"][0]["report"]["expected"]["format"] == "q8_0"
    ids = FakeLlama(gguf).tokenize(f.read_bytes()[:-1])
    t, lq = _oracle(FakeLlama(g2, shift=0.05), ids, 8, True)
    ppl = doc["variants"][0]["report"]["ppl"]["quantized"]["value"]
    assert ppl == pytest.approx(np.exp(-lq[np.arange(t.size), t].mean()), rel=1e-12)
    # the GGUF as SOURCE: its reference built (cached) first, under the llama.cpp protocol
    assert main(["eval", str(gguf), str(g2), "--text", str(f), "--max-length", "8", "--format", "json",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    doc2 = json.loads(capsys.readouterr().out)
    assert doc2["reference"]["protocol"]["name"] == "llama.cpp"
    assert doc2["variants"][0]["report"]["ppl"]["quantized"]["value"] == ppl


@pytest.mark.parametrize("extra,msg", [
    (["--protocol", "sliding"], "llama.cpp protocol only"),
    (["--stride", "4"], "leave --stride unset"),
    ([], "needs --text"),
])
def test_cli_gguf_refusals(tmp_path, gguf, capsys, extra, msg):
    text = tmp_path / "t.txt"
    text.write_text("some text " * 20)
    assert main(["reference", "build", str(gguf), "-o", str(tmp_path / "r.ppldref"), *extra]
                + (["--text", str(text)] if extra else [])) == 2
    assert msg in capsys.readouterr().err


def test_cli_without_llama_cpp_and_missing_files(tmp_path, gguf, capsys, monkeypatch):
    monkeypatch.undo()  # the real _llama_cpp: with llama_cpp unimportable
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    f = tmp_path / "t.txt"
    f.write_text("text " * 50)
    assert main(["reference", "build", str(gguf), "--text", str(f), "-o", str(tmp_path / "r.ppldref")]) == 2
    err = capsys.readouterr().err
    assert "is a GGUF file" in err and "pip install llama-cpp-python" in err and err.count("\n") == 1
    assert main(["reference", "build", str(tmp_path / "none.gguf"), "--text", str(f), "-o", "x.ppldref"]) == 2
    assert "none.gguf: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    assert main(["eval", str(bad), str(bad), "--text", str(f)]) == 2
    assert "bad.gguf: not a GGUF file" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the real llama-cpp-python
def _real():
    pytest.importorskip("llama_cpp")
    if not os.path.isfile(GGUF):
        pytest.skip(f"no GGUF model at {GGUF} (PPLDELTA_TEST_GGUF)")


def test_real_gguf_build_and_evaluate(tmp_path, monkeypatch):
    _real()
    monkeypatch.undo()
    llama = llamacpp.load_gguf(GGUF, n_ctx=64, n_threads=1)
    from pydoc_data.topics import topics

    text = tmp_path / "t.txt"
    text.write_text(topics["if"][:900], encoding="utf-8")
    out = llamacpp.build_reference(llama, tmp_path / "r.ppldref", texts=str(text), k=8, progress=False)
    ref = reffile.read_reference(out)
    ids = np.asarray(llama.tokenize(llamacpp.prompt_bytes(text.read_bytes()), add_bos=True), np.int64)
    assert ref.header["tokens_sha256"] == reffile.tokens_sha256(ids.astype("<i4"))
    lp = llamacpp.token_log_probs(llama, ids, n_ctx=64)  # llama-perplexity's chunks through the same model
    assert np.array_equal(ref.records["lp"], lp)  # float64 log-probs of the same logits
    names = llamacpp._vocab_tokens(llama)
    assert len(names) == llama.n_vocab() and ref.header["tokenizer_sha256"] == reffile.vocab_sha256(names)
    rep = llamacpp.evaluate_against_reference(llama, out, progress=False)
    assert rep.ppl_ratio.value == 1.0 and rep.kld.mean == pytest.approx(0.0, abs=1e-6)
    # what the CLI's size column and expected band read of a real Llama: llama.cpp's own count
    # (llama_model_n_params; 134,515,008 for SmolLM2-135M) and the file's type (Q4_1: no band)
    import llama_cpp

    assert llamacpp.n_weights(llama) == llama_cpp.llama_model_n_params(llama.model) > 0
    assert llama.metadata["general.file_type"] == "3" and llamacpp.expected_format(llama) is None


def test_gguf_file_types_map_to_their_bands():
    from ppldelta.bands import expected_band, gguf_format

    # llama.h's LLAMA_FTYPE_* values and the band each one's name has (oracle written out here)
    want = {7: "GGUF Q8_0", 18: "GGUF Q6_K", 17: "GGUF Q5_K_M", 15: "GGUF Q4_K_M", 2: "GGUF Q4_0",
            12: "GGUF Q3_K_M", 10: "GGUF Q2_K", 1: "FP16/BF16", 32: "FP16/BF16"}
    for ftype, label in want.items():
        assert expected_band(gguf_format(ftype)).format == label
        assert gguf_format(str(ftype)) == gguf_format(ftype)  # metadata values come as strings
    for ftype in [0, 3, 8, 9, 11, 13, 14, 16, *range(19, 32), 36, 1024, -1, "Q8_0", None, 7.5]:
        assert gguf_format(ftype) is None, ftype  # F32, Q4_1, Q5_0/1, K_S/K_L, IQ types: no band
    assert llamacpp.expected_format(FakeLlama("m.gguf", file_type=17)) == "gguf-q5_k_m"
    assert llamacpp.expected_format(FakeLlama("m.gguf")) is None
