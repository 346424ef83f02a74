"""Perplexity protocols: how a token sequence is cut into model windows, which predictions are
scored, and what each protocol records about itself.  NumPy only (no torch).

A protocol is one :class:`Spec` in :data:`SPECS`: its window plan, defaults (window length,
stride), BOS rule, text preparation (special tokens, joining), value kind and notes.  Everything
else reads it from here: ``ppldelta.hf`` (score, evaluate_perplexity, compare_models),
``ppldelta.llamacpp`` (the chunk layout of its files and of ``token_log_probs``) and
``scripts/make_demo_data.py``.  See ``docs/protocols.md`` for what each tool computes.

Adding a protocol is one entry in :data:`SPECS`, nothing else:

1. write its plan, ``plan(n, L, S, bos) -> list[Window]`` (``n`` tokens, window length ``L``,
   stride ``S`` or None, BOS id / False / None), raising ValueError for inputs the tool refuses;
2. write its notes, ``notes(windows, L, S, n, n_scored, bos_from) -> dict`` (at least ``"rule"``:
   one line saying what is scored and how it is averaged);
3. add ``Spec(name, summary, max_length, strided, writes_bos, add_special_tokens, plan, notes)``
   to ``SPECS``; ``per_token=False`` for a protocol whose values are per-window means.

Window ``k`` is the model input ``ids[start:end]`` (its first token replaced by ``bos`` when set);
it scores the logits at the absolute positions ``a .. b-1``, i.e. the targets ``a+1 .. b``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Window", "Spec", "SPECS", "PROTOCOLS", "get", "resolve", "plan", "notes",
           "offsets", "target_positions", "window_means", "chunk_first_scored", "chunk_rows", "chunks"]


@dataclass(frozen=True)
class Window:
    start: int  # input = ids[start:end] (first token replaced by ``bos`` when set)
    end: int
    a: int      # score the logits at absolute positions a .. b-1, i.e. the targets a+1 .. b
    b: int
    bos: int | None = None
    weight: int | None = None  # "hf": the weight the recipe gives this window's mean loss


@dataclass(frozen=True)
class Spec:
    """One protocol.  ``max_length``: default window / n_ctx / seqlen; ``strided``: takes a stride
    (default ``max_length // 2``), else disjoint chunks of ``max_length`` (no stride);
    ``writes_bos``: BOS is written over the first token of every window (needs a BOS id, or
    False for none); ``add_special_tokens``: how the tool tokenizes the text; ``join``: the
    separator of a list of texts; ``per_token``: the values are per-token log-probs (False:
    per-window mean log-probs)."""

    name: str
    summary: str
    max_length: int
    strided: bool
    writes_bos: bool
    add_special_tokens: bool
    plan: Callable[..., list]
    notes: Callable[..., dict]
    join: str = "\n\n"
    per_token: bool = True


# ---------------------------------------------------------------------------- llama.cpp layout
def chunk_first_scored(n_ctx: int) -> int:
    """First scored position of a llama.cpp chunk of ``n_ctx`` tokens (its second half)."""
    return n_ctx // 2


def chunk_rows(n_ctx: int) -> int:
    """Scored positions per llama.cpp chunk: ``n_ctx/2 .. n_ctx-2`` (each predicts the next)."""
    return n_ctx - 1 - chunk_first_scored(n_ctx)


def chunks(n: int, n_ctx: int, first: int, bos=None) -> list:
    """Disjoint chunks of ``n_ctx`` tokens (the tail dropped), scoring positions ``first ..
    n_ctx-2`` of each."""
    return [Window(c * n_ctx, (c + 1) * n_ctx, c * n_ctx + first, (c + 1) * n_ctx - 1, bos)
            for c in range(n // n_ctx)]


# ---------------------------------------------------------------------------- plans
def _check_stride(L, S):
    S = int(S)
    if not 1 <= S <= L:
        raise ValueError(f"stride must be in [1, max_length={L}], got {S}")
    return S


def _need_two(n):
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n}")


def _plan_sliding(n, L, S, bos):
    S = _check_stride(L, S)
    _need_two(n)
    wins, prev_b, k = [], 0, 0
    while prev_b < n - 1:
        b = min(L + k * S, n - 1)
        wins.append(Window(max(0, b - L), b, prev_b, b))
        prev_b, k = b, k + 1
    return wins


def _plan_hf(n, L, S, bos):
    S = _check_stride(L, S)
    _need_two(n)
    wins, prev_end = [], 0
    for begin in range(0, n, S):
        end = min(begin + L, n)
        first_target = max(prev_end, begin + 1)
        if first_target < end:
            # the recipe weighs the window's mean loss by (unmasked labels - 1), which is one
            # less than the tokens it scores whenever the first label is masked (stride < L)
            wins.append(Window(begin, end, first_target - 1, end - 1, weight=end - prev_end - 1))
        prev_end = end
        if end == n:
            break
    return wins


def _plan_llama_cpp(n, L, S, bos):
    if bos is None:
        raise ValueError("the llama.cpp protocol writes BOS over the first token of every chunk: "
                         "pass bos_token_id= (the model config has no bos_token_id), or "
                         "bos_token_id=False for a vocabulary that adds no BOS (llama.cpp then "
                         "keeps the chunk's own first token)")
    if L < 2:
        raise ValueError("n_ctx (max_length) must be >= 2")
    if n < 2 * L:
        raise ValueError(f"the llama.cpp protocol needs at least 2*n_ctx = {2 * L} tokens, "
                         f"got {n} (llama-perplexity refuses the same input)")
    return chunks(n, L, chunk_first_scored(L), None if bos is False else int(bos))


def _plan_gptq(n, L, S, bos):
    if L < 2:
        raise ValueError("seqlen (max_length) must be >= 2")
    if n < L:
        raise ValueError(f"the gptq protocol needs at least seqlen = {L} tokens, got {n}")
    return chunks(n, L, 0)


def _plan_window_mean(n, L, S, bos):
    S = _check_stride(L, S)
    return [Window(i, min(i + L, n), i, min(i + L, n) - 1) for i in range(0, n, S)]


# ---------------------------------------------------------------------------- notes
def _notes_sliding(windows, L, S, n, n_scored, bos_from):
    return {"min_context": L - S + 1,
            "rule": ("each target scored once; window k = ids[max(0,b_k-L):b_k], "
                     "b_k = min(L + k*stride, N-1); last logit of a window used")}


def _notes_hf(windows, L, S, n, n_scored, bos_from):
    return {"rule": ("HF fixed-length recipe: windows ids[k*stride:k*stride+L], overlap labels "
                     "masked, token-weighted mean"),
            "unscored_tokens": (n - 1) - n_scored}


def _notes_llama_cpp(windows, L, S, n, n_scored, bos_from):
    return {"n_chunk": len(windows), "first": chunk_first_scored(L), "dropped_tail": n - len(windows) * L,
            "rule": "llama-perplexity: chunks of n_ctx, BOS at chunk start, second half scored",
            "bos_replaced": bool(windows) and windows[0].bos is not None, "bos_from": bos_from}


def _notes_gptq(windows, L, S, n, n_scored, bos_from):
    return {"nsamples": len(windows), "dropped_tail": n - len(windows) * L,
            "rule": "GPTQ eval: non-overlapping seqlen windows, tail dropped, exp(mean nll)"}


def _notes_window_mean(windows, L, S, n, n_scored, bos_from):
    return {"rule": ("window-mean loop (the stride loop as commonly copied): windows at 0, stride, ...; "
                     "each window's mean loss over ALL its tokens (overlap re-scored), windows averaged "
                     "without token weights"),
            "values": "per-window mean log-probs (minus the window losses), not per-token",
            "window_sizes": [int(w.b - w.a) for w in windows]}


# ---------------------------------------------------------------------------- the table
SPECS = {s.name: s for s in (
    Spec("sliding", "ppldelta's default: every token after the first scored once, with as much left "
         "context as a window of max_length allows", 1024, True, False, False, _plan_sliding, _notes_sliding),
    Spec("hf", "the Hugging Face 'perplexity of fixed-length models' recipe", 1024, True, False, True,
         _plan_hf, _notes_hf),
    Spec("llama.cpp", "llama-perplexity: disjoint chunks of n_ctx, BOS written over each chunk's first "
         "token, second half scored", 512, False, True, True, _plan_llama_cpp, _notes_llama_cpp),
    Spec("gptq", "the GPTQ/AWQ evaluation loop: disjoint windows of seqlen, all tokens after the first",
         2048, False, False, True, _plan_gptq, _notes_gptq),
    Spec("window-mean", "the stride loop as commonly copied: the unweighted mean of window means "
         "(biased; for demonstration only)", 1024, True, False, True, _plan_window_mean,
         _notes_window_mean, per_token=False),
)}

#: The protocol names, in the order of the table.
PROTOCOLS = tuple(SPECS)

def get(name) -> Spec:
    """The Spec of protocol ``name`` (ValueError naming the known ones)."""
    spec = SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return spec


def resolve(name, max_length=None, stride=None):
    """(Spec, window length, stride or None) with the protocol's defaults filled in."""
    spec = get(name)
    L = spec.max_length if max_length is None else int(max_length)
    if spec.strided:
        S = max(1, L // 2) if stride is None else int(stride)
    else:
        S = None
        if stride is not None and int(stride) != L:
            raise ValueError(f"the {spec.name} protocol uses non-overlapping windows: leave stride unset")
    return spec, L, S


def plan(name, n, max_length, stride=None, bos=None) -> list:
    """The windows of protocol ``name`` over ``n`` tokens."""
    spec = name if isinstance(name, Spec) else get(name)
    L = int(max_length)
    if L < 1:
        raise ValueError("max_length must be >= 1")
    return spec.plan(int(n), L, stride, bos)


def notes(name, windows, max_length, stride, n, bos_from=None) -> dict:
    """What protocol ``name`` records about a run over ``windows`` (its ``rule`` and counts)."""
    spec = name if isinstance(name, Spec) else get(name)
    n_scored = sum(w.b - w.a for w in windows)
    return spec.notes(windows, max_length, stride, n, n_scored, bos_from)


def offsets(windows) -> np.ndarray:
    """Start of each window's scored values in the output (``len(windows) + 1`` int64)."""
    offs = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([w.b - w.a for w in windows], out=offs[1:])
    return offs


def target_positions(windows) -> np.ndarray:
    """Absolute index (into the token ids) of every scored target, in output order."""
    if not windows:
        return np.zeros(0, dtype=np.intp)
    return np.concatenate([np.arange(w.a + 1, w.b + 1, dtype=np.intp) for w in windows])


def window_means(values, windows) -> np.ndarray:
    """Per-window means of per-target ``values`` (NaN for a window with no target)."""
    offs = offsets(windows)
    with np.errstate(invalid="ignore"):
        return np.array([values[offs[k]:offs[k + 1]].mean() if offs[k + 1] > offs[k] else np.nan
                         for k in range(len(windows))], dtype=np.float64)
