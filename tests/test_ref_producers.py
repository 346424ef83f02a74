"""Reference producers: hf.build_reference / hf.evaluate_against_reference on tiny random Llama
models (saved with save_pretrained, no hub) and an optimum-quanto qint8 variant, and
llamacpp.convert_logits_file.  Oracles: hf.compare_models (the two-model path, bit for bit on the
exact statistics) and full-vocabulary float64 KL divergences computed here, window by window."""
import copy
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # ppldelta.hf needs torch; the core's tests run without it
from transformers import LlamaConfig, LlamaForCausalLM

from ppldelta import hf, llamacpp, protocols, reffile, refstats
from _models import perturbed, word_tokenizer

V = 96
WORDS = ("the cat sat on a mat while dogs ran past quiet old houses near green fields and "
         "rivers under grey skies every morning before noon").split()

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EXACT = ("reference", "n_tokens", "ppl", "correlation", "ln_ppl_ratio", "ppl_ratio", "ppl_diff",
         "significance", "bootstrap", "delta_p", "same_top1", "top1_in_top5", "top1_in_top10")


def _llama(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _perturbed(model, scale, seed=123):
    return perturbed(model, scale, seed)


def _tokenizer(words=WORDS):
    return word_tokenizer(words)


def _text(n_words=160, seed=3):
    r = np.random.default_rng(seed)
    return " ".join(r.choice(WORDS, size=n_words))


@pytest.fixture(scope="module")
def original():
    return _llama()


@pytest.fixture(scope="module")
def quantized(original):
    quanto = pytest.importorskip("optimum.quanto")
    m = copy.deepcopy(original)
    quanto.quantize(m, weights=quanto.qint8)
    quanto.freeze(m)
    assert isinstance(m.model.layers[0].mlp.up_proj.weight, quanto.QTensor)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _ids(n=150, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n,), generator=g)


@torch.no_grad()
def _oracle_kl(orig, quant, ids, windows):
    """Full-vocabulary float64 KL(P||Q) and KL(Q||P) per scored token, window by window."""
    fw, rv = [], []
    for w in windows:
        x = ids[w.start:w.end].clone()
        if w.bos is not None:
            x[0] = w.bos
        lp = torch.log_softmax(orig(x[None]).logits[0].double(), -1)[w.a - w.start:w.b - w.start]
        lq = torch.log_softmax(quant(x[None]).logits[0].double(), -1)[w.a - w.start:w.b - w.start]
        fw.append((lp.exp() * (lp - lq)).sum(-1))
        rv.append((lq.exp() * (lq - lp)).sum(-1))
    return torch.cat(fw).numpy(), torch.cat(rv).numpy()


def _exact_equal(rep, two):
    a, b = rep.to_dict(), two.to_dict()
    for key in EXACT:
        assert a[key] == b[key], key


PROTOCOL_CASES = [("sliding", 32, 16), ("hf", 32, 16), ("gptq", 24, None), ("llama.cpp", 16, None)]


@pytest.mark.parametrize("protocol,L,S", PROTOCOL_CASES)
@torch.no_grad()
def test_probe_offsets_follow_the_targets_stream_positions(tmp_path, original, protocol, L, S):
    """Each record's probes use the offset of its target's index in the token stream (not its row
    in a batch): the file equals an oracle built window by window with those positions, at any
    batch size, and its header says so."""
    ids = _ids(120, seed=5)
    kw = {"bos_token_id": 1} if protocol == "llama.cpp" else {}
    spec, L2, S2 = protocols.resolve(protocol, L, S)
    windows = protocols.plan(spec, len(ids), L2, S2, 1 if protocol == "llama.cpp" else None)
    want = []
    for w in windows:
        x = ids[w.start:w.end].clone()
        if w.bos is not None:
            x[0] = w.bos
        rows = original(x[None]).logits[0][w.a - w.start:w.b - w.start]
        want.append(refstats.summarize(rows, ids[w.a + 1:w.b + 1].numpy(), 8,
                                       positions=np.arange(w.a + 1, w.b + 1)))
    for bs in (1, 3):
        out = tmp_path / f"b{bs}.ppldref"
        hf.build_reference(original, input_ids=ids, out=out, protocol=protocol, max_length=L, stride=S,
                           k=8, batch_size=bs, progress=False, **kw)
        ref = reffile.read_reference(out)
        assert ref.header["probe_offsets"] == refstats.PROBE_OFFSETS
        assert ref.records.tobytes() == np.concatenate(want).tobytes(), bs


