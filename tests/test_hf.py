"""ppldelta.hf on tiny randomly initialised GPT-2 / Llama models built from configs (no downloads)."""
import math
import subprocess
import sys
import re
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # ppldelta.hf needs torch; the core's tests run without it
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import ppldelta
from ppldelta import hf
from _models import perturbed, tiny_gpt2

V_GPT2 = 200
V_LLAMA = 150


def _gpt2(seed=0, vocab=V_GPT2):
    return tiny_gpt2(seed, vocab)


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V_LLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, gpt2, llama):
    return gpt2 if request.param == "gpt2" else llama


def _ids(n, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g)


def _vocab(model):
    return model.config.vocab_size


@torch.inference_mode()
def _all_lp(model, ids):
    """log_softmax (float64) of one forward over ids: row p predicts ids[p+1]."""
    logits = model(ids[None]).logits[0].double()
    return torch.log_softmax(logits, -1)


@torch.inference_mode()
def _lp_at(model, context, target):
    return float(torch.log_softmax(model(context[None]).logits[0, -1].double(), -1)[target])


def _perturbed(model, scale=0.05, seed=123):
    return perturbed(model, scale, seed)


# ---------------------------------------------------------------------------- sliding
@pytest.mark.parametrize("n", [2, 40, 64])
def test_sliding_single_window_equals_full_forward(tiny, n):
    ids = _ids(n, _vocab(tiny))
    lp, proto = hf.score(tiny, ids, max_length=64, stride=32, progress=False)
    ref = _all_lp(tiny, ids)[:-1].gather(-1, ids[1:, None]).squeeze(-1).numpy()
    assert lp.dtype == np.float64 and lp.shape == (n - 1,)
    np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
    assert proto.n_scored == n - 1 and proto.n_tokens == n and proto.notes["n_windows"] == 1
    assert hf.last_protocol is proto


def _sliding_reference(model, ids, L, S):
    """Independent per-token loop: target t is scored by the first window whose end reaches it;
    that window ends at min(L + k*S, N-1) and holds the L tokens before its end."""
    n = len(ids)
    out, ctx_len = [], []
    for t in range(1, n):
        k = 0 if t <= L else -(-(t - L) // S)
        end = min(L + k * S, n - 1)
        assert end >= t
        start = max(0, end - L)
        out.append(_lp_at(model, ids[start:t], int(ids[t])))
        ctx_len.append(t - start)
    return np.array(out), np.array(ctx_len)


@pytest.mark.parametrize("L,S,n", [(32, 16, 100), (30, 30, 100), (24, 7, 70), (48, 48, 40)])
def test_sliding_matches_per_token_bruteforce(tiny, L, S, n):
    ids = _ids(n, _vocab(tiny), seed=L + S + n)
    lp, proto = hf.score(tiny, ids, max_length=L, stride=S, progress=False)
    ref, ctx = _sliding_reference(tiny, ids, L, S)
    np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
    # exactly once, and every token after the first L sees at least L - S + 1 tokens of context
    assert proto.n_scored == n - 1 == lp.size
    assert np.all(ctx[L:] >= L - S + 1)
    assert np.all(ctx <= L)
    assert proto.notes["min_context"] == L - S + 1


def test_sliding_stride_equal_window_scores_every_token(gpt2):
    # disjoint windows: the first token of each window is predicted by the previous window's
    # last logit, so nothing is lost (the HF recipe drops one token per window here)
    ids = _ids(129, V_GPT2)
    lp, proto = hf.score(gpt2, ids, max_length=32, stride=32, progress=False)
    assert proto.n_scored == 128 and proto.notes["n_windows"] == 4
    hf_lp, hf_proto = hf.score(gpt2, ids, max_length=32, stride=32, protocol="hf", progress=False)
    assert hf_proto.n_scored == 128 - 4 and hf_proto.notes["unscored_tokens"] == 4


def test_input_types_batching_and_row_chunks(gpt2, monkeypatch):
    ids = _ids(150, V_GPT2)
    ref = hf.token_log_probs(gpt2, ids, max_length=32, stride=12, progress=False)
    for x in (ids.tolist(), ids.numpy(), ids[None], ids.numpy().astype(np.int32)):
        np.testing.assert_array_equal(hf.token_log_probs(gpt2, x, max_length=32, stride=12, progress=False), ref)
    for bs in (2, 5):
        np.testing.assert_allclose(hf.token_log_probs(gpt2, ids, max_length=32, stride=12, batch_size=bs,
                                                      progress=False), ref, atol=1e-5, rtol=0)
    monkeypatch.setattr(hf._kl_torch, "ROW_BUDGET", 3 * V_GPT2)  # 3 rows per log-softmax chunk
    np.testing.assert_allclose(hf.token_log_probs(gpt2, ids, max_length=32, stride=12, progress=False),
                               ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        hf.token_log_probs(gpt2, ids, max_length=32, stride=33, progress=False)
    with pytest.raises(ValueError):
        hf.token_log_probs(gpt2, ids[:1], max_length=32, progress=False)
    with pytest.raises(ValueError, match="n_positions"):
        hf.token_log_probs(gpt2, ids, max_length=100, progress=False)
    with pytest.raises(TypeError):
        hf.token_log_probs(gpt2, ids.float(), max_length=32, progress=False)


def test_progress_bar_runs(gpt2, capsys):
    lp = hf.token_log_probs(gpt2, _ids(80, V_GPT2), max_length=32, stride=16, progress=True)
    assert lp.size == 79


# ---------------------------------------------------------------------------- hf recipe
@torch.inference_mode()
def _hf_recipe(model, ids, max_length, stride):
    """The HF 'perplexity of fixed-length models' recipe, written out with labels=; returns the
    recipe's number (weights num_valid - 1) and the token-weighted one (weights = tokens the
    shifted loss really averages), with the number of scored tokens."""
    n = len(ids)
    recipe = [0.0, 0]
    exact = [0.0, 0]
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        inp = ids[begin:end][None]
        tgt = inp.clone()
        tgt[:, :-trg_len] = -100
        loss = float(model(inp, labels=tgt).loss)
        w = int((tgt != -100).sum()) - 1
        scored = int((tgt[:, 1:] != -100).sum())
        recipe[0] += loss * w
        recipe[1] += w
        exact[0] += loss * scored
        exact[1] += scored
        prev_end = end
        if end == n:
            break
    return math.exp(recipe[0] / recipe[1]), math.exp(exact[0] / exact[1]), exact[1]


@pytest.mark.parametrize("L,S", [(32, 16), (32, 32), (20, 7)])
def test_hf_protocol_reproduces_the_recipe(gpt2, L, S):
    ids = _ids(110, V_GPT2, seed=5)
    lp, proto = hf.score(gpt2, ids, max_length=L, stride=S, protocol="hf", progress=False)
    recipe, exact, n_tok = _hf_recipe(gpt2, ids, L, S)
    assert proto.n_scored == n_tok == lp.size
    assert ppldelta.perplexity(lp) == pytest.approx(exact, rel=1e-6)
    assert hf.hf_recipe_perplexity(gpt2, ids, L, S) == pytest.approx(recipe, rel=1e-6)
    if S < L:
        # the recipe's weights are one token short per window: a last-digits difference
        assert recipe != exact and recipe == pytest.approx(exact, rel=1e-2)
        # and the recipe scores what our sliding protocol scores with one token less of window,
        # except in the last window, which ours right-aligns (full context for the tail)
        sl = hf.token_log_probs(gpt2, ids, max_length=L - 1, stride=S, progress=False)
        np.testing.assert_allclose(lp[:-S], sl[:-S], atol=1e-5, rtol=0)
    else:
        assert recipe == pytest.approx(exact, rel=1e-9)
    # windows of different length in one batch (padding + attention mask)
    np.testing.assert_allclose(hf.token_log_probs(gpt2, ids, max_length=L, stride=S, protocol="hf",
                                                  batch_size=4, progress=False), lp, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- llama.cpp
@pytest.mark.parametrize("n_ctx,n", [(32, 100), (15, 47), (16, 32)])
def test_llama_cpp_protocol_hand_computation(tiny, n_ctx, n):
    ids = _ids(n, _vocab(tiny), seed=n_ctx)
    bos = 1
    lp, proto = hf.score(tiny, ids, max_length=n_ctx, protocol="llama.cpp", bos_token_id=bos, progress=False)
    first = n_ctx // 2
    n_chunk = n // n_ctx
    ref = []
    for c in range(n_chunk):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx].clone()
        chunk[0] = bos
        rows = _all_lp(tiny, chunk)
        for j in range(first, n_ctx - 1):
            ref.append(float(rows[j, chunk[j + 1]]))
    assert proto.n_scored == n_chunk * (n_ctx - 1 - n_ctx // 2) == lp.size
    np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
    assert proto.bos == bos and proto.notes["dropped_tail"] == n - n_chunk * n_ctx
    # the chunk's first token is overwritten by BOS: changing it changes nothing, BOS does
    ids2 = ids.clone()
    ids2[::n_ctx] = 7
    np.testing.assert_array_equal(hf.token_log_probs(tiny, ids2, max_length=n_ctx, protocol="llama.cpp",
                                                     bos_token_id=bos, progress=False), lp)
    other = hf.token_log_probs(tiny, ids, max_length=n_ctx, protocol="llama.cpp", bos_token_id=2, progress=False)
    assert not np.allclose(other, lp)


def test_llama_cpp_protocol_requirements(gpt2, llama):
    ids = _ids(63, V_GPT2)
    with pytest.raises(ValueError, match="2\\*n_ctx"):
        hf.score(gpt2, ids, max_length=32, protocol="llama.cpp", bos_token_id=1, progress=False)
    # BOS defaults to model.config.bos_token_id; an error when there is none
    lp, proto = hf.score(llama, _ids(64, V_LLAMA), max_length=32, protocol="llama.cpp", progress=False)
    assert proto.bos == 1 and proto.n_scored == 2 * 15
    m = _gpt2()
    m.config.bos_token_id = None
    with pytest.raises(ValueError, match="bos_token_id"):
        hf.score(m, _ids(64, V_GPT2), max_length=32, protocol="llama.cpp", progress=False)
    # a vocabulary that adds no BOS: llama.cpp keeps the chunk's own first token
    ids = _ids(64, V_GPT2)
    lp, proto = hf.score(m, ids, max_length=32, protocol="llama.cpp", bos_token_id=False, progress=False)
    assert proto.bos is None and proto.notes["bos_replaced"] is False
    ref = np.concatenate([_all_lp(m, ids[c * 32:(c + 1) * 32])[16:31].gather(-1, ids[c * 32 + 17:(c + 1) * 32, None])
                          .squeeze(-1).numpy() for c in range(2)])
    np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="stride"):
        hf.score(llama, _ids(64, V_LLAMA), max_length=32, stride=16, protocol="llama.cpp", progress=False)
    # default n_ctx is llama-perplexity's 512 (checked without running: 1023 tokens are too few)
    with pytest.raises(ValueError, match="1024 tokens"):
        hf.score(llama, _ids(1023, V_LLAMA), protocol="llama.cpp", progress=False)


# ---------------------------------------------------------------------------- gptq
@torch.inference_mode()
def _gptq_loop(model, ids, seqlen):
    """GPTQ's eval loop: loss * seqlen per window, exp(sum / (nsamples * seqlen))."""
    nsamples = len(ids) // seqlen
    nlls = []
    for i in range(nsamples):
        batch = ids[i * seqlen:(i + 1) * seqlen][None]
        logits = model(batch).logits
        shift_logits = logits[:, :-1, :]
        shift_labels = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
                                                 shift_labels.reshape(-1))
        nlls.append(loss.float() * seqlen)
    return float(torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen))), nsamples


