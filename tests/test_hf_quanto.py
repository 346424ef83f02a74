"""ppldelta.hf on a model quantized by a real tensor-subclass quantizer from PyPI (optimum-quanto,
which runs on the CPU): its forward needs autograd's version counters, which
torch.inference_mode() refuses.  Oracles: plain float64 loops over the same windows."""
import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # ppldelta.hf needs torch; the core's tests run without it
from transformers import LlamaConfig, LlamaForCausalLM

import ppldelta
from ppldelta import hf
from _models import word_tokenizer

quanto = pytest.importorskip("optimum.quanto")

V = 96
WORDS = ("the cat sat on a mat while dogs ran past quiet old houses near green fields and "
         "rivers under grey skies every morning before noon").split()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["qint8", "qint4"])
def quantized(request, original):
    m = copy.deepcopy(original)
    quanto.quantize(m, weights=getattr(quanto, request.param))
    quanto.freeze(m)
    assert isinstance(m.model.layers[0].mlp.up_proj.weight, quanto.QTensor)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def _texts(n=12, seed=3):
    r = np.random.default_rng(seed)
    return [" ".join(r.choice(WORDS, size=12)) for _ in range(n)]


def _windows_oracle(models, ids, L, S):
    """Sliding protocol, per target t: the window ending at min(L + k*S, N-1) that first reaches
    t, holding the L tokens before its end; full logits of each model, float64 log-softmax."""
    n = len(ids)
    rows = [[] for _ in models]
    cache = {}
    with torch.no_grad():
        for t in range(1, n):
            k = 0 if t <= L else -(-(t - L) // S)
            end = min(L + k * S, n - 1)
            start = max(0, end - L)
            if (start, end) not in cache:
                cache[(start, end)] = [m(ids[start:end][None]).logits[0].double() for m in models]
            for r, lg in zip(rows, cache[(start, end)]):
                r.append(lg[t - 1 - start])
    tg = ids[1:, None]
    lps = [torch.log_softmax(torch.stack(r), -1) for r in rows]
    return lps, [lp.gather(-1, tg)[:, 0].numpy() for lp in lps]


def test_score_and_evaluate_perplexity_on_quanto_model(quantized, tokenizer):
    texts = _texts()
    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    L, S = 32, 12
    _, (ref,) = _windows_oracle([quantized], ids, L, S)
    lp, proto = hf.score(quantized, ids, max_length=L, stride=S, batch_size=2, progress=False)
    assert proto.n_scored == len(ids) - 1 == lp.size
    np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
    res = hf.evaluate_perplexity(quantized, texts=texts, tokenizer=tokenizer, max_length=L, stride=S,
                                 progress=False)
    np.testing.assert_array_equal(res.log_probs, hf.token_log_probs(quantized, ids, max_length=L, stride=S,
                                                                    progress=False))
    assert res.perplexity == pytest.approx(math.exp(-float(np.mean(ref))), rel=1e-5)
    # a chunked protocol as well: gptq windows, each scoring all its tokens after the first
    lp_g, _ = hf.score(quantized, ids, max_length=L, protocol="gptq", progress=False)
    with torch.no_grad():
        ref_g = np.concatenate([
            torch.log_softmax(quantized(ids[c:c + L][None]).logits[0, :-1].double(), -1)
            .gather(-1, ids[c + 1:c + L, None])[:, 0].numpy() for c in range(0, len(ids) // L * L, L)])
    np.testing.assert_allclose(lp_g, ref_g, atol=1e-5, rtol=0)


def test_compare_models_with_quanto_model(original, quantized, monkeypatch):
    seen = {}
    real = ppldelta.analyze

    def spy(lo, lq, **kw):
        seen.update(kw, lo=np.array(lo), lq=np.array(lq))
        return real(lo, lq, **kw)

    monkeypatch.setattr(ppldelta.analysis, "analyze", spy)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (90,), generator=g)
    L, S = 24, 10
    rep = hf.compare_models(original, quantized, ids, max_length=L, stride=S, progress=False, n_bootstrap=50)
    (lo_all, lq_all), (lo, lq) = _windows_oracle([original, quantized], ids, L, S)
    kld = (lo_all.exp() * (lo_all - lq_all)).sum(-1).numpy()
    np.testing.assert_allclose(seen["lo"], lo, atol=1e-5, rtol=0)
    np.testing.assert_allclose(seen["lq"], lq, atol=1e-5, rtol=0)
    np.testing.assert_allclose(seen["kld"], kld, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(seen["same_top1"], (lo_all.argmax(-1) == lq_all.argmax(-1)).numpy())
    assert rep["n_tokens"] == 89 and kld.mean() > 0 and rep["kld"]["mean"] == pytest.approx(kld.mean(), abs=1e-6)
    # the quantized model's log-probs are those score() gives, bit for bit
    np.testing.assert_array_equal(seen["lq"], hf.token_log_probs(quantized, ids, max_length=L, stride=S,
                                                                 progress=False))