@pytest.mark.parametrize("protocol,L,S", PROTOCOL_CASES)
def test_reference_equals_two_model_path_and_bounds_hold(tmp_path, original, protocol, L, S):
    quant = _perturbed(original, 0.02)
    ids = _ids()
    out = tmp_path / "base.ppldref"
    kw = {"bos_token_id": 1} if protocol == "llama.cpp" else {}
    got = hf.build_reference(original, input_ids=ids, out=out, protocol=protocol, max_length=L,
                             stride=S, k=8, progress=False, **kw)
    assert got == os.fspath(out) and out.exists()
    ref = reffile.read_reference(out)
    ref.verify()
    assert ref.k == 8 and ref.header["protocol"]["name"] == protocol
    assert ref.header["tokens_sha256"] == reffile.tokens_sha256(ids)
    rep = hf.evaluate_against_reference(quant, out, progress=False)
    two = hf.compare_models(original, quant, ids, protocol=protocol, max_length=L, stride=S,
                            progress=False, **kw)
    _exact_equal(rep, two)
    # certified bounds hold on every token, against full-vocabulary float64 KL both ways
    c = hf.compare_to_reference(quant, out, progress=False)
    spec, L2, S2 = protocols.resolve(protocol, L, S)
    windows = protocols.plan(spec, len(ids), L2, S2, 1 if protocol == "llama.cpp" else None)
    fw, rv = _oracle_kl(original, quant, ids, windows)
    slack = 1e-9
    assert np.all(c["kld_lo"] <= fw + slack) and np.all(fw <= c["kld_hi"] + slack)
    assert np.all(c["kld_reverse_lo"] <= rv + slack) and np.all(rv <= c["kld_reverse_hi"] + slack)
    assert np.all(c["kld_lo"] <= c["kld"] + slack) and np.all(c["kld"] <= c["kld_hi"] + slack)


def test_quanto_qint8_reference_equals_two_model_path(tmp_path, original, quantized, tokenizer):
    texts = [_text(40, s) for s in range(4)]
    out = tmp_path / "base.ppldref"
    hf.build_reference(original, texts=texts, out=out, tokenizer=tokenizer, max_length=32, stride=16,
                       k=16, progress=False)
    h = reffile.read_reference(out).header
    assert h["tokenizer_sha256"] == reffile.vocab_sha256(tokenizer)
    assert h["model"]["config_sha256"] and h["model"]["weights_sha256"]
    assert h["text"]["n_texts"] == 4 and h["text"]["join"] == "\n\n"
    ids = hf._load.tokenize(texts, tokenizer, "\n\n", False)[0]
    labels = np.arange(ids.size) % 3
    rep = hf.evaluate_against_reference(quantized, out, tokenizer=tokenizer, texts=texts, groups=labels,
                                        progress=False)
    two = hf.compare_models(original, quantized, ids, max_length=32, stride=16, groups=labels,
                            progress=False)
    _exact_equal(rep, two)
    assert rep.to_dict()["groups"].keys() == two.to_dict()["groups"].keys()
    for g, gd in rep.to_dict()["groups"].items():
        assert gd["reference"] == two.to_dict()["groups"][g]["reference"]
    c = hf.compare_to_reference(quantized, out, progress=False)
    windows = protocols.plan("sliding", ids.size, 32, 16)
    fw, rv = _oracle_kl(original, quantized, torch.from_numpy(ids), windows)
    assert np.all(c["kld_lo"] <= fw + 1e-9) and np.all(fw <= c["kld_hi"] + 1e-9)
    assert np.all(c["kld_reverse_lo"] <= rv + 1e-9) and np.all(rv <= c["kld_reverse_hi"] + 1e-9)


