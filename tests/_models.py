"""Tiny models and tokenizers built locally (no hub) for the tests of ppldelta.hf and the
reference path; needs torch and transformers (callers import this where torch is available)."""
import copy

import torch


def tiny_gpt2(seed=0, vocab=200):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def perturbed(model, scale=0.05, seed=123):
    """A copy of ``model`` with seeded Gaussian noise of ``scale`` added to every parameter."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m.eval()


def word_tokenizer(words):
    """A word-level fast tokenizer over ``words`` with [UNK] = 0 and <s> = 1 (BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>")
