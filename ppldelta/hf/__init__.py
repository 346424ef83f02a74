"""Per-token log-probs, perplexity and KL divergence of Hugging Face causal LMs.

The usual ``evaluate_perplexity`` helper done right, plus the protocols other tools use, so that
a number can be reproduced (or explained) instead of compared blindly.  See ``docs/protocols.md``.

Protocols (``protocol=``; their table is ``ppldelta.protocols``):

``"sliding"`` (default)
    Every token after the first is scored exactly once, with as much left context as a window
    of ``max_length`` tokens allows.  Window ``k`` is the input ``ids[s_k:b_k]`` with
    ``b_k = min(max_length + k*stride, N - 1)`` and ``s_k = max(0, b_k - max_length)``; it scores
    the targets ``b_{k-1}+1 .. b_k`` (``b_{-1} = 0``), i.e. its logits at the positions
    ``b_{k-1} .. b_k - 1`` (the last logit of a window predicts the token right after it).  Each
    window after the first advances by ``stride`` and scores only its new tokens; the last one is
    right-aligned (full context).  Every scored token sees at least ``max_length - stride + 1``
    tokens of context (fewer only at the start of the text).  Works for ``stride < max_length``,
    ``stride == max_length`` (disjoint windows, no token lost) and texts shorter than a window.
``"hf"``
    The Hugging Face "perplexity of fixed-length models" recipe exactly (windows
    ``ids[k*stride : k*stride + max_length]``, overlap labels masked, token-weighted): equal to
    ``"sliding"`` with ``max_length - 1`` when ``stride < max_length``; at ``stride ==
    max_length`` it never scores the first token of each window.
``"llama.cpp"``
    ``llama-perplexity``: non-overlapping chunks of ``n_ctx = max_length`` tokens (default 512;
    the tail is dropped), the first token of each chunk replaced by BOS (if the vocabulary
    adds one: the tokenizer decides, else ``model.config``), only the second half
    scored (positions ``n_ctx/2 .. n_ctx-2`` predicting ``n_ctx/2+1 .. n_ctx-1``); needs at least
    ``2*n_ctx`` tokens.
``"gptq"``
    The GPTQ/AWQ evaluation loop: non-overlapping windows of ``seqlen = max_length`` tokens
    (default 2048), tail dropped, each window scores all its tokens after the first.
``"window-mean"``
    The stride loop as commonly copied (unweighted mean of window means), biased, for
    demonstration only: see :func:`window_mean_perplexity`.

Modules, one job each: ``_run`` (running models over the windows of a protocol; score),
``_kl_torch`` (per-row statistics of logit chunks: C kernels on the CPU, the torch twin on an
accelerator), ``_load`` (texts, tokenizers, models), ``_reports`` (evaluate_perplexity,
compare_models, quantization_report), ``_reference`` (build_reference: the original scored once
into a reference file; evaluate_against_reference: a quantized model against it), ``_choices``
(multiple-choice scores as lm-eval's loglikelihood, and flips against a reference).  torch, transformers and tqdm are imported lazily
(``pip install ppldelta[hf]``).
"""
from __future__ import annotations


from ..protocols import PROTOCOLS
from ._reports import (PerplexityResult, QuantizationReport, compare_models, evaluate_perplexity,
                       quantization_report)
from ._run import Protocol, hf_recipe_perplexity, score, token_log_probs, window_mean_perplexity
from ._reference import build_reference, compare_to_reference, evaluate_against_reference
from ._choices import choice_flips, score_choices
from . import _run

__all__ = [
    "Protocol",
    "PerplexityResult",
    "QuantizationReport",
    "PROTOCOLS",
    "score",
    "token_log_probs",
    "window_mean_perplexity",
    "hf_recipe_perplexity",
    "evaluate_perplexity",
    "quantization_report",
    "compare_models",
    "build_reference",
    "evaluate_against_reference",
    "compare_to_reference",
    "score_choices",
    "choice_flips",
    "last_protocol",
]


def __getattr__(name):
    # last_protocol: the Protocol of the most recent token_log_probs / score call (convenience
    # for interactive use; not thread-safe: prefer the Protocol that score returns)
    if name == "last_protocol":
        return _run._last[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
