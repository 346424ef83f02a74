"""Multiple-choice scores (ppldelta.choices, hf.score_choices) and flips against a reference
(hf.choice_flips, ``ppldelta eval --choices``), on a tiny random Llama with a byte-level BPE
tokenizer (so " word" and "word" are different tokens and lm-eval's context/continuation split
matters).  The oracle is written here: lm-eval's request (context, " " + choice), its split
(trailing context whitespace moved to the continuation, the continuation = the tokens of the
whole after the context's), a float64 torch log-softmax of one unbatched forward per pair, and a
flip count by hand.  tests/agreement/test_2_lmeval.py checks the same scores against real lm-eval."""
import json
import os
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ppldelta import choices as ch  # noqa: E402
from ppldelta import hf, reffile  # noqa: E402
from ppldelta.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
WORDS = ("the cat sat on a mat while dogs ran past quiet old houses near green fields and rivers "
         "under grey skies every morning before noon").split()


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([" ".join(WORDS)] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    orig = LlamaForCausalLM(cfg).eval()
    quant = LlamaForCausalLM(cfg).eval()
    quant.load_state_dict(orig.state_dict())
    with torch.no_grad():
        for p in quant.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    r = np.random.default_rng(1)
    items = []
    for i in range(30):
        ctx = " ".join(r.choice(WORDS, size=int(r.integers(2, 9))))
        if i % 7 == 3:
            ctx += " "  # trailing whitespace: lm-eval moves it to the continuation
        if i == 5:
            ctx = ""  # empty context: the prefix token
        chs = [" ".join(r.choice(WORDS, size=int(r.integers(1, 4)))) for _ in range(int(r.integers(2, 5)))]
        items.append({"context": ctx, "choices": chs, "answer": int(r.integers(0, len(chs)))})
    path = root / "mc.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    paths = {}
    for name, m in (("orig", orig), ("quant", quant)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    (root / "text.txt").write_text(" ".join(r.choice(WORDS, size=80)))
    return {"tok": tok, "orig": orig, "quant": quant, "items": items, "path": str(path), "root": root,
            "paths": paths, "text": str(root / "text.txt")}


def _oracle_scores(model, tok, items, max_length=64):
    out = np.full((len(items), max(len(it["choices"]) for it in items)), -np.inf)
    for i, it in enumerate(items):
        for j, c in enumerate(it["choices"]):
            ctx, cont = it["context"], " " + c
            n_ws = len(ctx) - len(ctx.rstrip())
            if n_ws:
                ctx, cont = ctx[:-n_ws], ctx[-n_ws:] + cont
            if ctx:
                whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
                ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
                cont_ids = whole[len(ctx_ids):]
                seq = ctx_ids + cont_ids
            else:
                cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
                seq = [tok.bos_token_id] + cont_ids
            x = seq[-(max_length + 1):][:-1]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([x])).logits[0].double(), -1)
            n = len(cont_ids)
            rows = lp[len(x) - n:]
            out[i, j] = math.fsum(rows[k, cont_ids[k]].item() for k in range(n))
    return out


def test_scores_equal_the_oracle(setup):
    s = hf.score_choices(setup["orig"], setup["path"], tokenizer=setup["tok"], progress=False)
    want = _oracle_scores(setup["orig"], setup["tok"], setup["items"])
    assert s.shape == want.shape
    assert np.array_equal(np.isinf(s), np.isinf(want))
    np.testing.assert_allclose(s[np.isfinite(s)], want[np.isfinite(want)], rtol=1e-7)  # float32 forwards of other shapes (logits_to_keep): ~1e-8
    # batched (padded) windows of different lengths: the same scores up to the forward's rounding
    s4 = hf.score_choices(setup["orig"], setup["items"], tokenizer=setup["tok"], batch_size=4, progress=False)
    assert np.array_equal(np.isinf(s), np.isinf(s4))
    np.testing.assert_allclose(s4[np.isfinite(s4)], want[np.isfinite(want)], rtol=1e-7)


def test_truncation_keeps_the_last_max_length_tokens(setup):
    items = [{"context": " ".join(WORDS * 3), "choices": ["cat sat", "dogs"], "answer": 0}]
    s = hf.score_choices(setup["orig"], items, tokenizer=setup["tok"], max_length=12, progress=False)
    want = _oracle_scores(setup["orig"], setup["tok"], items, max_length=12)
    np.testing.assert_allclose(s, want, rtol=1e-7)
    with pytest.raises(ValueError, match="continuation tokens exceed max_length 2"):
        hf.score_choices(setup["orig"], items, tokenizer=setup["tok"], max_length=2, progress=False)