@pytest.mark.parametrize("seqlen,n", [(32, 110), (64, 64)])
def test_gptq_protocol_hand_computation(tiny, seqlen, n):
    ids = _ids(n, _vocab(tiny), seed=seqlen + n)
    lp, proto = hf.score(tiny, ids, max_length=seqlen, protocol="gptq", progress=False)
    ppl, nsamples = _gptq_loop(tiny, ids, seqlen)
    assert proto.n_scored == nsamples * (seqlen - 1) == lp.size
    assert proto.notes["dropped_tail"] == n - nsamples * seqlen
    assert ppldelta.perplexity(lp) == pytest.approx(ppl, rel=2e-6)
    # per token: every window scores all its tokens after the first
    ref = np.concatenate([_all_lp(tiny, ids[i * seqlen:(i + 1) * seqlen])[:-1]
                          .gather(-1, ids[i * seqlen + 1:(i + 1) * seqlen, None]).squeeze(-1).numpy()
                          for i in range(nsamples)])
    np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
    if n % seqlen:  # the tail is dropped: changing it changes nothing
        ids2 = ids.clone()
        ids2[nsamples * seqlen:] = 3
        np.testing.assert_array_equal(hf.token_log_probs(tiny, ids2, max_length=seqlen, protocol="gptq",
                                                         progress=False), lp)
    with pytest.raises(ValueError, match="seqlen"):
        hf.score(tiny, ids[:seqlen - 1], max_length=seqlen, protocol="gptq", progress=False)


# ---------------------------------------------------------------------------- window-mean loop
class CacheLM(torch.nn.Module):
    """A causal "language model" for which context matters, without training: the logit of
    token v at position t is log(0.1 + how often v occurred at positions <= t in the window).
    On text whose vocabulary changes by topic it predicts well with long context and badly
    at the start of a window, like a real LM."""

    def __init__(self, vocab=64):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        counts = torch.nn.functional.one_hot(input_ids, self.vocab).cumsum(1).float()
        logits = torch.log(counts + 0.1) + self.dummy
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def topic_stream(n, vocab=64, topic_len=100, words=8, seed=2):
    r = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        w = r.choice(vocab, size=words, replace=False)
        out += list(r.choice(w, size=topic_len))
    return torch.tensor(out[:n])


