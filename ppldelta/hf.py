"""Per-token log-probs, perplexity and KL divergence of Hugging Face causal LMs.

Seed 001's ``evaluate_perplexity`` done right, plus the protocols other tools use, so that a
number can be reproduced (or explained) instead of compared blindly.  See ``docs/protocols.md``.

Protocols (``protocol=``):

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
``"seed001"``
    Seed 001's biased loop, for demonstration only: see :func:`seed001_perplexity`.

torch, transformers and tqdm are imported lazily (``pip install ppldelta[hf]``).
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "Protocol",
    "PerplexityResult",
    "QuantizationReport",
    "PROTOCOLS",
    "score",
    "token_log_probs",
    "seed001_perplexity",
    "hf_recipe_perplexity",
    "evaluate_perplexity",
    "quantization_report",
    "compare_models",
    "last_protocol",
]

PROTOCOLS = ("sliding", "hf", "llama.cpp", "gptq", "seed001")
_DEFAULT_LENGTH = {"sliding": 1024, "hf": 1024, "llama.cpp": 512, "gptq": 2048, "seed001": 1024}

# Elements of a (rows x vocab) temporary per row chunk (64 MiB in float32, 128 MiB in float64):
# bounds the memory of the log-softmax / KL step independently of the window length and the vocabulary.
_ROW_BUDGET = 1 << 24

#: The Protocol of the most recent :func:`token_log_probs` / :func:`score` call (convenience
#: for interactive use; not thread-safe: prefer the Protocol that :func:`score` returns).
last_protocol = None


@dataclass
class Protocol:
    """How per-token log-probs were produced (store it next to any number you publish).

    ``n_tokens``: tokens in the input; ``n_scored``: predictions averaged (for ``"seed001"`` this
    counts the overlap as often as the loop scores it); ``bos``: the token id written over the
    first token of every window (``"llama.cpp"``), else None; ``notes``: everything else
    (window count, minimum context, hash of the token ids, tokenizer, ...)."""

    name: str
    max_length: int
    stride: int | None
    n_scored: int
    n_tokens: int
    bos: int | None = None
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Window:
    start: int  # input = ids[start:end] (first token replaced by ``bos`` when set)
    end: int
    a: int      # score the logits at absolute positions a .. b-1, i.e. the targets a+1 .. b
    b: int
    bos: int | None = None
    weight: int | None = None  # "hf": the weight the recipe gives this window's mean loss


# ---------------------------------------------------------------------------- lazy imports
def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("ppldelta.hf needs PyTorch: pip install 'ppldelta[hf]'") from e
    return torch


def _progress(total, desc, enabled, unit="win"):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            pass
    return None


# ---------------------------------------------------------------------------- plans
def _plan(protocol, n, max_length, stride, bos):
    """The windows of a protocol over ``n`` tokens."""
    L = int(max_length)
    if L < 1:
        raise ValueError("max_length must be >= 1")
    if protocol in ("sliding", "hf", "seed001"):
        S = int(stride)
        if not 1 <= S <= L:
            raise ValueError(f"stride must be in [1, max_length={L}], got {S}")
    wins = []
    if protocol == "sliding":
        if n < 2:
            raise ValueError(f"need at least 2 tokens to score one, got {n}")
        prev_b, k = 0, 0
        while prev_b < n - 1:
            b = min(L + k * S, n - 1)
            wins.append(_Window(max(0, b - L), b, prev_b, b))
            prev_b, k = b, k + 1
    elif protocol == "hf":
        if n < 2:
            raise ValueError(f"need at least 2 tokens to score one, got {n}")
        prev_end = 0
        for begin in range(0, n, S):
            end = min(begin + L, n)
            first_target = max(prev_end, begin + 1)
            if first_target < end:
                # the recipe weighs the window's mean loss by (unmasked labels - 1), which is one
                # less than the tokens it scores whenever the first label is masked (stride < L)
                wins.append(_Window(begin, end, first_target - 1, end - 1, weight=end - prev_end - 1))
            prev_end = end
            if end == n:
                break
    elif protocol == "llama.cpp":
        if bos is None:
            raise ValueError("the llama.cpp protocol writes BOS over the first token of every chunk: "
                             "pass bos_token_id= (the model config has no bos_token_id), or "
                             "bos_token_id=False for a vocabulary that adds no BOS (llama.cpp then "
                             "keeps the chunk's own first token)")
        if bos is False:
            bos = None
        if L < 2:
            raise ValueError("n_ctx (max_length) must be >= 2")
        if n < 2 * L:
            raise ValueError(f"the llama.cpp protocol needs at least 2*n_ctx = {2 * L} tokens, "
                             f"got {n} (llama-perplexity refuses the same input)")
        first = L // 2
        for c in range(n // L):
            s = c * L
            wins.append(_Window(s, s + L, s + first, s + L - 1, None if bos is None else int(bos)))
    elif protocol == "gptq":
        if L < 2:
            raise ValueError("seqlen (max_length) must be >= 2")
        if n < L:
            raise ValueError(f"the gptq protocol needs at least seqlen = {L} tokens, got {n}")
        for c in range(n // L):
            s = c * L
            wins.append(_Window(s, s + L, s, s + L - 1))
    elif protocol == "seed001":
        for i in range(0, n, S):
            e = min(i + L, n)
            wins.append(_Window(i, e, i, e - 1))
    else:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return wins


def _target_positions(windows):
    """Absolute index (into input_ids) of every scored target, in output order."""
    if not windows:
        return np.zeros(0, dtype=np.intp)
    return np.concatenate([np.arange(w.a + 1, w.b + 1, dtype=np.intp) for w in windows])


# ---------------------------------------------------------------------------- helpers
def _as_ids(input_ids):
    torch = _torch()
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:  # BatchEncoding / dict
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, torch.Tensor):
        t = input_ids.detach().to("cpu")
    else:
        t = torch.as_tensor(np.asarray(input_ids))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"input_ids must be one sequence (1-D, or 2-D with one row), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {t.dtype}")
    return t.to(torch.long).contiguous()


def _ids_sha256(ids) -> str:
    a = np.ascontiguousarray(np.asarray(ids, dtype="<i8"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def _model_device(model):
    torch = _torch()
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _accepts(model, name):
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_positions(model, longest):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    hard = getattr(cfg, "n_positions", None)  # learned absolute positions (GPT-2 & co.)
    if isinstance(hard, int) and longest > hard:
        raise ValueError(f"windows of {longest} tokens exceed the model's n_positions = {hard}: "
                         "pass a smaller max_length")
    soft = getattr(cfg, "max_position_embeddings", None)
    if isinstance(soft, int) and longest > soft and hard is None:
        warnings.warn(f"windows of {longest} tokens exceed max_position_embeddings = {soft}", stacklevel=3)


def _forward_logits(model, x, mask, first_row, use_keep, use_cache_kw):
    """Logits of one batch of windows from window-relative row ``first_row`` on (rows before it
    are not needed; ``logits_to_keep`` spares computing them when the model takes it).
    Returns (logits, first) where first is the window-relative position of logits[:, 0]."""
    kwargs = {"input_ids": x}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if use_cache_kw:
        kwargs["use_cache"] = False
    if use_keep[0] and first_row > 0:
        kwargs["logits_to_keep"] = x.shape[1] - first_row
    try:
        out = model(**kwargs)
    except TypeError as e:  # forward(**kwargs) that does not know logits_to_keep after all
        if "logits_to_keep" not in kwargs or "logits_to_keep" not in str(e):
            raise
        use_keep[0] = False
        del kwargs["logits_to_keep"]
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    del out
    if logits.dim() != 3 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(x.shape)}")
    first = x.shape[1] - logits.shape[1]
    if first not in (0, first_row):
        raise ValueError(f"model returned {logits.shape[1]} logit rows for {x.shape[1]} input tokens")
    return logits, first


def _run_windows(models, ids, windows, *, batch_size, device, progress, desc, on_rows):
    """Run ``models`` in lock step over ``windows`` (``batch_size`` windows per forward) and call
    ``on_rows(window_index, r0, r1, [logits rows of each model], targets)`` for every row chunk
    of the scored positions ``r0 .. r1-1`` (absolute).  Only one batch's logits are alive at a
    time: every reference is dropped before the next forward."""
    torch = _torch()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    devs = [torch.device(device) if device is not None else _model_device(m) for m in models]
    use_keep = [[_accepts(m, "logits_to_keep")] for m in models]  # mutable: turned off on TypeError
    use_cache = [_accepts(m, "use_cache") for m in models]
    longest = max((w.end - w.start for w in windows), default=0)
    for m in models:
        if hasattr(m, "eval"):
            m.eval()
        _check_positions(m, longest)
    bar = _progress(len(windows), desc, progress)
    t0 = time.perf_counter()
    done = 0
    try:
        # no_grad, not inference_mode: tensor-subclass quantizers (optimum-quanto, torchao) set
        # version counters in their forward, which inference tensors refuse
        with torch.no_grad():
            for i0 in range(0, len(windows), batch_size):
                batch = windows[i0:i0 + batch_size]
                T = max(w.end - w.start for w in batch)
                x = torch.zeros((len(batch), T), dtype=torch.long)
                padded = False
                for j, w in enumerate(batch):
                    n = w.end - w.start
                    x[j, :n] = ids[w.start:w.end]
                    if w.bos is not None:
                        x[j, 0] = w.bos
                    padded |= n < T
                mask = None
                if padded:  # right padding: real tokens never attend to it (causal), mask anyway
                    mask = torch.zeros((len(batch), T), dtype=torch.long)
                    for j, w in enumerate(batch):
                        mask[j, :w.end - w.start] = 1
                first_row = min(w.a - w.start for w in batch)  # window rows before it are unused
                outs = []
                for m, dev, uk, uc in zip(models, devs, use_keep, use_cache):
                    outs.append(_forward_logits(m, x.to(dev), None if mask is None else mask.to(dev),
                                                first_row, uk, uc))
                vocab = outs[0][0].shape[-1]
                rows = max(1, _ROW_BUDGET // max(1, vocab))
                for j, w in enumerate(batch):
                    for r0 in range(w.a, w.b, rows):
                        r1 = min(r0 + rows, w.b)
                        chunks = [lg[j, r0 - w.start - f:r1 - w.start - f] for lg, f in outs]
                        try:
                            on_rows(i0 + j, r0, r1, chunks, ids[r0 + 1:r1 + 1])
                        except ValueError as e:  # the kernels count rows from r0: say where that is
                            raise ValueError(f"{e} (row k of this chunk predicts input_ids[{r0 + 1} + k], "
                                             f"window {i0 + j} = input_ids[{w.start}:{w.end}])") from e
                        del chunks
                del outs, x, mask  # drop this batch's logits before the next forward
                done += sum(w.end - w.start for w in batch)
                if bar is not None:
                    bar.update(len(batch))
                    dt = time.perf_counter() - t0
                    if dt > 0:
                        bar.set_postfix(tok_s=f"{done / dt:,.0f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()


def _log_probs_rows(logits_rows, targets):
    """log_softmax(logits_rows)[row, target] as float64 numpy: the one computation of per-token
    log-probs behind every entry point (score, token_log_probs, evaluate_perplexity,
    compare_models, quantization_report), so that they agree bit for bit on the same logits.
    CPU logits go through the C kernel (``ppldelta.token_log_probs``, float64 accumulation);
    logits on an accelerator are upcast to float64 there (MPS, which has no float64, copies the
    row chunk to the CPU kernel)."""
    import ppldelta

    if logits_rows.device.type in ("cpu", "mps"):
        return ppldelta.token_log_probs(logits_rows, targets)
    return _log_probs_rows_torch(logits_rows, targets)


def _log_probs_rows_torch(logits_rows, targets):
    """The accelerator branch of :func:`_log_probs_rows`: float64 log-softmax where the logits are."""
    torch = _torch()
    t = torch.as_tensor(targets).to(logits_rows.device, torch.long)[:, None]
    lp = torch.log_softmax(logits_rows.double(), dim=-1).gather(-1, t).squeeze(-1)
    return lp.cpu().numpy()


def _kl_stats_torch(logits_o, logits_q):
    """Torch version of ``ppldelta.kl_divergence`` (used for logits that are not on the CPU):
    per row KL(P_o || P_q) (nats, clamped at 0), same_top1, top1_in_top5/10 (the original's
    argmax among the quantized model's 5/10 largest logits, ties not counted against it) and
    quantized_top1_in_original_top5/10 (the other way round).  float32 on the logits' device,
    in row chunks; numpy out.  (Log-probs: :func:`_log_probs_rows`, their one home.)"""
    torch = _torch()
    lead = tuple(logits_o.shape[:-1])
    V = logits_o.shape[-1]
    if tuple(logits_q.shape) != tuple(logits_o.shape):
        raise ValueError(f"shape mismatch: {tuple(logits_o.shape)} vs {tuple(logits_q.shape)}")
    lo_all = logits_o.reshape(-1, V)
    lq_all = logits_q.reshape(-1, V)
    n = lo_all.shape[0]
    keys = ["kld", "same_top1", "top1_in_top5", "top1_in_top10",
            "quantized_top1_in_original_top5", "quantized_top1_in_original_top10"]
    parts = {k: [] for k in keys}
    rows = max(1, _ROW_BUDGET // max(1, V))
    with torch.no_grad():
        for r0 in range(0, n, rows):
            a = lo_all[r0:r0 + rows].float()
            b = lq_all[r0:r0 + rows].to(a.device).float()
            la = torch.log_softmax(a, dim=-1)
            lb = torch.log_softmax(b, dim=-1)
            kld = (la.exp() * (la - lb)).sum(-1).clamp_min_(0.0)
            am = a.argmax(-1)
            bm = b.argmax(-1)
            rank = (b > b.gather(-1, am[:, None])).sum(-1)
            rank_a = (a > a.gather(-1, bm[:, None])).sum(-1)
            same = am == bm
            parts["kld"].append(kld.to("cpu", torch.float64))
            parts["same_top1"].append(same.cpu())
            parts["top1_in_top5"].append((rank < 5).cpu())
            parts["top1_in_top10"].append((rank < 10).cpu())
            parts["quantized_top1_in_original_top5"].append((rank_a < 5).cpu())
            parts["quantized_top1_in_original_top10"].append((rank_a < 10).cpu())
            del a, b, la, lb
    out = {}
    for k, v in parts.items():
        arr = torch.cat(v).numpy() if v else np.zeros(0, dtype=bool if k != "kld" else np.float64)
        out[k] = arr.reshape(lead)
    return out


def _kl_stats(lo, lq):
    """Per-row KL and top-k agreement of two logit chunks: the C kernels for CPU tensors, torch
    otherwise (log-probs come from :func:`_log_probs_rows`)."""
    import ppldelta

    if lo.device.type == "cpu" and lq.device.type == "cpu":
        return ppldelta.kl_divergence(lo, lq)
    return _kl_stats_torch(lo, lq)


def _tokenizer_bos(tok):
    """What llama.cpp's add-BOS flag of the vocabulary says: the id the tokenizer puts in front
    of a text, False if it adds none, None if it cannot tell (then the model config decides)."""
    bos = getattr(tok, "bos_token_id", None)
    try:
        ids, _ = _encode(tok, "", True)
    except (TypeError, ValueError, AttributeError, NotImplementedError, KeyError):
        flag = getattr(tok, "add_bos_token", None)
        if flag is False:
            return False
        return int(bos) if flag is True and bos is not None else None
    return int(bos) if bos is not None and ids.size and int(ids[0]) == int(bos) else False


def _resolve(protocol, max_length, stride, bos_token_id, model, tokenizer=None):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    L = _DEFAULT_LENGTH[protocol] if max_length is None else int(max_length)
    if protocol in ("sliding", "hf", "seed001"):
        S = max(1, L // 2) if stride is None else int(stride)
    else:
        S = None
        if stride is not None and int(stride) != L:
            raise ValueError(f"the {protocol} protocol uses non-overlapping windows: leave stride unset")
    bos = bos_from = None
    if protocol == "llama.cpp":
        bos, bos_from = bos_token_id, "bos_token_id"
        if bos is True or (bos is not False and bos is not None and not isinstance(bos, (int, np.integer))):
            raise TypeError(f"bos_token_id must be an int, None or False, got {bos!r}")
        if bos is None and tokenizer is not None:
            bos, bos_from = _tokenizer_bos(_load_tokenizer(tokenizer, model)), "tokenizer"
        if bos is None:
            bos, bos_from = getattr(getattr(model, "config", None), "bos_token_id", None), "model.config"
            if isinstance(bos, (list, tuple)):
                bos = bos[0] if bos else None
    return L, S, bos, bos_from


def _bos_field(bos):
    return None if bos is None or bos is False else int(bos)


def _notes_for(protocol, windows, L, S, ids_np, bos_from=None):
    notes = {"n_windows": len(windows), "tokens_sha256": _ids_sha256(ids_np)}
    if protocol == "sliding":
        notes["min_context"] = L - S + 1
        notes["rule"] = ("each target scored once; window k = ids[max(0,b_k-L):b_k], "
                         "b_k = min(L + k*stride, N-1); last logit of a window used")
    elif protocol == "hf":
        notes["rule"] = ("HF fixed-length recipe: windows ids[k*stride:k*stride+L], overlap labels "
                         "masked, token-weighted mean")
        notes["unscored_tokens"] = None  # filled by caller
    elif protocol == "llama.cpp":
        notes["n_chunk"] = len(windows)
        notes["first"] = L // 2
        notes["dropped_tail"] = None
        notes["rule"] = "llama-perplexity: chunks of n_ctx, BOS at chunk start, second half scored"
        notes["bos_replaced"] = bool(windows) and windows[0].bos is not None
        notes["bos_from"] = bos_from
    elif protocol == "gptq":
        notes["nsamples"] = len(windows)
        notes["dropped_tail"] = None
        notes["rule"] = "GPTQ eval: non-overlapping seqlen windows, tail dropped, exp(mean nll)"
    elif protocol == "seed001":
        notes["rule"] = ("seed 001 loop: windows at 0, stride, ...; each window's mean loss over ALL its "
                         "tokens (overlap re-scored), windows averaged without token weights")
        notes["values"] = "per-window mean log-probs (minus the window losses), not per-token"
    return notes


# ---------------------------------------------------------------------------- scoring
def score(model, input_ids, *, max_length=None, stride=None, batch_size=1, protocol="sliding",
          bos_token_id=None, progress=True, device=None, tokenizer=None):
    """Per-token log-probs of a causal LM over one token sequence, and how they were produced.

    ``model``: any ``transformers`` causal LM (plain or quantized) or a module whose forward takes
    ``input_ids`` and returns ``.logits``.  ``input_ids``: list, numpy or torch, 1-D (or (1, N)).
    ``max_length``: window / n_ctx / seqlen (default 1024 for sliding and hf, 512 for llama.cpp,
    2048 for gptq); ``stride``: sliding and hf only (default ``max_length // 2``).
    ``batch_size``: windows per forward (padded with an attention mask where lengths differ).
    ``device``: where the input ids go (default: the model's device; the model is not moved).

    ``bos_token_id`` (``"llama.cpp"`` only): the id written over each chunk's first token, or
    False for none; by default the vocabulary decides, as in llama.cpp: ``tokenizer`` (an object
    or a name) adds a BOS -> its ``bos_token_id``, adds none -> False; without a tokenizer,
    ``model.config.bos_token_id``.

    Log-probs are float64-accurate and computed the same way by every entry point: the C kernel
    (``ppldelta.token_log_probs``) on CPU logits, a float64 log-softmax on the model's device
    otherwise, per row chunk; only the ``(n_scored,)`` log-probs come back (float64 numpy).
    Returns ``(log_probs, Protocol)``; log-probs are in target order.  For
    ``protocol="seed001"`` the values are per-window mean log-probs (see
    :func:`seed001_perplexity`), not per-token ones.
    """
    global last_protocol
    ids = _as_ids(input_ids)
    n = int(ids.numel())
    L, S, bos, bos_from = _resolve(protocol, max_length, stride, bos_token_id, model, tokenizer)
    windows = _plan(protocol, n, L, S, bos)
    per_window = protocol == "seed001"
    offs = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([w.b - w.a for w in windows], out=offs[1:])
    out = np.empty(int(offs[-1]), dtype=np.float64)

    def on_rows(k, r0, r1, chunks, targets):
        o = offs[k] + (r0 - windows[k].a)
        out[o:o + (r1 - r0)] = _log_probs_rows(chunks[0], targets)

    _run_windows([model], ids, windows, batch_size=batch_size, device=device, progress=progress,
                 desc=f"log-probs ({protocol})", on_rows=on_rows)
    notes = _notes_for(protocol, windows, L, S, ids.numpy(), bos_from)
    notes["batch_size"] = int(batch_size)
    if "dropped_tail" in notes:
        notes["dropped_tail"] = n - len(windows) * L
    if protocol == "hf":
        notes["unscored_tokens"] = (n - 1) - int(offs[-1])
    if per_window:
        with np.errstate(invalid="ignore"):
            vals = np.array([out[offs[k]:offs[k + 1]].mean() if offs[k + 1] > offs[k] else np.nan
                             for k in range(len(windows))], dtype=np.float64)
        notes["window_sizes"] = [int(w.b - w.a) for w in windows]
        if np.isnan(vals).any():
            notes["warning"] = ("a window of one token has no target: its loss is NaN, so the seed's "
                                "average is NaN (as with outputs.loss in transformers)")
        result = vals
    else:
        result = out
    proto = Protocol(name=protocol, max_length=L, stride=S, n_scored=int(offs[-1]), n_tokens=n,
                     bos=_bos_field(bos), notes=notes)
    last_protocol = proto
    return result, proto


def token_log_probs(model, input_ids, *, max_length=None, stride=None, batch_size=1,
                    protocol="sliding", bos_token_id=None, progress=True, device=None, tokenizer=None):
    """Per-token log-probs (float64 numpy) of ``model`` over ``input_ids``; see :func:`score`
    (same arguments; the Protocol of the call is kept in ``ppldelta.hf.last_protocol``)."""
    lp, _ = score(model, input_ids, max_length=max_length, stride=stride, batch_size=batch_size,
                  protocol=protocol, bos_token_id=bos_token_id, progress=progress, device=device,
                  tokenizer=tokenizer)
    return lp


def seed001_perplexity(model, input_ids, max_length=1024, stride=512, *, progress=False, device=None):
    """Seed 001's loop, reproduced to show its bias (do not use it to measure anything).

    Windows start at ``0, stride, 2*stride, ...`` (until the end of the text, so the last ones are
    ever shorter); each window's loss is the mean NLL over all its tokens after the first, including
    the ``max_length - stride`` tokens the previous window already scored; the window losses are
    averaged without weights and exponentiated.  Tokens in overlaps count twice (or more), short
    tail windows weigh as much as full ones, and the start of every window is scored with little
    context.  (As printed, the seed calls ``model(target_ids)`` without ``labels=``, so
    ``outputs.loss`` is None; this is the loop with ``labels=target_ids``, the evident intent.)
    """
    vals, _ = score(model, input_ids, max_length=max_length, stride=stride, protocol="seed001",
                    progress=progress, device=device)
    return float(math.exp(-float(np.mean(vals))))


def hf_recipe_perplexity(model, input_ids, max_length=1024, stride=512, *, progress=False, device=None):
    """The number the Hugging Face "perplexity of fixed-length models" recipe prints.

    Same windows and scored tokens as ``protocol="hf"``, but each window's mean loss is weighted
    by ``num_valid_tokens - 1`` as in the recipe: for windows after the first (stride <
    max_length) that is one less than the tokens actually scored, so the result differs from the
    token-weighted ``ppldelta.perplexity(token_log_probs(..., protocol="hf"))`` in the last
    digits.  Use it only to reproduce a published recipe number.
    """
    ids = _as_ids(input_ids)
    lp, proto = score(model, ids, max_length=max_length, stride=stride, protocol="hf",
                      progress=progress, device=device)
    windows = _plan("hf", int(ids.numel()), proto.max_length, proto.stride, None)
    num = den = 0.0
    o = 0
    for w in windows:
        c = w.b - w.a
        num += -float(np.mean(lp[o:o + c])) * w.weight
        den += w.weight
        o += c
    return float(math.exp(num / den))


# ---------------------------------------------------------------------------- texts
_MAX_PATH = 4096  # PATH_MAX on Linux: a longer string is text, not a path


def _load_texts(texts):
    """(list of strings, source description, whether to join)."""
    if texts is None:
        try:
            from datasets import load_dataset
        except ImportError as e:
            raise ImportError("texts=None loads WikiText-2 (raw, test) with the `datasets` package, which is "
                              "not installed: pass texts= (a list of strings or a file)") from e
        data = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return list(data["text"]), "datasets:wikitext/wikitext-2-raw-v1/test", True
    if isinstance(texts, str) and ("\n" in texts or "\r" in texts or len(texts) > _MAX_PATH):
        return [texts], "string", False  # no path has a line break or is that long: the text itself
    if isinstance(texts, (str, os.PathLike)):
        path = os.fspath(texts)
        if not os.path.isfile(path):
            shown = repr(path) if len(path) <= 80 else f"{path[:60]!r}... ({len(path)} characters)"
            raise FileNotFoundError(f"texts={shown} is not a file (to score a literal string, pass [text])")
        with open(path, encoding="utf-8") as f:
            return [f.read()], f"file:{os.path.abspath(path)}", False
    if hasattr(texts, "column_names"):  # datasets.Dataset
        if "text" not in texts.column_names:
            raise ValueError(f"the dataset has no 'text' column (columns: {texts.column_names})")
        info = getattr(texts, "info", None)
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "?"
        split = getattr(texts, "split", None)
        return list(texts["text"]), f"dataset:{name}/{split}", True
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
    return texts, "list", True


def _encode(tokenizer, text, add_special_tokens, offsets=False):
    if callable(tokenizer):
        kw = {"add_special_tokens": add_special_tokens}
        if offsets:
            kw["return_offsets_mapping"] = True
        enc = tokenizer(text, **kw)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        off = enc.get("offset_mapping") if offsets and hasattr(enc, "get") else None
    else:
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        off = None
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids, off


def _tokenize(texts, tokenizer, join, add_special_tokens, with_labels=False):
    """Token ids of the joined texts (tokenized once) and, with_labels, the index of the text
    each token comes from (separator tokens belong to the text before them)."""
    texts, source, joinable = _load_texts(texts)
    joined = join.join(texts) if joinable else texts[0]
    labels = None
    if not with_labels:
        ids, _ = _encode(tokenizer, joined, add_special_tokens)
    else:
        starts = []
        pos = 0
        for i, t in enumerate(texts):
            starts.append(pos)
            pos += len(t) + (len(join) if i < len(texts) - 1 else 0)
        ids, off = None, None
        try:
            ids, off = _encode(tokenizer, joined, add_special_tokens, offsets=True)
        except (NotImplementedError, TypeError, ValueError):
            off = None
        if off is not None and len(off) == len(ids):
            first = np.array([o[0] for o in off], dtype=np.int64)
            labels = np.searchsorted(np.asarray(starts), first, side="right") - 1
            labels = np.clip(labels, 0, len(texts) - 1)
        else:  # slow tokenizer: tokenize piece by piece (may differ at the boundaries)
            parts, labs = [], []
            for i, t in enumerate(texts):
                piece = t + (join if i < len(texts) - 1 else "")
                p, _ = _encode(tokenizer, piece, add_special_tokens and i == 0)
                parts.append(p)
                labs.append(np.full(p.size, i, dtype=np.int64))
            ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            labels = np.concatenate(labs) if labs else np.zeros(0, np.int64)
            source += " (tokenized per text: no offsets)"
    notes = {
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_vocab_size": _safe_len(tokenizer),
        "add_special_tokens": bool(add_special_tokens),
        "text_source": source,
        "n_texts": len(texts),
        "join": join if joinable else None,
        "text_sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest(),
        "tokens_sha256": _ids_sha256(ids),
    }
    return ids, labels, notes


def _safe_len(tok):
    try:
        return len(tok)
    except TypeError:
        return None


def _versions():
    out = {}
    for mod in ("torch", "transformers"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


# ---------------------------------------------------------------------------- loading
def _default_dtype(torch_dtype):
    torch = _torch()
    if torch_dtype is None:
        return torch.float16 if torch.cuda.is_available() else torch.float32
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        return getattr(torch, torch_dtype)
    return torch_dtype


def _load_model(name_or_path, torch_dtype=None):
    torch = _torch()
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = _default_dtype(torch_dtype)
    kw = {"device_map": "auto" if torch.cuda.is_available() else None}
    major = int(transformers.__version__.split(".")[0])
    kw["dtype" if major >= 5 else "torch_dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kw)


def _is_model(obj):
    return not isinstance(obj, (str, os.PathLike)) and callable(obj)


def _model_name(model):
    return (getattr(model, "name_or_path", None)
            or getattr(getattr(model, "config", None), "_name_or_path", None)
            or type(model).__name__)


def _load_tokenizer(tokenizer, model_or_name):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    name = tokenizer if tokenizer is not None else (
        model_or_name if isinstance(model_or_name, (str, os.PathLike)) else _model_name(model_or_name))
    if not name or not isinstance(name, (str, os.PathLike)) or name == type(model_or_name).__name__:
        raise ValueError("pass tokenizer= (a tokenizer object or name): the model has no name_or_path")
    return AutoTokenizer.from_pretrained(name)


_SPECIAL_DEFAULT = {"sliding": False, "hf": True, "llama.cpp": True, "gptq": True, "seed001": True}


@dataclass
class PerplexityResult:
    """Corpus perplexity (exp of the mean NLL over ``n_tokens`` scored tokens), how it was
    produced, and the per-token log-probs (float64) behind it."""

    perplexity: float
    n_tokens: int
    protocol: Protocol
    log_probs: np.ndarray = field(repr=False)

    def __str__(self):
        p = self.protocol
        extra = f", stride {p.stride}" if p.stride is not None else ""
        return (f"PPL = {self.perplexity:.4f} over {self.n_tokens:,} tokens "
                f"({p.name}, max_length {p.max_length}{extra})")


def evaluate_perplexity(model_name_or_path, quant_path=None, *, texts=None, tokenizer=None,
                        max_length=None, stride=None, protocol="sliding", join="\n\n", device=None,
                        torch_dtype=None, progress=True, batch_size=1, add_special_tokens=None,
                        bos_token_id=None) -> PerplexityResult:
    """Seed 001's ``evaluate_perplexity`` done right.

    ``model_name_or_path``: a hub name / local path, or an already-loaded model; ``quant_path``:
    load the model from there instead (the tokenizer still comes from ``model_name_or_path``).
    Models are loaded with ``AutoModelForCausalLM.from_pretrained(..., dtype=torch_dtype,
    device_map="auto" if CUDA else None)`` (float16 on GPU, float32 on CPU by default).
    ``texts``: a list of strings (joined with ``join``, WikiText-style), a path to a text file
    (used verbatim), a ``datasets`` split with a "text" column, or None for WikiText-2 raw test
    (needs ``datasets``).  A string with a line break or longer than 4096 characters is the text
    itself (used verbatim), not a path.  The joined text is tokenized once;
    ``add_special_tokens`` defaults to what the protocol's tool does (False for sliding; True for
    hf, gptq, llama.cpp, whose tools call the tokenizer with its defaults).  The tokenizer's name
    and a SHA-256 of the token ids go into ``result.protocol.notes``: a different tokenizer
    version gives different ids, hence different numbers, and the hash tells the runs apart.
    ``max_length`` / ``stride`` default to the protocol's (sliding: 1024 / 512; llama.cpp: n_ctx
    512; gptq: seqlen 2048; the chunked protocols take no stride).  ``bos_token_id``
    (llama.cpp): by default BOS is written over each chunk's first token only if the tokenizer
    adds one, as llama.cpp does (see :func:`score`).
    """
    model = model_name_or_path
    if quant_path is not None or not _is_model(model):
        model = _load_model(quant_path or model_name_or_path, torch_dtype)
    tok = _load_tokenizer(tokenizer, model_name_or_path)
    special = _SPECIAL_DEFAULT.get(protocol, False) if add_special_tokens is None else bool(add_special_tokens)
    ids, _, tnotes = _tokenize(texts, tok, join, special)
    lp, proto = score(model, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                      protocol=protocol, bos_token_id=bos_token_id, progress=progress, device=device,
                      tokenizer=tok)
    proto.notes.update(tnotes)
    proto.notes["model"] = str(quant_path if quant_path is not None else _model_name(model))
    proto.notes["dtype"] = str(getattr(model, "dtype", None))
    proto.notes.update(_versions())
    if protocol == "seed001":
        ppl = float(math.exp(-float(np.mean(lp))))
        return PerplexityResult(ppl, proto.n_scored, proto, lp)
    import ppldelta

    return PerplexityResult(float(ppldelta.perplexity(lp)), int(lp.size), proto, lp)


# ---------------------------------------------------------------------------- comparisons
def compare_models(original, quantized, input_ids, *, groups=None, max_length=None, stride=None,
                   protocol="sliding", batch_size=1, progress=True, bos_token_id=None, device=None,
                   tokenizer=None, **analyze_kwargs):
    """Run ``original`` and ``quantized`` in lock step over the same windows of ``input_ids`` and
    analyse them with :func:`ppldelta.analyze` (KL divergence, top-token agreement, perplexity
    delta with a block-bootstrap interval, per-group results).

    For every scored token: both log-probs (the same computation as :func:`score`, bit for bit),
    KL(P_orig || P_quant), same_top1, top1_in_top5/10, computed from each window's logits right
    away (C kernels on the CPU, torch on an accelerator) in row chunks; no (tokens x vocab) array
    is ever kept.  ``groups``: one label per input token (the label of the predicted token is
    used), or None.  ``max_length`` / ``stride`` / ``protocol`` / ``bos_token_id`` /
    ``tokenizer`` as for :func:`score` (not ``"seed001"``).
    """
    import ppldelta

    if protocol == "seed001":
        raise ValueError("seed001 does not produce per-token values; use sliding, hf, llama.cpp or gptq")
    ids = _as_ids(input_ids)
    n = int(ids.numel())
    L, S, bos, bos_from = _resolve(protocol, max_length, stride, bos_token_id, original, tokenizer)
    windows = _plan(protocol, n, L, S, bos)
    offs = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([w.b - w.a for w in windows], out=offs[1:])
    m = int(offs[-1])
    cols = {"original_log_probs": np.empty(m), "quantized_log_probs": np.empty(m), "kld": np.empty(m),
            "same_top1": np.empty(m, bool), "top1_in_top5": np.empty(m, bool),
            "top1_in_top10": np.empty(m, bool)}

    def on_rows(k, r0, r1, chunks, targets):
        lo, lq = chunks
        if lo.shape[-1] != lq.shape[-1]:
            raise ValueError(f"vocabulary sizes differ: {lo.shape[-1]} vs {lq.shape[-1]}")
        st = _kl_stats(lo, lq)
        st["original_log_probs"] = _log_probs_rows(lo, targets)
        st["quantized_log_probs"] = _log_probs_rows(lq, targets)
        o = offs[k] + (r0 - windows[k].a)
        for key, arr in cols.items():
            arr[o:o + (r1 - r0)] = np.asarray(st[key])

    _run_windows([original, quantized], ids, windows, batch_size=batch_size, device=device,
                 progress=progress, desc=f"compare ({protocol})", on_rows=on_rows)
    notes = _notes_for(protocol, windows, L, S, ids.numpy(), bos_from)
    notes["batch_size"] = int(batch_size)
    if "dropped_tail" in notes:
        notes["dropped_tail"] = n - len(windows) * L
    notes["original"] = _model_name(original)
    notes["quantized"] = _model_name(quantized)
    proto = Protocol(protocol, L, S, m, n, _bos_field(bos), notes)
    g = None
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.size != n:
            raise ValueError(f"groups has {g.size} labels for {n} input tokens (one per token)")
        g = g[_target_positions(windows)]
    return ppldelta.analyze(cols["original_log_probs"], cols["quantized_log_probs"], groups=g,
                            kld=cols["kld"], same_top1=cols["same_top1"],
                            top1_in_top5=cols["top1_in_top5"], top1_in_top10=cols["top1_in_top10"],
                            protocol=asdict(proto), **analyze_kwargs)


@dataclass
class QuantizationReport:
    """Seed 001's table with measured ratios: one row per model, the original first."""

    rows: list
    protocol: Protocol
    groups: list | None = None

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            for r in self.rows:
                if r["name"] == key:
                    return r
            raise KeyError(key)
        return self.rows[key]

    def to_markdown(self) -> str:
        head = ["Variant", "Perplexity", "Relative delta", "PPL(Q)/PPL(orig)", "95 % CI",
                "Expected band", "Verdict"]
        if self.groups:
            head += [f"{g} delta" for g in self.groups]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            ci = r.get("ratio_ci") or [None, None]
            band = r.get("expected_band")
            cells = [r["name"], f"{r['perplexity']:.4f}",
                     "baseline" if r["baseline"] else f"{r['relative_delta_pct']:+.2f} %",
                     f"{r['ratio']:.4f}",
                     f"{ci[0]:.4f}-{ci[1]:.4f}" if ci[0] is not None else "",
                     (f"{r['expected']}: {band[0]:.2f}-{band[1]:.2f}{'+' if band[2] else ''}" if band else ""),
                     r.get("verdict") or ""]
            if self.groups:
                gd = r.get("group_deltas_pct") or {}
                cells += [("" if r["baseline"] else f"{gd[g]:+.2f} %") if g in gd else "" for g in self.groups]
            lines.append("| " + " | ".join(cells) + " |")
        p = self.protocol
        lines.append("")
        lines.append(f"Protocol: {p.name}, max_length {p.max_length}, stride {p.stride}, "
                     f"{p.n_scored:,} scored tokens, tokens sha256 {p.notes.get('tokens_sha256', '')[:12]}.")
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()


def quantization_report(model, variants, texts, *, tokenizer=None, groups=None, max_length=1024,
                        stride=512, expected=None, progress=True, join="\n\n", batch_size=1,
                        device=None, torch_dtype=None, n_bootstrap=1000) -> QuantizationReport:
    """Evaluate ``model`` and every ``variants[name]`` (a model or a path, loaded one at a time)
    on the same tokens (sliding protocol) and return seed 001's table with measured ratios.

    ``texts``: as for :func:`evaluate_perplexity`.  ``groups``: one label per text (e.g. its
    domain) for per-group relative deltas.  ``expected``: {variant name: format} (e.g.
    ``"gptq-4"``) or one format for all, checked against ``ppldelta.expected_band``.
    Each row: name, perplexity, relative_delta_pct / absolute_delta / quality (as
    ``ppldelta.perplexity_delta``), ratio PPL(Q)/PPL(orig) with a block-bootstrap CI, the band and
    verdict, group_deltas_pct, and the full ``report`` (ppldelta.analyze).
    """
    import ppldelta

    base = model if _is_model(model) else _load_model(model, torch_dtype)
    tok = _load_tokenizer(tokenizer, model)
    texts_list, _, joinable = _load_texts(texts)
    if groups is not None:
        groups = list(groups)
        if not joinable:
            raise ValueError("groups needs texts as a list (one label per text), not a file or a string")
        if len(groups) != len(texts_list):
            raise ValueError(f"groups has {len(groups)} labels for {len(texts_list)} texts")
    ids, text_idx, tnotes = _tokenize(texts if groups is None else texts_list, tok, join, False,
                                      with_labels=groups is not None)
    lp_o, proto = score(base, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                        protocol="sliding", progress=progress, device=device)
    proto.notes.update(tnotes)
    proto.notes.update(_versions())
    windows = _plan("sliding", len(ids), proto.max_length, proto.stride, None)
    tok_groups = None
    gnames = None
    if groups is not None:
        lab = np.asarray([str(g) for g in groups], dtype=object)
        tok_groups = lab[text_idx[_target_positions(windows)]]
        gnames = list(dict.fromkeys(str(g) for g in groups))
    ppl_o = float(ppldelta.perplexity(lp_o))
    rows = [{"name": "original", "baseline": True, "perplexity": ppl_o, "relative_delta_pct": 0.0,
             "absolute_delta": 0.0, "quality": None, "ratio": 1.0, "ratio_ci": [None, None],
             "expected": None, "expected_band": None, "verdict": None, "group_deltas_pct": None,
             "report": None}]
    for name, variant in variants.items():
        loaded = not _is_model(variant)
        qm = _load_model(variant, torch_dtype) if loaded else variant
        try:
            lp_q, _ = score(qm, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                            protocol="sliding", progress=progress, device=device)
        finally:
            if loaded:
                del qm
        fmt = expected.get(name) if isinstance(expected, dict) else expected
        if fmt is not None and not hasattr(ppldelta, "expected_band"):
            fmt = None
        rep = ppldelta.analyze(lp_o, lp_q, groups=tok_groups, expected=fmt, protocol=asdict(proto),
                               n_bootstrap=n_bootstrap)
        ref = ppldelta.perplexity_delta(lp_o, lp_q)
        e = rep["expected"]
        rows.append({
            "name": name, "baseline": False,
            "perplexity": float(ppldelta.perplexity(lp_q)),
            "relative_delta_pct": ref["relative_delta_pct"], "absolute_delta": ref["absolute_delta"],
            "quality": ref["quality"], "ratio": float(rep["ppl_ratio"]["value"]),
            "ratio_ci": list(rep["ppl_ratio"]["ci"]),
            "expected": fmt,
            "expected_band": (e["band"][0], e["band"][1], e["open_ended"]) if e else None,
            "verdict": e["verdict"] if e else None,
            "group_deltas_pct": ({g: gd["reference"]["relative_delta_pct"] for g, gd in rep["groups"].items()}
                                 if rep["groups"] else None),
            "report": rep,
        })
    return QuantizationReport(rows, proto, gnames)