def test_models_loaded_from_disk_and_finished_file_reused(tmp_path, original, tokenizer):
    d = tmp_path / "orig"
    original.save_pretrained(d)
    tokenizer.save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text(_text())
    out = tmp_path / "r.ppldref"
    hf.build_reference(str(d), texts=str(text), out=out, k=4, max_length=32, progress=False)
    h = reffile.read_reference(out).header
    assert h["model"]["name"] == str(d) and h["model"]["dtype"] == "torch.float32"
    before = out.read_bytes()
    hf.build_reference(str(d), texts=str(text), out=out, k=4, max_length=32, progress=False)
    assert out.read_bytes() == before  # the finished file matches: reused as it is
    with pytest.raises(ValueError, match="different reference"):
        hf.build_reference(str(d), texts=str(text), out=out, k=8, max_length=32, progress=False)
    hf.build_reference(str(d), texts=str(text), out=out, k=8, max_length=32, progress=False, resume=False)
    assert reffile.read_reference(out).k == 8


def test_mismatches_refused(tmp_path, original, tokenizer):
    texts = [_text(60, 7)]
    out = tmp_path / "base.ppldref"
    hf.build_reference(original, texts=texts, out=out, tokenizer=tokenizer, max_length=32, k=4,
                       progress=False)
    quant = _perturbed(original, 0.01)
    with pytest.raises(ValueError, match="tokens"):
        hf.evaluate_against_reference(quant, out, texts=[_text(60, 8)], tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="tokens"):
        hf.evaluate_against_reference(quant, out, input_ids=_ids(50), progress=False)
    other = _tokenizer(WORDS[::-1] + ["extra"])
    with pytest.raises(ValueError, match="tokenizer"):
        hf.evaluate_against_reference(quant, out, tokenizer=other, progress=False)
    with pytest.raises(ValueError, match="protocol"):
        hf.evaluate_against_reference(quant, out, protocol="gptq", progress=False)
    small = _llama(vocab=40)  # a vocabulary that cannot hold the reference's ids
    with pytest.raises(ValueError, match="vocabulary"):
        hf.evaluate_against_reference(small, out, progress=False)
    with pytest.raises(ValueError, match="per-token"):
        hf.build_reference(original, input_ids=_ids(), out=tmp_path / "w.ppldref", protocol="window-mean",
                           progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        hf.build_reference(original, out=tmp_path / "x.ppldref", progress=False)
    # the same texts, tokenizer and protocol are accepted
    hf.evaluate_against_reference(quant, out, texts=texts, tokenizer=tokenizer, protocol="sliding",
                                  progress=False)


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from transformers import AutoModelForCausalLM
    from ppldelta import hf, reffile
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    ids = torch.load(sys.argv[2])
    real = reffile.ReferenceWriter.write_window
    def write_window(self, i, records):
        real(self, i, records)
        if i == int(sys.argv[4]):
            os.kill(os.getpid(), 9)  # killed mid-build, as by the OOM killer or a pre-empted job
    reffile.ReferenceWriter.write_window = write_window
    hf.build_reference(model, input_ids=ids, out=sys.argv[3], max_length=16, stride=8, k=8,
                       batch_size=2, progress=False)
""")


def test_killed_build_resumes_to_identical_file(tmp_path, original):
    d = tmp_path / "orig"
    original.save_pretrained(d)
    ids = _ids(120, seed=5)
    torch.save(ids, tmp_path / "ids.pt")
    model = type(original).from_pretrained(d).eval()
    whole = tmp_path / "whole.ppldref"
    hf.build_reference(model, input_ids=ids, out=whole, max_length=16, stride=8, k=8, batch_size=2,
                       progress=False)
    out = tmp_path / "killed.ppldref"
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(d), str(tmp_path / "ids.pt"), str(out), "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and os.path.exists(f"{out}.part")
    done = []
    real = reffile.ReferenceWriter.write_window

    def counting(self, i, records):
        done.append(i)
        real(self, i, records)

    reffile.ReferenceWriter.write_window = counting
    try:
        hf.build_reference(model, input_ids=ids, out=out, max_length=16, stride=8, k=8, batch_size=2,
                           progress=False)
    finally:
        reffile.ReferenceWriter.write_window = real
    assert done and done[0] == 5  # windows 0..4 were kept, verified and skipped
    assert out.read_bytes() == whole.read_bytes()
    assert not os.path.exists(f"{out}.part") and not os.path.exists(f"{out}.part.journal")


def test_convert_llamacpp_logits_file(tmp_path, original):
    n_ctx = 16
    ids = _ids(3 * n_ctx + 5, seed=9)
    windows = protocols.plan("llama.cpp", len(ids), n_ctx, None, 1)
    chunks = []
    with torch.no_grad():
        for w in windows:
            x = ids[w.start:w.end].clone()
            x[0] = 1
            chunks.append(original(x[None]).logits[0].float().numpy())
    kld = tmp_path / "base.kld"
    llamacpp.write_logits_file(kld, ids.numpy(), chunks, n_ctx)
    out = tmp_path / "conv.ppldref"
    assert llamacpp.convert_logits_file(kld, out, k=8) == os.fspath(out)
    ref = reffile.read_reference(out)
    ref.verify()
    h = ref.header
    assert h["protocol"]["name"] == "llama.cpp" and h["protocol"]["max_length"] == n_ctx
    assert "uint16" in h["source"]["quantization"] and h["source"]["n_vocab"] == V
    lf = llamacpp.read_logits_file(kld)
    assert np.array_equal(ref.records["token"], lf.scored_targets())
    # the records summarize the decoded rows: oracle = refstats.summarize of the decoded log-probs
    # (chunk i scores rows n_ctx/2 .. n_ctx-2 of tokens [i n_ctx, (i+1) n_ctx): its targets sit at
    # i n_ctx + n_ctx/2 + 1 .. (i+1) n_ctx - 1 in the stream, which set the probes' offsets)
    want = np.concatenate([refstats.summarize(lf.chunk_log_probs(i), lf.scored_targets().reshape(
        lf.n_chunk, -1)[i].astype(np.int64), 8, positions=i * n_ctx + np.arange(n_ctx // 2 + 1, n_ctx))
        for i in range(lf.n_chunk)])
    assert ref.records.tobytes() == want.tobytes()
    np.testing.assert_allclose(ref.records["lp"], lf.target_log_probs(), atol=2e-3)
    # the tokens are in the reference: the model against its own uint16 file is close to 0 KLD
    rep = hf.evaluate_against_reference(original, out, bos_token_id=1, progress=False)
    assert rep.n_tokens == lf.n_scored and rep.kld.mean < 1e-3 and rep.same_top1.pct > 95
    # converting again resumes nothing and gives the same bytes
    before = out.read_bytes()
    llamacpp.convert_logits_file(kld, out, k=8)
    assert out.read_bytes() == before


def test_device_path_plumbing(tmp_path, original, monkeypatch):
    """The accelerator branch (the torch twins, run here on CPU tensors) through build and
    evaluate: the same records up to float64 rounding, the same report up to rounding."""
    from ppldelta.hf import _ref_torch

    ids = _ids(90, seed=4)
    quant = _perturbed(original, 0.02)
    cpu = tmp_path / "cpu.ppldref"
    hf.build_reference(original, input_ids=ids, out=cpu, max_length=32, k=8, progress=False)
    want = hf.evaluate_against_reference(quant, cpu, progress=False).to_dict()
    monkeypatch.setattr(_ref_torch, "summarize_torch",
                        lambda x, t, k, probes, positions: _ref_torch._summarize_device(
                            x, t, k, probes=probes, positions=positions))
    monkeypatch.setattr(_ref_torch, "compare_torch",
                        lambda x, r: _ref_torch._compare_device(x, refstats.check_records(r)))
    dev = tmp_path / "dev.ppldref"
    hf.build_reference(original, input_ids=ids, out=dev, max_length=32, k=8, progress=False)
    a, b = reffile.read_reference(cpu).records, reffile.read_reference(dev).records
    assert np.array_equal(a["token"], b["token"]) and np.array_equal(a["ids"], b["ids"])
    assert np.array_equal(a["pids"], b["pids"]) and refstats.n_probes(a) == refstats.DEFAULT_PROBES
    np.testing.assert_allclose(a["lp"], b["lp"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a["plps"], b["plps"], rtol=1e-6)
    got = hf.evaluate_against_reference(quant, dev, progress=False).to_dict()
    assert got["kld"]["mean"] == pytest.approx(want["kld"]["mean"], rel=1e-9)
    assert got["same_top1"] == want["same_top1"]
    assert got["ppl"]["quantized"]["value"] == pytest.approx(want["ppl"]["quantized"]["value"], rel=1e-12)