def test_reference_stores_scores_and_flips_count_by_hand(setup, tmp_path, capsys):
    ref = tmp_path / "r.ppldref"
    assert main(["reference", "build", setup["paths"]["orig"], "--text", setup["text"], "--choices",
                 setup["path"], "--max-length", "32", "-o", str(ref), "--no-progress"]) == 0
    capsys.readouterr()
    entry = reffile.read_reference(ref).header["choices"]
    so = _oracle_scores(setup["orig"], setup["tok"], setup["items"])
    sq = _oracle_scores(setup["quant"], setup["tok"], setup["items"])
    assert entry["items_sha256"] == ch.items_sha256(setup["items"]) and entry["max_length"] == 64
    np.testing.assert_allclose(ch.stored_scores(entry, setup["items"]), so, rtol=1e-7)
    ans = np.array([it["answer"] for it in setup["items"]])
    po, pq = so.argmax(1), sq.argmax(1)
    b, c = int(((po == ans) & (pq != ans)).sum()), int(((po != ans) & (pq == ans)).sum())
    toks = tmp_path / "tok"
    assert main(["eval", str(ref), setup["paths"]["quant"], "--choices", setup["path"], "--format", "json",
                 "--no-progress", "--save-tokens", str(toks)]) == 0
    v = json.loads(capsys.readouterr().out)["variants"][0]
    f = v["flips"]
    with np.load(v["tokens_file"]) as z:  # --save-tokens with --choices: the per-token file too
        assert os.path.dirname(v["tokens_file"]) == str(toks) and z["quantized_log_probs"].size > 0
    assert (f["n"], f["flips"], f["right_to_wrong"], f["wrong_to_right"]) == (len(ans), int((po != pq).sum()), b, c)
    assert f["original_accuracy"] == float((po == ans).mean())
    assert f["quantized_accuracy"] == float((pq == ans).mean())
    assert b + c > 0  # the variant is coarse enough that the test can see flips at all
    # the text table has the line; the same flips from Python
    assert main(["eval", str(ref), setup["paths"]["quant"], "--choices", setup["path"], "--no-progress"]) == 0
    assert f"flips {f['flips']}/{f['n']}" in capsys.readouterr().out
    assert main(["eval", str(ref), setup["paths"]["quant"], "--no-progress"]) == 0  # without: a hint
    assert "30 multiple-choice items from mc.jsonl: --choices FILE adds flips" in capsys.readouterr().out
    fl = hf.choice_flips(setup["quant"], str(ref), setup["path"], tokenizer=setup["tok"], progress=False)
    assert (fl.flips, fl.right_to_wrong, fl.wrong_to_right) == (f["flips"], b, c)


def test_build_reuses_stored_scores_and_refusals(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.ppldref"
    kw = dict(texts=setup["text"], tokenizer=setup["tok"], out=out, max_length=32, progress=False)
    hf.build_reference(setup["orig"], choices=setup["path"], **kw)
    before = out.read_bytes()
    from ppldelta.hf import _choices

    def refuse(*a, **k):
        raise AssertionError("the scores were recomputed")

    monkeypatch.setattr(_choices, "run_pairs", refuse)
    hf.build_reference(setup["orig"], choices=setup["path"], **kw)  # finished, same items: reused
    assert out.read_bytes() == before
    monkeypatch.undo()
    # overwriting with another model scores again (the stored scores were another build's)
    hf.build_reference(setup["quant"], choices=setup["path"], resume=False, **kw)
    got = ch.stored_scores(reffile.read_reference(out).header["choices"], setup["items"])
    np.testing.assert_allclose(got, _oracle_scores(setup["quant"], setup["tok"], setup["items"]), rtol=1e-7)
    # another items file: eval refuses it (before any model loads), and a reference without scores
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"context": "the cat", "choices": ["sat", "ran"], "answer": 1}) + "\n")
    assert main(["eval", str(out), setup["paths"]["quant"], "--choices", str(other), "--no-progress"]) == 2
    assert "choice items differ" in capsys.readouterr().err
    plain = tmp_path / "plain.ppldref"
    hf.build_reference(setup["orig"], **dict(kw, out=plain))
    assert main(["eval", str(plain), setup["paths"]["quant"], "--choices", setup["path"], "--no-progress"]) == 2
    assert "holds no choice scores" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no choice scores"):
        hf.choice_flips(setup["quant"], str(plain), setup["path"], tokenizer=setup["tok"], progress=False)


@pytest.mark.parametrize("line,msg", [
    ("not json", ":1: not JSON"),
    ('{"context": 3, "choices": ["a", "b"], "answer": 0}', "context must be a string"),
    ('{"context": "x", "choices": ["a"], "answer": 0}', "two or more non-empty strings"),
    ('{"context": "x", "choices": ["a", ""], "answer": 0}', "two or more non-empty strings"),
    ('{"context": "x", "choices": ["a", "b"], "answer": 2}', "answer must be an index"),
    ('{"context": "x", "choices": ["a", "b"], "answer": true}', "answer must be an index"),
    ('[1, 2]', "a JSON object"),
    ("", "no items"),
])
def test_bad_items_refused(tmp_path, capsys, setup, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=msg):
        ch.read_items(str(p))
    assert main(["reference", "build", setup["paths"]["orig"], "--text", setup["text"], "--choices", str(p),
                 "-o", str(tmp_path / "r.ppldref"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg.lstrip(":1") in err and len(err.strip().splitlines()) == 1