@torch.inference_mode()
def _window_mean_literal(model, ids, max_length, stride):
    """The stride loop as commonly copied, as printed (with labels=, which it forgets)."""
    seq_len = len(ids)
    nlls = []
    for i in range(0, seq_len, stride):
        end_loc = min(i + max_length, seq_len)
        target_ids = ids[i:end_loc][None]
        nlls.append(model(target_ids, labels=target_ids).loss)
    return torch.exp(torch.stack(nlls).mean()).item(), nlls


@pytest.mark.parametrize("which", ["gpt2", "cache"])
def test_window_mean_loop_is_biased(gpt2, which):
    model = gpt2 if which == "gpt2" else CacheLM()
    ids = _ids(300, V_GPT2, seed=4) if which == "gpt2" else topic_stream(520)
    L, S = 32, 16
    wm_ppl = hf.window_mean_perplexity(model, ids, L, S)
    if which == "gpt2":  # the loop as commonly copied, literally (with labels=): exp(unweighted mean of window means)
        literal, nlls = _window_mean_literal(model, ids, L, S)
        assert wm_ppl == pytest.approx(literal, rel=1e-5)
    vals, proto = hf.score(model, ids, max_length=L, stride=S, protocol="window-mean", progress=False)
    assert wm_ppl == pytest.approx(math.exp(-np.mean(vals)), rel=1e-12)
    correct = ppldelta.perplexity(hf.token_log_probs(model, ids, max_length=L, stride=S, progress=False))
    assert abs(wm_ppl / correct - 1) > 1e-3

    # why: the same windows, each token counted once and token-weighted, is the HF recipe's
    # (= protocol "hf"); the loop counts the overlap twice (once with little context) and
    # weighs the short tail windows like full ones
    sizes = proto.notes["window_sizes"]
    assert sum(sizes) == proto.n_scored > len(ids) - 1
    assert sizes[0] == L - 1 and sizes[-1] < S
    per_token = hf.token_log_probs(model, ids, max_length=L, stride=S, protocol="hf", progress=False)
    dedup = ppldelta.perplexity(per_token)
    assert dedup != pytest.approx(wm_ppl, rel=1e-3)
    if which == "cache":
        # with a model that needs context, re-scoring the overlap from the window start inflates it
        assert wm_ppl > 1.1 * correct and wm_ppl > dedup
        lp_l = lambda **kw: ppldelta.perplexity(hf.token_log_probs(model, ids, progress=False, **kw))
        print(f"\n[tiny CacheLM, {len(ids)} tokens, L={L}] window-mean={wm_ppl:.4f} sliding(S={S})={correct:.4f} "
              f"sliding(S={L})={lp_l(max_length=L, stride=L):.4f} sliding(S=4)={lp_l(max_length=L, stride=4):.4f} "
              f"hf={dedup:.4f} gptq={lp_l(max_length=L, protocol='gptq'):.4f} "
              f"llama.cpp={lp_l(max_length=L, protocol='llama.cpp', bos_token_id=0):.4f} "
              f"windows={proto.notes['n_windows']} predictions={proto.n_scored}")


def test_docs_illustration_numbers():
    """The tiny-model table of docs/protocols.md (CacheLM is deterministic: no weights)."""
    m, ids = CacheLM(), topic_stream(520)

    def ppl(**kw):
        return round(ppldelta.perplexity(hf.token_log_probs(m, ids, max_length=32, progress=False, **kw)), 2)

    assert ppl(stride=4) == 15.34 and ppl(stride=16) == 15.72 and ppl(stride=32) == 21.56
    assert ppl(stride=16, protocol="hf") == 15.75 and round(hf.hf_recipe_perplexity(m, ids, 32, 16), 2) == 15.76
    assert ppl(stride=32, protocol="hf") == 21.95
    assert ppl(protocol="llama.cpp", bos_token_id=0) == 16.27 and ppl(protocol="gptq") == 21.69
    assert round(hf.window_mean_perplexity(m, ids, 32, 16), 2) == 21.54
    vals, proto = hf.score(m, ids, max_length=32, stride=16, protocol="window-mean", progress=False)
    sizes = np.array(proto.notes["window_sizes"])
    assert proto.n_scored == 991 and list(sizes[-4:]) == [31, 31, 23, 7]
    assert round(math.exp(-(vals * sizes).sum() / sizes.sum()), 2) == 21.02
    texts = [ids[0:150], ids[150:300], ids[300:450], ids[450:462]]
    lps = [hf.token_log_probs(m, t, max_length=32, stride=16, progress=False) for t in texts]
    per = [ppldelta.perplexity(lp) for lp in lps]
    assert [round(p, 2) for p in per] == [15.32, 15.19, 15.96, 47.23]
    assert round(float(np.mean(per)), 2) == 23.42 and round(ppldelta.perplexity(np.concatenate(lps)), 2) == 15.90


def test_window_mean_one_token_tail_window_is_nan(gpt2):
    ids = _ids(2 * 16 + 1, V_GPT2)  # a window starting at the last token has nothing to score
    ppl = hf.window_mean_perplexity(gpt2, ids, 32, 16)
    assert math.isnan(ppl)
    assert "NaN" in hf.last_protocol.notes["warning"]
    with pytest.raises(ValueError):
        hf.compare_models(gpt2, gpt2, ids, protocol="window-mean", progress=False)



# ---------------------------------------------------------------------------- evaluate_perplexity
SENTENCES = [
    "the cat sat on the mat and the dog sat on the log",
    "a quantized model loses a little quality on every token",
    "perplexity is the exponential of the mean negative log likelihood",
    "the quick brown fox jumps over the lazy dog again and again",
    "windows strides and tails make numbers differ between tools",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>",
                                   name_or_path="tiny-wordlevel-test")


