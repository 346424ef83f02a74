"""ppldelta vs the Hugging Face "perplexity of fixed-length models" recipe, written out below as
the transformers documentation prints it, on the GGUF model as transformers loads it.

transformers computes ``outputs.loss`` in float32 whatever the model's dtype (``ForCausalLMLoss``
upcasts with ``logits.float()``): on this model's 49,152-entry vocabulary that float32
log-sum-exp lowers every window's mean loss by about 1e-5 nats.  So the recipe runs twice:

- float64 model with the same loss computed in float64 (``model.loss_function`` swapped for
  the float64 twin below; the loop itself unchanged): ``ppldelta.hf.hf_recipe_perplexity``
  equals it to 1e-9 relative, and the ``"hf"`` protocol's token-weighted perplexity of the same
  windows is reported next to it (it weighs each window by the tokens it scores, the recipe by
  one fewer after the first window);
- float32 with transformers' own loss: equal within 5e-5 relative (the float32 loss)."""
import math

import numpy as np
import pytest

MAX_LENGTH, STRIDE, N_CHARS = 512, 256, 8000


@pytest.fixture(scope="session")
def hf_model64(cfg):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name)
    model = AutoModelForCausalLM.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name, dtype=torch.float32)
    return model.to(torch.float64).eval(), tok


def _loss_float64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                  **kwargs):
    """transformers' ForCausalLMLoss without its float32 upcast (mean over the unmasked labels)."""
    import torch.nn.functional as F

    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index)


def _recipe(model, encodings, max_length, stride):
    """The loop of https://huggingface.co/docs/transformers/perplexity, verbatim but for tqdm
    and the device."""
    import torch

    seq_len = encodings.input_ids.size(1)

    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100

        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)

            # loss is calculated using CrossEntropyLoss which averages over valid labels
            # N.B. the model only calculates loss over trg_len - 1 labels, because it internally shifts the labels
            # to the left by 1.
            neg_log_likelihood = outputs.loss

        # Accumulate the total negative log-likelihood and the total number of tokens
        num_valid_tokens = (target_ids != -100).sum().item()  # number of valid tokens in target_ids
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break

    avg_nll = nll_sum / n_tokens  # average negative log-likelihood per token
    ppl = torch.exp(avg_nll)
    return float(ppl)


def test_hf_recipe_equals_ppldelta(text, hf_model64, table):
    import ppldelta
    from ppldelta import hf

    model, tok = hf_model64
    raw = text[0][:N_CHARS]
    encodings = tok(raw, return_tensors="pt")
    model.loss_function = _loss_float64
    try:
        want = _recipe(model, encodings, MAX_LENGTH, STRIDE)
    finally:
        del model._loss_function  # the property falls back to transformers' loss
    got = hf.hf_recipe_perplexity(model, encodings.input_ids, max_length=MAX_LENGTH, stride=STRIDE)
    assert got == pytest.approx(want, rel=1e-9), (want, got)
    table.add("transformers docs recipe (float64 model and loss)", f"hf, max_length {MAX_LENGTH}, stride {STRIDE}",
              "PPL as the recipe weighs windows", want, got, "rel 1e-9")
    lp, proto = hf.score(model, encodings.input_ids, protocol="hf", max_length=MAX_LENGTH, stride=STRIDE,
                         progress=False)
    token_weighted = ppldelta.perplexity(lp)
    table.add("transformers docs recipe (float64 model and loss)", f"hf, max_length {MAX_LENGTH}, stride {STRIDE}",
              "token-weighted PPL of the same windows (protocol='hf')", want, token_weighted,
              "reported, not asserted")
    assert abs(math.log(token_weighted / want)) < 1e-3  # the recipe's weights move only the last digits
    # float32, transformers' own float32 loss
    import torch

    m32 = model.to(torch.float32)
    try:
        want32 = _recipe(m32, encodings, MAX_LENGTH, STRIDE)
        got32 = hf.hf_recipe_perplexity(m32, encodings.input_ids, max_length=MAX_LENGTH, stride=STRIDE)
    finally:
        model.to(torch.float64)
    assert got32 == pytest.approx(want32, rel=5e-5), (want32, got32)
    table.add("transformers docs recipe (float32, transformers' loss)", f"hf, max_length {MAX_LENGTH}, stride {STRIDE}",
              "PPL as the recipe weighs windows", want32, got32, "rel 5e-5")
    assert np.isfinite(want) and proto.n_scored > 0
