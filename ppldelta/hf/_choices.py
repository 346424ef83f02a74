"""Multiple-choice scores of a model (``ppldelta.choices``' rule, lm-eval's ``loglikelihood``) and
the flips of a quantized model against the original's scores stored in a reference.  The pairs
run through the window loops every other evaluation uses (``run_windows``, or a GGUF model's
own), so batching, devices and the float64 log-probs are the same."""
from __future__ import annotations

import os

import numpy as np

from .. import choices as _ch
from . import _dist
from ._run import as_ids


def _row_log_probs(rows, targets):
    if isinstance(rows, np.ndarray):  # a model with its own loop hands NumPy rows
        from ..logits import token_log_probs

        return np.asarray(token_log_probs(rows, targets))
    from ._kl_torch import log_probs_rows

    return log_probs_rows(rows, targets)


def run_pairs(model, items, encode, prefix_token, max_length, *, batch_size=1, device=None,
              progress=False) -> np.ndarray:
    """The (items, choices) float64 scores of ``model`` (a torch causal LM, or a model with its
    own window loop) on ``items`` (``choices.read_items``), tokenized with ``encode``."""
    from ._reference import _own_loop, _token_bar

    ids, windows, pairs = _ch.layout(items, encode, prefix_token, max_length)
    offs = np.concatenate([[0], np.cumsum([w.b - w.a for w in windows])]).astype(np.int64)
    lps = np.empty(int(offs[-1]), dtype=np.float64)
    own = _own_loop(model)
    bar = _token_bar(windows, "choices", progress) if own is not None else None

    def on_rows(k, r0, r1, chunks, targets):
        o = int(offs[k]) + (r0 - windows[k].a)
        lps[o:o + (r1 - r0)] = _row_log_probs(chunks[0], targets)
        if bar is not None:
            bar.update(r1 - r0)

    try:
        if own is not None:  # a GGUF model's loop (NumPy ids and rows)
            own([model], ids, windows, batch_size=batch_size, device=device, on_rows=on_rows)
        else:  # sharded under torchrun like every other loop: each pair scored once, gathered
            _dist.run_windows([model], as_ids(ids), windows, batch_size=batch_size, device=device,
                              progress=progress, desc="choices", on_rows=on_rows, columns=[lps], offs=offs)
    finally:
        if bar is not None:
            bar.close()
    return _ch.scores_matrix(lps, windows, pairs, items)


def max_length_of(model, tokenizer=None) -> int:
    """lm-eval's max_length of a transformers model: the config's n_positions /
    max_position_embeddings / n_ctx, else the tokenizer's model_max_length when sane, else 2048."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return int(v) if isinstance(v, int) and 0 < v < 1_000_000_000 else 2048


def hf_encoder(tokenizer):
    """(encode, prefix token) of a Hugging Face tokenizer as lm-eval's HFLM uses it."""
    def encode(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return encode, bos if bos is not None else eos


def original_entry(model, out, header, choices, encode, prefix, max_length, *, batch_size=1, device=None,
                   progress=True) -> dict:
    """The header's ``choices`` entry of a build whose other entries are ``header``: the
    original's scores, or the ones that the killed build at ``out`` (``.part``) or a finished
    ``out`` of the same build (every other header entry equal) recorded for the same items and
    settings (so that a resumed build has the same header, whatever the device's rounding)."""
    from ..reffile import read_header
    from ._reference import _same_header

    items = _ch.read_items(choices)
    source = os.path.basename(os.fspath(choices)) if isinstance(choices, (str, os.PathLike)) else "list"
    stored = read_header(out) or {}
    old = stored.get("choices") or {}
    same_build = _same_header({**stored, "choices": None}, {**header, "choices": None}) is None
    if (same_build and old.get("items_sha256") == _ch.items_sha256(items) and old.get("max_length") == int(max_length)
            and old.get("prefix_token") == prefix and old.get("rule") == _ch.RULE and old.get("source") == source):
        return old
    s = run_pairs(model, items, encode, prefix, int(max_length), batch_size=batch_size, device=device,
                  progress=progress)
    return _ch.header_entry(items, s, max_length, prefix, source)


def score_choices(model, choices, *, tokenizer=None, max_length=None, batch_size=1, device=None,
                  progress=True) -> np.ndarray:
    """Per-choice log-likelihoods (items x most choices, float64, -inf padded) of a transformers
    causal LM on multiple-choice ``choices`` (a JSON Lines file or a list of dicts: see
    ``ppldelta.choices``), scored as lm-eval's ``loglikelihood`` requests with ``tokenizer``
    (default the model's own).  ``max_length``: default lm-eval's (the config's context)."""
    from ._reference import _tokenizer_for

    items = _ch.read_items(choices)
    tok = _tokenizer_for(tokenizer, model)
    encode, prefix = hf_encoder(tok)
    L = max_length_of(model, tok) if max_length is None else int(max_length)
    return run_pairs(model, items, encode, prefix, L, batch_size=batch_size, device=device, progress=progress)


def flips_against_reference(model, reference, choices, *, encode, prefix_token=None, batch_size=1,
                            device=None, progress=True, alpha=0.05):
    """``ppldelta.choice_flips`` of ``model`` against the original's scores stored in a reference
    (built with ``choices=``): the same items (checked by their sha256), the reference's
    max_length and prefix token, this model's tokenization (``encode``)."""
    from ..flips import choice_flips
    from ._reference import _open

    ref = _open(reference)
    entry = ref.header.get("choices")
    if not entry:
        raise ValueError("the reference holds no choice scores: build it with choices= (--choices FILE)")
    items = _ch.read_items(choices)
    so = _ch.stored_scores(entry, items)
    prefix = entry.get("prefix_token") if prefix_token is None else prefix_token
    sq = run_pairs(model, items, encode, prefix, int(entry["max_length"]), batch_size=batch_size,
                   device=device, progress=progress)
    return choice_flips(so, sq, [it["answer"] for it in items], alpha=alpha)


def choice_flips(model, reference, choices, *, tokenizer=None, batch_size=1, device=None, progress=True,
                 alpha=0.05):
    """Flips and McNemar's exact test (``ppldelta.FlipReport``) of a quantized transformers model
    against the original's choice scores stored in ``reference`` (``build_reference(choices=)``),
    with only ``model`` loaded; ``tokenizer``: default the model's own."""
    from ._reference import _tokenizer_for

    encode, _ = hf_encoder(_tokenizer_for(tokenizer, model))
    return flips_against_reference(model, reference, choices, encode=encode, batch_size=batch_size,
                                   device=device, progress=progress, alpha=alpha)