def test_evaluate_perplexity_with_objects_list_and_file(gpt2, tokenizer, tmp_path):
    texts = SENTENCES * 3
    res = hf.evaluate_perplexity(gpt2, texts=texts, tokenizer=tokenizer, max_length=32, stride=16, progress=False)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    lp = hf.token_log_probs(gpt2, ids, max_length=32, stride=16, progress=False)
    np.testing.assert_array_equal(res.log_probs, lp)
    assert res.perplexity == pytest.approx(ppldelta.perplexity(lp), rel=1e-12)
    assert res.n_tokens == len(ids) - 1 == res.protocol.n_scored
    notes = res.protocol.notes
    assert notes["tokenizer"] == "tiny-wordlevel-test"
    assert notes["tokens_sha256"] == hf._load.ids_sha256(ids)
    assert notes["add_special_tokens"] is False and notes["join"] == "\n\n" and notes["n_texts"] == 15
    assert "PPL" in str(res)

    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(texts), encoding="utf-8")
    res_file = hf.evaluate_perplexity(gpt2, texts=str(f), tokenizer=tokenizer, max_length=32, stride=16,
                                      progress=False)
    assert res_file.perplexity == res.perplexity
    assert res_file.protocol.notes["text_source"].startswith("file:")
    with pytest.raises(FileNotFoundError):
        hf.evaluate_perplexity(gpt2, texts=str(tmp_path / "missing.txt"), tokenizer=tokenizer, progress=False)

    class FakeSplit:  # what evaluate_perplexity uses of a datasets.Dataset
        column_names = ["text"]
        split = "test"

        def __getitem__(self, key):
            return list(texts)

    res_ds = hf.evaluate_perplexity(gpt2, texts=FakeSplit(), tokenizer=tokenizer, max_length=32, stride=16,
                                    progress=False)
    assert res_ds.perplexity == res.perplexity

    # a different join (or tokenizer) gives other tokens, and the hash says so
    res_nl = hf.evaluate_perplexity(gpt2, texts=[t + "." for t in texts], tokenizer=tokenizer, max_length=32,
                                    stride=16, progress=False)
    assert res_nl.protocol.notes["tokens_sha256"] != notes["tokens_sha256"]


def test_loading_from_local_paths(gpt2, tokenizer, tmp_path):
    # the from_pretrained path of the evaluate_perplexity(model, quant_path) signature, offline: models saved to disk
    orig, quant_dir = tmp_path / "orig", tmp_path / "quant"
    gpt2.save_pretrained(orig)
    tokenizer.save_pretrained(orig)
    quant = _perturbed(gpt2)
    quant.save_pretrained(quant_dir)
    texts = SENTENCES * 3
    res = hf.evaluate_perplexity(str(orig), texts=texts, max_length=32, stride=16, progress=False)
    ref = hf.evaluate_perplexity(gpt2, texts=texts, tokenizer=tokenizer, max_length=32, stride=16, progress=False)
    assert res.perplexity == pytest.approx(ref.perplexity, rel=1e-6)
    assert res.protocol.notes["tokens_sha256"] == ref.protocol.notes["tokens_sha256"]
    assert res.protocol.notes["dtype"] == "torch.float32"
    res_q = hf.evaluate_perplexity(str(orig), str(quant_dir), texts=texts, max_length=32, stride=16, progress=False)
    ref_q = hf.evaluate_perplexity(quant, texts=texts, tokenizer=tokenizer, max_length=32, stride=16, progress=False)
    assert res_q.perplexity == pytest.approx(ref_q.perplexity, rel=1e-6)
    assert res_q.protocol.notes["model"] == str(quant_dir)
    table = hf.quantization_report(str(orig), {"q": str(quant_dir)}, texts, max_length=32, stride=16,
                                   progress=False, n_bootstrap=40)
    assert table["q"]["ratio"] == pytest.approx(res_q.perplexity / res.perplexity, rel=1e-6)


