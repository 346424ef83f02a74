"""Multiple-choice items scored by log-likelihood, as lm-eval's ``loglikelihood`` requests score
them: the data behind "flips where choice data is given" in ``ppldelta eval``.

One job: read and check the items, cut each (context, choice) pair into tokens the way lm-eval
does, lay the pairs out as windows of one token stream (so the models run through the same
window loops as everything else: ``ppldelta.hf._choices``), and sum the per-token log-probs into
one score per choice.  No torch here.

The items file is JSON Lines, one item per line::

    {"context": "The capital of France is", "choices": ["Paris", "Rome", "Oslo"], "answer": 0}

(``context`` a string, possibly empty; ``choices`` two or more non-empty strings; ``answer`` the
index of the right one; other keys are ignored): the file an lm-eval ``multiple_choice`` task
reads with ``doc_to_text: "{{context}}"``, ``doc_to_choice: "{{choices}}"``,
``doc_to_target: "{{answer}}"``, zero-shot.  The rule, lm-eval's: the request is (context,
" " + choice) (its default ``target_delimiter``); trailing whitespace of the context moves to
the continuation (``HFLM._encode_pair``); the continuation's tokens are those of
``encode(context + continuation)`` after the first ``len(encode(context))`` (no special
tokens); an empty context is the model's prefix token (BOS, else EOS); the input is the last
``max_length + 1`` tokens of context + continuation minus the last one
(``_loglikelihood_tokens``).  A choice's score is the float64 sum of its continuation
tokens' log-probs; the model picks the choice with the largest score (lm-eval's ``acc``; ties go
to the first).
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np

#: lm-eval's default target_delimiter: what goes between the context and each choice.
DELIMITER = " "
RULE = ("lm-eval multiple_choice loglikelihood: request (context, ' ' + choice); continuation = tokens "
        "of context+continuation after the context's "
        "(trailing context whitespace moved to the choice; no special tokens; empty context = "
        "prefix token), the last max_length tokens as input; score = float64 sum of the "
        "continuation's log-probs; acc = argmax (first on ties)")


def read_items(source) -> list[dict]:
    """The items of a JSON Lines file (a path) or of a list of dicts, checked: a ValueError names
    the line (or index) and what is wrong."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"choices: {path} is not a file")
        rows = []
        with open(path, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{no}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{no}: not JSON ({exc.msg})") from None
    else:
        rows = [(f"choices[{i}]", r) for i, r in enumerate(source)]
    items = []
    for where, r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: an item is a JSON object with context, choices and answer")
        ctx, ch, ans = r.get("context"), r.get("choices"), r.get("answer")
        if not isinstance(ctx, str):
            raise ValueError(f"{where}: context must be a string")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise ValueError(f"{where}: choices must be a list of two or more non-empty strings")
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
            raise ValueError(f"{where}: answer must be an index into choices (0 .. {len(ch) - 1}), got {ans!r}")
        items.append({"context": ctx, "choices": list(ch), "answer": ans})
    if not items:
        raise ValueError("choices: no items")
    return items


def items_sha256(items) -> str:
    """sha256 of the items' canonical JSON (context, choices, answer): what a reference records."""
    canon = [[it["context"], it["choices"], it["answer"]] for it in items]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def layout(items, encode, prefix_token, max_length):
    """(token stream, windows, pair index) of every (item, choice): each pair is its own window
    (``protocols.Window``) over its own stretch of the stream, scoring the continuation's tokens.
    ``encode(str) -> list of ids`` without special tokens; ``prefix_token``: the id an empty
    context becomes (None: refuse empty contexts)."""
    from .protocols import Window

    ids, windows, pairs = [], [], []
    for i, it in enumerate(items):
        ctx = it["context"]
        for j, ch in enumerate(it["choices"]):
            c, cont = ctx, DELIMITER + ch
            stripped = c.rstrip()
            if len(stripped) != len(c):  # lm-eval: the context's trailing whitespace goes to the choice
                cont, c = c[len(stripped):] + cont, stripped
            head = list(encode(c)) if c else []
            if head:
                whole = list(encode(c + cont))
                seq, n_cont = whole, len(whole) - len(head)
            else:
                if prefix_token is None:
                    raise ValueError(f"choices item {i}: an empty context needs a prefix token (BOS or EOS)")
                body = list(encode(cont))
                seq, n_cont = [int(prefix_token)] + body, len(body)
            if n_cont < 1:
                raise ValueError(f"choices item {i}, choice {j}: the choice adds no token to the context")
            if n_cont > max_length:
                raise ValueError(f"choices item {i}, choice {j}: {n_cont} continuation tokens exceed "
                                 f"max_length {max_length}")
            s0 = len(ids)
            ids.extend(int(t) for t in seq)
            end = s0 + len(seq) - 1  # the last token is a target, never an input
            windows.append(Window(max(s0, end - max_length), end, end - n_cont, end))
            pairs.append((i, j))
    return np.asarray(ids, dtype=np.int64), windows, pairs


def scores_matrix(token_lps, windows, pairs, items) -> np.ndarray:
    """(items, most choices) float64 scores: each pair's continuation log-probs summed with
    math.fsum (exactly rounded), -inf where an item has fewer choices."""
    out = np.full((len(items), max(len(it["choices"]) for it in items)), -np.inf)
    o = 0
    for w, (i, j) in zip(windows, pairs):
        n = w.b - w.a
        out[i, j] = math.fsum(token_lps[o:o + n])
        o += n
    return out


def header_entry(items, scores, max_length, prefix_token, source) -> dict:
    """The reference header's ``choices`` entry: what an evaluation needs to count flips without
    the original model (its scores; null where a score is -inf, which strict JSON cannot hold)."""
    return {"source": source, "items_sha256": items_sha256(items), "n_items": len(items),
            "answers": [it["answer"] for it in items], "max_length": int(max_length),
            "prefix_token": None if prefix_token is None else int(prefix_token), "rule": RULE,
            "scores": [[None if not math.isfinite(s) else float(s) for s in row[:len(it["choices"])]]
                       for row, it in zip(scores, items)]}


def stored_scores(entry, items) -> np.ndarray:
    """The original's scores of a header ``choices`` entry as a matrix (-inf padded), after
    checking that ``items`` are the ones it was built from."""
    if entry.get("items_sha256") != items_sha256(items):
        raise ValueError("not comparable with this reference: the choice items differ from the ones it "
                         f"was built with (items_sha256 {str(entry.get('items_sha256'))[:16]}... there)")
    out = np.full((len(items), max(len(it["choices"]) for it in items)), -np.inf)
    for i, row in enumerate(entry["scores"]):
        out[i, :len(row)] = [-np.inf if s is None else s for s in row]
    return out