def test_an_encoder_loaded_as_a_causal_lm_is_refused(tmp_path, capsys):
    """transformers loads a BERT checkpoint through AutoModelForCausalLM as a BertLMHeadModel
    whose attention is bidirectional (it only warns): it sees the tokens it is scored on, and
    its "perplexity" is meaningless.  Refused, from an object and from a saved folder (the
    CLI's exit 2, one line); the same architecture with is_decoder=True is causal and scores.
    Oracle for causality: the earlier positions' logits with the last token changed."""
    import torch
    from transformers import BertConfig, BertLMHeadModel

    from ppldelta.cli import main

    ids = np.arange(2, 40) % 50
    for decoder in (False, True):
        torch.manual_seed(0)
        m = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64, initializer_range=0.3,
                                       is_decoder=decoder)).eval()  # weights of a trained model's scale
        x = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])
        with torch.no_grad():
            lg = m(input_ids=x).logits
        causal = bool(torch.equal(lg[0, :3], lg[1, :3]))
        assert causal == decoder
        if decoder:
            lp, _ = hf.score(m, ids, protocol="sliding", max_length=16, stride=8, progress=False)
            assert lp.size == ids.size - 1 and np.isfinite(lp).all()
            continue
        with pytest.raises(ValueError, match=r"BertLMHeadModel \(bert\) is not a causal language model"):
            hf.score(m, ids, protocol="sliding", max_length=16, stride=8, progress=False)
        m.save_pretrained(tmp_path / "bert")
        (tmp_path / "t.txt").write_text("hello world " * 20)
        tok = tmp_path / "bert"
        from _models import word_tokenizer
        word_tokenizer(["hello", "world"]).save_pretrained(tok)
        capsys.readouterr()  # save_pretrained's own progress bar
        assert main(["reference", "build", str(tmp_path / "bert"), "--text", str(tmp_path / "t.txt"),
                     "--max-length", "16", "-o", str(tmp_path / "b.ppldref"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a causal language model" in err[0], err
        assert not (tmp_path / "b.ppldref").exists()


def test_evaluate_perplexity_chunked_protocols(llama, tokenizer):
    texts = SENTENCES * 4
    res = hf.evaluate_perplexity(llama, texts=texts, tokenizer=tokenizer, max_length=32, protocol="llama.cpp",
                                 progress=False)
    ids = tokenizer("\n\n".join(texts))["input_ids"]  # the tool tokenizes with special tokens
    assert res.protocol.notes["add_special_tokens"] is True
    # this tokenizer adds no BOS, so llama.cpp keeps each chunk's first token (config's BOS unused)
    assert res.protocol.bos is None and res.protocol.notes["bos_from"] == "tokenizer"
    np.testing.assert_array_equal(res.log_probs, hf.token_log_probs(llama, ids, max_length=32, protocol="llama.cpp",
                                                                    bos_token_id=False, progress=False))
    res_g = hf.evaluate_perplexity(llama, texts=texts, tokenizer=tokenizer, max_length=32, protocol="gptq",
                                   progress=False)
    assert res_g.protocol.n_scored == (len(ids) // 32) * 31


def _wordlevel(add_bos):
    """A local tokenizer whose BOS "<s>" has id 2 (the tiny Llama's config says 1); with
    add_bos it puts "<s>" in front of every text, like Llama's, else it adds nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>"]))
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>")


@pytest.mark.parametrize("add_bos", [True, False])
def test_llama_cpp_bos_follows_the_tokenizer(llama, add_bos, monkeypatch):
    # llama-perplexity writes BOS over each chunk's first token only if the vocabulary adds one,
    # and then the vocabulary's BOS, whatever model.config.bos_token_id says
    tok = _wordlevel(add_bos)
    assert tok.bos_token_id == 2 and llama.config.bos_token_id == 1
    texts = SENTENCES * 4
    ids = torch.tensor(tok("\n\n".join(texts))["input_ids"])
    assert (int(ids[0]) == 2) == add_bos
    n_ctx = 32
    ref = []
    with torch.inference_mode():
        for c in range(len(ids) // n_ctx):
            chunk = ids[c * n_ctx:(c + 1) * n_ctx].clone()
            if add_bos:
                chunk[0] = 2
            rows = torch.log_softmax(llama(chunk[None]).logits[0].double(), -1)
            ref += [float(rows[j, chunk[j + 1]]) for j in range(n_ctx // 2, n_ctx - 1)]
    expect = 2 if add_bos else None
    res = hf.evaluate_perplexity(llama, texts=texts, tokenizer=tok, max_length=n_ctx, protocol="llama.cpp",
                                 progress=False)
    lp, proto = hf.score(llama, ids, max_length=n_ctx, protocol="llama.cpp", tokenizer=tok, progress=False)
    seen = _capture_analyze(monkeypatch)
    rep = hf.compare_models(llama, llama, ids, max_length=n_ctx, protocol="llama.cpp", tokenizer=tok,
                            progress=False, n_bootstrap=40)
    for p in (res.protocol, proto):
        assert p.bos == expect and p.notes["bos_replaced"] is add_bos and p.notes["bos_from"] == "tokenizer"
    assert rep["protocol"]["bos"] == expect
    for got in (res.log_probs, lp, seen["lo"]):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # an explicit bos_token_id still wins; without a tokenizer, model.config decides
    assert hf.score(llama, ids, max_length=n_ctx, protocol="llama.cpp", tokenizer=tok, bos_token_id=5,
                    progress=False)[1].bos == 5
    _, p_cfg = hf.score(llama, ids, max_length=n_ctx, protocol="llama.cpp", progress=False)
    assert p_cfg.bos == 1 and p_cfg.notes["bos_from"] == "model.config"


def test_tokenizer_bos_probe():
    class Flagged:  # no usable encode: the add_bos_token flag decides
        bos_token_id = 7

        def __init__(self, flag):
            self.add_bos_token = flag

        def encode(self, text, add_special_tokens=True):
            raise NotImplementedError

    assert hf._load.tokenizer_bos(Flagged(True)) == 7 and hf._load.tokenizer_bos(Flagged(False)) is False
    assert hf._load.tokenizer_bos(Flagged(None)) is None
    assert hf._load.tokenizer_bos(_wordlevel(True)) == 2 and hf._load.tokenizer_bos(_wordlevel(False)) is False


def test_texts_string_is_text_when_it_cannot_be_a_path(gpt2, tokenizer, tmp_path):
    text = "\n\n".join(SENTENCES * 3)
    res = hf.evaluate_perplexity(gpt2, texts=text, tokenizer=tokenizer, max_length=32, stride=16, progress=False)
    ref = hf.evaluate_perplexity(gpt2, texts=[text], tokenizer=tokenizer, max_length=32, stride=16, progress=False)
    np.testing.assert_array_equal(res.log_probs, ref.log_probs)
    assert res.protocol.notes["text_source"] == "string"
    one_line = " ".join(SENTENCES * 20)  # no line break, but longer than any path
    assert len(one_line) > 4096 and "\n" not in one_line
    res = hf.evaluate_perplexity(gpt2, texts=one_line, tokenizer=tokenizer, max_length=32, stride=16,
                                 progress=False)
    assert res.protocol.n_tokens == len(tokenizer(one_line, add_special_tokens=False)["input_ids"])
    # a short one-line string is a path: a missing file is an error that quotes at most ~80 chars
    long_name = "x" * 300
    with pytest.raises(FileNotFoundError, match="300 characters") as e:
        hf.evaluate_perplexity(gpt2, texts=long_name, tokenizer=tokenizer, progress=False)
    assert len(str(e.value)) < 200 and long_name not in str(e.value)
    with pytest.raises(FileNotFoundError, match="pass \\[text\\]"):
        hf.evaluate_perplexity(gpt2, texts="the cat sat on the mat", tokenizer=tokenizer, progress=False)


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_load_texts_string_rule(s):
    if "\n" in s or "\r" in s:
        assert hf._load.load_texts(s) == ([s], "string", False)
        return
    try:
        out = hf._load.load_texts(s)
    except (FileNotFoundError, ValueError, OSError) as e:  # ValueError: NUL in a path
        assert len(str(e)) < len(repr(s[:80])) + 120  # at most 80 characters of it quoted
        assert len(s) <= 80 or s not in str(e)
    else:  # an existing file (".", a directory, is not one)
        assert out[1].startswith("file:")


# ---------------------------------------------------------------------------- compare_models
def _capture_analyze(monkeypatch):
    seen = {}
    real = ppldelta.analyze

    def spy(lo, lq, **kw):
        seen.update(kw, lo=np.array(lo), lq=np.array(lq))
        return real(lo, lq, **kw)

    monkeypatch.setattr(ppldelta.analysis, "analyze", spy)
    return seen


def test_compare_identical_models(tiny):
    ids = _ids(100, _vocab(tiny))
    rep = hf.compare_models(tiny, tiny, ids, max_length=32, stride=16, progress=False, n_bootstrap=200)
    assert rep["kld"]["max"] < 1e-6
    assert rep["same_top1"]["pct"] == 100.0 and rep["top1_in_top5"] == 100.0
    assert rep.reference["relative_delta_pct"] == 0.0
    assert rep["n_tokens"] == 99
    assert rep["protocol"]["name"] == "sliding" and rep["protocol"]["n_scored"] == 99


@torch.inference_mode()
def _bruteforce_pairs(mo, mq, ids, L, S):
    """Full-logit reference for the sliding protocol: for each target, the window's logits of
    both models, then KL, agreement and log-probs in float64."""
    n = len(ids)
    rows_o, rows_q, tg = [], [], []
    cache = {}
    for t in range(1, n):
        k = 0 if t <= L else -(-(t - L) // S)
        end = min(L + k * S, n - 1)
        start = max(0, end - L)
        if (start, end) not in cache:
            cache[(start, end)] = (mo(ids[start:end][None]).logits[0], mq(ids[start:end][None]).logits[0])
        lo, lq = cache[(start, end)]
        rows_o.append(lo[t - 1 - start])
        rows_q.append(lq[t - 1 - start])
        tg.append(int(ids[t]))
    lo = torch.log_softmax(torch.stack(rows_o).double(), -1)
    lq = torch.log_softmax(torch.stack(rows_q).double(), -1)
    tg = torch.tensor(tg)
    kld = (lo.exp() * (lo - lq)).sum(-1)
    a = lo.argmax(-1)
    rank = (lq > lq.gather(-1, a[:, None])).sum(-1)
    return {"kld": kld.numpy(), "same": (a == lq.argmax(-1)).numpy(), "top5": (rank < 5).numpy(),
            "top10": (rank < 10).numpy(), "lo": lo.gather(-1, tg[:, None])[:, 0].numpy(),
            "lq": lq.gather(-1, tg[:, None])[:, 0].numpy()}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_compare_perturbed_matches_full_logit_bruteforce(tiny, monkeypatch, batch_size):
    ids = _ids(90, _vocab(tiny), seed=9)
    quant = _perturbed(tiny)
    seen = _capture_analyze(monkeypatch)
    monkeypatch.setattr(hf._kl_torch, "ROW_BUDGET", 7 * _vocab(tiny))  # several row chunks per window
    groups = np.where(np.arange(90) < 45, "first", "second")
    rep = hf.compare_models(tiny, quant, ids, max_length=24, stride=10, groups=groups, batch_size=batch_size,
                            progress=False, n_bootstrap=100)
    ref = _bruteforce_pairs(tiny, quant, ids, 24, 10)
    np.testing.assert_allclose(seen["kld"], ref["kld"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(seen["lo"], ref["lo"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(seen["lq"], ref["lq"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(seen["same_top1"], ref["same"])
    np.testing.assert_array_equal(seen["top1_in_top5"], ref["top5"])
    np.testing.assert_array_equal(seen["top1_in_top10"], ref["top10"])
    assert rep["kld"]["mean"] > 1e-4 and rep["kld"]["mean"] == pytest.approx(ref["kld"].mean(), abs=1e-6)
    assert rep["same_top1"]["pct"] == pytest.approx(100 * ref["same"].mean())
    assert rep.reference == ppldelta.perplexity_delta(ref["lo"], ref["lq"])
    # the label of the predicted token: targets 1..44 are "first", 45..89 "second"
    assert rep["groups"]["first"]["n_tokens"] == 44 and rep["groups"]["second"]["n_tokens"] == 45
    # the log-probs are those of score()
    np.testing.assert_allclose(seen["lo"], hf.token_log_probs(tiny, ids, max_length=24, stride=10, progress=False),
                               atol=1e-5, rtol=0)


def test_compare_other_protocols(gpt2, monkeypatch):
    ids = _ids(128, V_GPT2)
    quant = _perturbed(gpt2)
    seen = _capture_analyze(monkeypatch)
    for proto, kw in (("gptq", {}), ("llama.cpp", {"bos_token_id": 1}), ("hf", {"stride": 16})):
        rep = hf.compare_models(gpt2, quant, ids, max_length=32, protocol=proto, progress=False, n_bootstrap=50, **kw)
        lp_o = hf.token_log_probs(gpt2, ids, max_length=32, protocol=proto, progress=False, **kw)
        lp_q = hf.token_log_probs(quant, ids, max_length=32, protocol=proto, progress=False, **kw)
        assert rep["n_tokens"] == lp_o.size
        assert rep["protocol"]["name"] == proto
        # one log-prob computation behind both entry points: the same numbers, bit for bit
        np.testing.assert_array_equal(seen["lo"], lp_o)
        np.testing.assert_array_equal(seen["lq"], lp_q)
        assert rep["ppl_ratio"]["value"] == pytest.approx(math.exp(np.mean(lp_o) - np.mean(lp_q)), rel=1e-12)
        assert rep["ppl"]["original"]["value"] == pytest.approx(ppldelta.perplexity(lp_o), rel=1e-12)


def test_every_entry_point_gives_the_same_float64_log_probs(llama, tokenizer, monkeypatch):
    # evaluate_perplexity, score, token_log_probs and compare_models compute the log-probs the
    # same way (bit for bit), float64-accurate: a float32 log-softmax is off by up to ~1e-6
    texts = SENTENCES * 4
    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    quant = _perturbed(llama)
    kw = {"max_length": 24, "stride": 10, "progress": False}
    res = hf.evaluate_perplexity(llama, texts=texts, tokenizer=tokenizer, **kw)
    lp_s, _ = hf.score(llama, ids, **kw)
    lp_t = hf.token_log_probs(llama, ids, **kw)
    lq_t = hf.token_log_probs(quant, ids, **kw)
    seen = _capture_analyze(monkeypatch)
    rep = hf.compare_models(llama, quant, ids, n_bootstrap=40, **kw)
    for got in (lp_s, lp_t, seen["lo"]):
        np.testing.assert_array_equal(got, res.log_probs)
    np.testing.assert_array_equal(seen["lq"], lq_t)
    assert rep["ppl"]["original"]["value"] == pytest.approx(res.perplexity, rel=1e-12)
    # float64 log-softmax of every window's logits; the C kernel's float32 SIMD paths stay within
    # ~1.3e-7 of it, a float32 log-softmax misses by more than 3.5e-7 on some of these 215 tokens
    ref = _bruteforce_pairs(llama, quant, ids, 24, 10)
    np.testing.assert_allclose(res.log_probs, ref["lo"], atol=2.5e-7, rtol=0)
    np.testing.assert_allclose(seen["lq"], ref["lq"], atol=2.5e-7, rtol=0)
    assert res.perplexity == pytest.approx(math.exp(-float(np.mean(ref["lo"]))), rel=1e-8)


class _Recorder(torch.nn.Module):
    """Wraps a model; records every logits tensor it returns and checks, at each call, that the
    logits it returned before were already freed by the caller."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.max_numel = 0
        self.max_batch = 0
        self.alive_at_call = []
        self.rows = []
        self._refs = []

    @property
    def config(self):
        return self.inner.config

    def forward(self, input_ids=None, **kwargs):
        self.alive_at_call.append(sum(r() is not None for r in self._refs))
        out = self.inner(input_ids=input_ids, **kwargs)
        self.calls += 1
        self.max_numel = max(self.max_numel, out.logits.numel())
        self.max_batch = max(self.max_batch, out.logits.shape[0])
        self.rows.append(out.logits.shape[1])
        self._refs.append(weakref.ref(out.logits))
        return out


def test_compare_memory_one_window_batch_at_a_time(gpt2):
    ids = _ids(120, V_GPT2)
    ro, rq = _Recorder(gpt2), _Recorder(_perturbed(gpt2))
    L, S, bs = 32, 8, 2
    rep = hf.compare_models(ro, rq, ids, max_length=L, stride=S, batch_size=bs, progress=False, n_bootstrap=50)
    n_windows = rep["protocol"]["notes"]["n_windows"]
    assert ro.calls == rq.calls == -(-n_windows // bs)
    for r in (ro, rq):
        assert r.max_batch <= bs
        assert r.max_numel <= bs * L * V_GPT2   # one batch of windows, never (tokens x vocab)
        assert r.max_numel < len(ids) * V_GPT2
        assert max(r.alive_at_call) == 0         # each batch's logits dropped before the next forward
    # logits_to_keep: once past the first window only the last `stride` rows are computed
    assert ro.rows[0] == L and set(ro.rows[1:]) == {S}
    rs = _Recorder(gpt2)
    hf.token_log_probs(rs, ids, max_length=L, stride=S, progress=False)
    assert max(rs.alive_at_call) == 0 and rs.max_numel <= L * V_GPT2


def test_compare_torch_path_equals_c_kernels(gpt2, monkeypatch):
    # the path used for logits on an accelerator, forced on the CPU
    ids = _ids(70, V_GPT2)
    quant = _perturbed(gpt2)
    seen_c = _capture_analyze(monkeypatch)
    hf.compare_models(gpt2, quant, ids, max_length=24, stride=8, progress=False, n_bootstrap=40)
    seen_c = dict(seen_c)
    seen_t = _capture_analyze(monkeypatch)
    monkeypatch.setattr(hf._kl_torch, "kl_stats", hf._kl_torch.kl_stats_torch)
    hf.compare_models(gpt2, quant, ids, max_length=24, stride=8, progress=False, n_bootstrap=40)
    for k in ("kld", "lo", "lq"):
        np.testing.assert_allclose(seen_t[k], seen_c[k], atol=1e-5, rtol=0)
    for k in ("same_top1", "top1_in_top5", "top1_in_top10"):
        np.testing.assert_array_equal(seen_t[k], seen_c[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_upcast(dtype):
    m = _gpt2().to(dtype)
    ids = _ids(50, V_GPT2)
    lp = hf.token_log_probs(m, ids, max_length=64, progress=False)
    with torch.inference_mode():
        logits = m(ids[None]).logits[0, :-1]
    assert logits.dtype == dtype
    ref = torch.log_softmax(logits.double(), -1).gather(-1, ids[1:, None])[:, 0].numpy()
    np.testing.assert_allclose(lp, ref, atol=1e-6, rtol=0)
    rep = hf.compare_models(m, m, ids, max_length=64, progress=False, n_bootstrap=40)
    assert rep["kld"]["max"] < 1e-6 and rep["same_top1"]["pct"] == 100.0


def test_model_without_logits_to_keep(gpt2):
    class Strict(torch.nn.Module):  # takes **kwargs but rejects logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, **kwargs):
            if "logits_to_keep" in kwargs:
                raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
            return self.inner(input_ids=input_ids, **kwargs)

    ids = _ids(100, V_GPT2)
    np.testing.assert_allclose(hf.token_log_probs(Strict(gpt2), ids, max_length=32, stride=8, progress=False),
                               hf.token_log_probs(gpt2, ids, max_length=32, stride=8, progress=False),
                               atol=1e-6, rtol=0)


def test_nan_logits_error_names_the_position():
    class NaNAt13(torch.nn.Module):  # NaN logits where the input token is 13
        def forward(self, input_ids=None, **kwargs):
            class Out:
                pass

            out = Out()
            out.logits = torch.zeros(tuple(input_ids.shape) + (16,))
            out.logits[input_ids == 13] = float("nan")
            return out

    # windows [0:8] and [8:16]; token 13 is row 5 of the second one, which predicts input_ids[14]
    with pytest.raises(ValueError, match=r"row 5 .*input_ids\[9 \+ k\].*input_ids\[8:16\]"):
        hf.score(NaNAt13(), list(range(16)) + [0], max_length=8, stride=8, progress=False)


def test_kl_stats_torch_matches_c_kernels():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 301, generator=g) * 3
    b = a + 0.3 * torch.randn(37, 301, generator=g)
    b[5] = a[5]
    t = torch.randint(0, 301, (37,), generator=g)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x, y = a.to(dt), b.to(dt)
        mine = hf._kl_torch.kl_stats_torch(x, y)
        ref = ppldelta.kl_divergence(x, y, targets=t)
        np.testing.assert_allclose(mine["kld"], ref["kld"], atol=2e-5, rtol=1e-5, err_msg=f"kld {dt}")
        # the accelerator branch of the log-probs: float64, equal to the C kernel's
        oracle = torch.log_softmax(x.double(), -1).gather(-1, t[:, None])[:, 0].numpy()
        np.testing.assert_allclose(hf._kl_torch.log_probs_rows_torch(x, t), oracle, atol=1e-12, rtol=0)
        np.testing.assert_allclose(hf._kl_torch.log_probs_rows(x, t), oracle, atol=1e-6, rtol=0)
        for k in ("same_top1", "top1_in_top5", "top1_in_top10", "quantized_top1_in_original_top5",
                  "quantized_top1_in_original_top10"):
            if k in ref:
                np.testing.assert_array_equal(mine[k], ref[k], err_msg=f"{k} {dt}")
    out = hf._kl_torch.kl_stats_torch(a.view(37, 1, 301), b.view(37, 1, 301))
    assert out["kld"].shape == (37, 1) and "original_log_probs" not in out
    assert hf._kl_torch.kl_stats_torch(a[:0], b[:0])["same_top1"].dtype == bool


# ---------------------------------------------------------------------------- quantization_report
def test_quantization_report_rows(gpt2, tokenizer):
    texts = SENTENCES * 2
    domains = ["prose", "tech", "tech", "prose", "tech"] * 2
    quant = _perturbed(gpt2, scale=0.03)
    rep = hf.quantization_report(gpt2, {"identity": gpt2, "perturbed": quant}, texts, tokenizer=tokenizer,
                                 groups=domains, max_length=32, stride=16,
                                 expected={"identity": "fp16", "perturbed": "gptq-4"}, progress=False,
                                 n_bootstrap=100)
    assert [r["name"] for r in rep] == ["original", "identity", "perturbed"] and len(rep) == 3
    base, ident, pert = rep
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    lp_o = hf.token_log_probs(gpt2, ids, max_length=32, stride=16, progress=False)
    lp_q = hf.token_log_probs(quant, ids, max_length=32, stride=16, progress=False)
    assert base["perplexity"] == pytest.approx(ppldelta.perplexity(lp_o), rel=1e-12) and base["ratio"] == 1.0
    assert ident["ratio"] == 1.0 and ident["relative_delta_pct"] == 0.0
    assert ident["verdict"] == "within expected band"
    ratio = ppldelta.perplexity(lp_q) / ppldelta.perplexity(lp_o)
    assert pert["ratio"] == pytest.approx(ratio, rel=1e-9)
    assert pert["relative_delta_pct"] == ppldelta.perplexity_delta(lp_o, lp_q)["relative_delta_pct"]
    band = ppldelta.expected_band("gptq-4")
    assert pert["verdict"] == band.verdict(pert["ratio"]) and pert["expected_band"][:2] == (band.low, band.high)
    assert set(pert["group_deltas_pct"]) == {"prose", "tech"}
    assert rep["perturbed"] is pert and rep.groups == ["prose", "tech"]
    md = rep.to_markdown()
    assert md.splitlines()[0].startswith("| Variant | Perplexity")
    assert "| perturbed |" in md and "gptq-4" in md and "prose delta" in md
    assert rep.protocol.notes["tokens_sha256"] == hf._load.ids_sha256(ids)
    with pytest.raises(ValueError):
        hf.quantization_report(gpt2, {"q": quant}, texts, tokenizer=tokenizer, groups=["a"], progress=False)
    # the band as the ratio is shown (4 decimals: 1.02-1.06 had read as excluding a 1.0601 'within')
    assert f"gptq-4: {band.low:.4f}-{band.high:.4f}" in md


def test_quantization_report_checks_its_formats_before_any_model_runs(tmp_path):
    """A misspelt format failed only after the original and the first variant had been scored;
    a name that is no variant's was ignored (no band, no verdict).  Both are refused first: the
    original here is a path that does not exist, so any model work would fail differently."""
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="unknown"):
        hf.quantization_report(missing, {"q4": missing}, ["a b c"], expected="gguf-q4km", progress=False)
    with pytest.raises(ValueError, match=r"expected names \['q4_gptq'\], which are not variants \(\['q4'\]\)"):
        hf.quantization_report(missing, {"q4": missing}, ["a b c"], expected={"q4_gptq": "gptq-4"}, progress=False)


# ---------------------------------------------------------------------------- packaging
def test_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import ppldelta.hf as h; assert h.Protocol('sliding', 8, 4, 7, 8).n_scored == 7\n"
            "try:\n    h.token_log_probs(None, [1, 2])\nexcept ImportError as e:\n    print('ok', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


# ---------------------------------------------------------------------------- throughput (overlap, threads)
def _with_overlap(monkeypatch):
    """run_windows with the row work of batch i on the worker thread while batch i+1's forward runs
    (the accelerator default), forced on the CPU."""
    orig = hf._run.run_windows
    monkeypatch.setattr(hf._run, "run_windows", lambda *a, **k: orig(*a, **{**k, "overlap": True}))


@pytest.mark.parametrize("protocol", ["sliding", "hf", "gptq"])
def test_overlap_gives_the_same_bits_with_two_batches_alive_at_most(gpt2, monkeypatch, protocol):
    ids = _ids(150, V_GPT2)
    quant = _perturbed(gpt2)
    kw = dict(max_length=32, stride=None if protocol == "gptq" else 12, protocol=protocol, batch_size=2,
              progress=False)
    lp = hf.token_log_probs(gpt2, ids, **kw)
    # the oracle: ppldelta.token_log_probs (the C kernel) of each window's logits rows
    windows = ppldelta.protocols.plan(protocol, len(ids), 32, kw["stride"])
    with torch.no_grad():
        ref = np.concatenate([ppldelta.token_log_probs(
            gpt2(ids[None, w.start:w.end]).logits[0, w.a - w.start:w.b - w.start], ids[w.a + 1:w.b + 1])
            for w in windows])
    np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)  # batching changes the matmuls' last bits
    seen = _capture_analyze(monkeypatch)
    hf.compare_models(gpt2, quant, ids, n_bootstrap=40, **kw)
    before = dict(seen)
    _with_overlap(monkeypatch)
    rec = _Recorder(gpt2)
    np.testing.assert_array_equal(hf.token_log_probs(rec, ids, **kw), lp)
    assert rec.calls == -(-len(windows) // 2) and max(rec.alive_at_call) <= 1  # one batch in the worker's hands
    seen = _capture_analyze(monkeypatch)
    hf.compare_models(gpt2, quant, ids, n_bootstrap=40, **kw)
    for k in ("kld", "lo", "lq", "same_top1", "top1_in_top5", "top1_in_top10"):
        np.testing.assert_array_equal(seen[k], before[k], err_msg=k)


def test_overlap_error_surfaces_with_its_position_and_stops_the_rows(gpt2):
    ids = _ids(200, V_GPT2)
    windows = ppldelta.protocols.plan("gptq", len(ids), 16)
    called = []

    def on_rows(k, r0, r1, chunks, targets):
        called.append(k)
        if k == 3:
            raise ValueError("bad row 2")

    with pytest.raises(ValueError, match=r"bad row 2 \(row k of this chunk predicts input_ids\[49 \+ k\], "
                                         r"window 3 = input_ids\[48:64\]\)"):
        hf._run.run_windows([gpt2], ids, windows, batch_size=2, device=None, progress=False, desc="t",
                            on_rows=on_rows, overlap=True)
    assert called == [0, 1, 2, 3]  # batch (2, 3) failed: batch (4, 5)'s rows never ran
    done = []
    hf._run.run_windows([gpt2], ids, windows, batch_size=2, device=None, progress=False, desc="t",
                        on_rows=lambda k, *a: called.append(k), on_batch=done.append, overlap=True)
    assert called[4:] == list(range(len(windows))) and done == [30] * 6


def test_row_kernels_use_the_torch_threads_with_the_same_bits(gpt2, monkeypatch):
    ids = _ids(60, V_GPT2)
    with torch.no_grad():
        lo, lq = gpt2(ids[None]).logits[0, :-1], _perturbed(gpt2)(ids[None]).logits[0, :-1]
    one = (hf._kl_torch.log_probs_rows(lo, ids[1:]), hf._kl_torch.kl_stats(lo, lq))
    calls = []
    real = ppldelta._core.logits_stats
    monkeypatch.setattr(ppldelta._core, "logits_stats", lambda *a, **k: calls.append(k["threads"]) or real(*a, **k))
    torch.set_num_threads(2)  # the torch_one_thread fixture restores the count
    small = (hf._kl_torch.log_probs_rows(lo, ids[1:]), hf._kl_torch.kl_stats(lo, lq))
    assert calls == [1, 1]  # 59 x 200 logits: not worth a second thread
    monkeypatch.setattr(hf._kl_torch, "THREAD_GRAIN", 59 * V_GPT2 // 2)
    two = (hf._kl_torch.log_probs_rows(lo, ids[1:]), hf._kl_torch.kl_stats(lo, lq))
    assert calls == [1, 1, 2, 2]
    np.testing.assert_array_equal(small[0], two[0])
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[0], ppldelta.token_log_probs(lo, ids[1:]))
    for k in one[1]:
        np.testing.assert_array_equal(one[1][k], two[1][k], err_msg=k)


def test_token_ids_out_of_range_are_refused_before_a_forward():
    """-100 (a label's ignore_index) as an input id gave a silent NaN for its token, a uint64
    2**64 - 100 wrapped to it, and an id beyond the vocabulary an IndexError from the
    embedding: each is a ValueError naming the id and where."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = np.arange(40) % 60
    big = np.r_[ids, 0].astype(np.uint64)
    big[-1] = np.uint64(2 ** 64 - 100)
    for bad, msg in ((np.r_[ids, -100], "got -100 at index 40"), (big, "got 18446744073709551516 at index 40"),
                     (np.r_[ids[:10], 70, ids], "go up to 70, beyond the model's vocabulary (64 embeddings)")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            hf.score(m, bad, progress=False)
        with pytest.raises(ValueError, match=re.escape(msg)):
            hf.compare_models(m, m, bad, progress=False)
    assert np.isfinite(hf.score(m, ids, progress=False)[0]).all()
