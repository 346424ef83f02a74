"""Running models: one or several causal LMs in lock step over the windows of a protocol
(``ppldelta.protocols``), handing each scored row chunk of logits to a callback, and the scoring
entry points built on it (score, token_log_probs and the two recipe reproductions)."""
from __future__ import annotations

import inspect
import math
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import _adapt
from .. import protocols as _protocols
from . import _dist, _kl_torch
from ._load import ids_sha256, load_tokenizer, tokenizer_bos, torch_module

# The Protocol of the most recent score() call (read as ``ppldelta.hf.last_protocol``).
_last = [None]

#: With overlap on CUDA, the worker runs batch i's row work on streams of its own, ordered after
#: batch i's forward by an event: its launches and its waits for per-token values then wait for
#: batch i's forward only, not for batch i+1's that the main thread queues meanwhile on the
#: default stream.  Same kernels, same bits (scripts/gpu_check.py checks scores, reference files
#: and reports in both modes); benchmarks/bench_throughput.py times both.
SIDE_STREAM = True


@dataclass
class Protocol:
    """How per-token log-probs were produced (store it next to any number you publish).

    ``n_tokens``: tokens in the input; ``n_scored``: predictions averaged (for ``"window-mean"``
    this counts the overlap as often as the loop scores it); ``bos``: the token id written over
    the first token of every window (``"llama.cpp"``), else None; ``notes``: everything else
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


def _progress(total, desc, enabled, unit="win"):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            pass
    return None


# ---------------------------------------------------------------------------- inputs
def as_ids(input_ids):
    """One token sequence as a contiguous int64 CPU tensor: ``ppldelta._adapt.as_ids`` (the one
    input adapter: list, numpy, torch, BatchEncoding; 1-D or (1, N)) as a tensor."""
    torch = torch_module()
    a = _adapt.as_ids(input_ids)
    return torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)


def resolve(protocol, max_length, stride, bos_token_id, model, tokenizer=None):
    """(Spec, L, S, bos, where bos came from): the protocol's defaults, and for a protocol that
    writes BOS the id to write (bos_token_id=, else the tokenizer's add-BOS behaviour, else
    model.config.bos_token_id)."""
    spec, L, S = _protocols.resolve(protocol, max_length, stride)
    bos = bos_from = None
    if spec.writes_bos:
        bos, bos_from = bos_token_id, "bos_token_id"
        if bos is True or (bos is not False and bos is not None and not isinstance(bos, (int, np.integer))):
            raise TypeError(f"bos_token_id must be an int, None or False, got {bos!r}")
        if bos is None and tokenizer is not None:
            bos, bos_from = tokenizer_bos(load_tokenizer(tokenizer, model)), "tokenizer"
        if bos is None:
            bos, bos_from = getattr(getattr(model, "config", None), "bos_token_id", None), "model.config"
            if isinstance(bos, (list, tuple)):
                bos = bos[0] if bos else None
    return spec, L, S, bos, bos_from


def bos_field(bos):
    return None if bos is None or bos is False else int(bos)


def make_protocol(spec, windows, L, S, n, ids_np, bos, bos_from, batch_size, **extra):
    """The Protocol record of a run: the protocol's own notes between the window count / token
    hash and the run's settings."""
    notes = {"n_windows": len(windows), "tokens_sha256": ids_sha256(ids_np),
             **_protocols.notes(spec, windows, L, S, n, bos_from), "batch_size": int(batch_size), **extra}
    n_scored = int(sum(w.b - w.a for w in windows))
    return Protocol(name=spec.name, max_length=L, stride=S, n_scored=n_scored, n_tokens=n,
                    bos=bos_field(bos), notes=notes)


# ---------------------------------------------------------------------------- models
def _model_device(model):
    torch = torch_module()
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


def _learned_positions(model) -> bool:
    """Whether the model looks up learned absolute position embeddings (OPT's embed_positions,
    GPT-Neo's wpe, BERT-style position_embeddings): a table with a hard end, unlike RoPE or ALiBi."""
    import torch

    named = getattr(model, "named_modules", None)
    if named is None:
        return False
    return any(isinstance(m, torch.nn.Embedding) and n.rsplit(".", 1)[-1] in ("embed_positions", "wpe",
                                                                              "position_embeddings")
               for n, m in named())


def _n_embeddings(model):
    """The size of the model's input embedding table (None when it has no such table)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n_in = getattr(emb, "num_embeddings", None)
    return n_in if isinstance(n_in, int) else None


def check_vocab(model, ids):
    """Token ids beyond the model's input embeddings are refused before a forward fails on them."""
    n_in = _n_embeddings(model)
    if n_in is not None and len(ids) and int(ids.max()) >= n_in:
        raise ValueError(f"the token ids go up to {int(ids.max())}, beyond the model's vocabulary "
                         f"({n_in} embeddings): a different tokenizer?")


_CAUSAL = weakref.WeakSet()  # models that passed check_causal (one small forward each, once)


def check_causal(model, device):
    """A causal LM's logits at a position do not depend on later tokens.  An encoder loaded as a
    causal LM (transformers gives a BERT / RoBERTa checkpoint a ``BertLMHeadModel`` whose
    attention is bidirectional unless ``is_decoder``) sees every token of its window, the
    targets included: its perplexity would be near 1 and every number meaningless.  Refused
    after one forward of two 8-token inputs that differ in their last 4 tokens: the first 4
    positions' logits must not move by more than 1 % of what the last 4 move (a causal model
    moves them by exactly 0, even in half precision; a trained encoder by about as much; the
    1 % leaves room for a device's nondeterministic kernels)."""
    torch = torch_module()
    if not isinstance(model, torch.nn.Module) or model in _CAUSAL:
        return
    n_in = _n_embeddings(model)
    if n_in is None or n_in < 2:
        return
    a = [(7 * i + 3) % n_in for i in range(8)]
    x = torch.tensor([a, a[:4] + [(t + 1 + i) % n_in for i, t in enumerate(a[4:])]], device=device)
    kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}
    with torch.no_grad():
        out = model(input_ids=x, **kwargs)
    lg = (out.logits if hasattr(out, "logits") else out[0]).float()
    if lg.dim() == 3 and lg.shape[:2] == x.shape:
        early = float((lg[0, :4] - lg[1, :4]).abs().max())
        late = float((lg[0, 4:] - lg[1, 4:]).abs().max())
        if early > 0.01 * late or early != early:  # NaN: not a causal model's logits either
            name = getattr(getattr(model, "config", None), "model_type", None) or "?"
            raise ValueError(f"{type(model).__name__} ({name}) is not a causal language model: its logits at a "
                             f"position move with later tokens (by {early:.3g}, against {late:.3g} where the "
                             "tokens changed), so it sees the tokens it would be scored on (an encoder such "
                             "as BERT loaded as a causal LM: transformers makes it causal only with "
                             "is_decoder=True)")
    _CAUSAL.add(model)


def _check_positions(model, longest):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    hard = getattr(cfg, "n_positions", None)  # learned absolute positions (GPT-2 & co.)
    if isinstance(hard, int) and longest > hard:
        raise ValueError(f"windows of {longest} tokens exceed the model's n_positions = {hard}: "
                         "pass a smaller max_length")
    soft = getattr(cfg, "max_position_embeddings", None)
    if isinstance(soft, int) and longest > soft and hard is None and _learned_positions(model):
        raise ValueError(f"windows of {longest} tokens exceed the model's max_position_embeddings = {soft} "
                         "(learned positions, a hard limit): pass a smaller max_length")
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


def run_windows(models, ids, windows, *, batch_size, device, progress, desc, on_rows, index0=0,
                on_batch=None, overlap=None):
    """Run ``models`` in lock step over ``windows`` (``batch_size`` windows per forward) and call
    ``on_rows(window_index, r0, r1, [logits rows of each model], targets)`` for every row chunk
    of the scored positions ``r0 .. r1-1`` (absolute).  ``windows`` may be a slice of a plan
    starting at window ``index0`` (window indices passed on are absolute); ``on_batch(n)`` is
    called after each batch with its number of scored tokens (``_dist`` syncs there).

    ``overlap`` (default: on where a model is not on the CPU): the ``on_rows`` calls of batch i
    run on one worker thread, in window order, while batch i+1's forward runs; a batch's rows
    are all done (or their exception raised here) before the next batch's are handed over.  On
    an accelerator the host then waits for batch i's per-token values while the device computes
    batch i+1, instead of the device waiting for the host.  The forwards see the same inputs
    either way (the same bits); the price is that two batches' logits are alive at a time.
    Without it, every reference to a batch's logits is dropped before the next forward (the CPU
    default: there the row kernels use all of torch's threads after the forward instead of
    competing with it for the same cores; benchmarks/bench_throughput.py measures both)."""
    torch = torch_module()
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
        check_vocab(m, ids)
    for m, d in zip(models, devs):
        check_causal(m, d)
    bar = _progress(len(windows), desc, progress)
    t0 = time.perf_counter()
    done = [0]

    whole = all(d.type == "cuda" for d in devs)

    def post(i0, batch, box):  # every row chunk of one batch, in window order
        outs = box.pop()  # the only reference from here on: gone when this returns
        with torch.no_grad():
            rows = max(1, _kl_torch.ROW_BUDGET // max(1, outs[0][0].shape[-1]))
            for j, w in enumerate(batch):
                if whole:  # on CUDA a window is one chunk: the consumers bound their own temporaries,
                    rows = max(rows, w.b - w.a)  # and each chunk costs a launch and a sync
                for r0 in range(w.a, w.b, rows):
                    r1 = min(r0 + rows, w.b)
                    chunks = [lg[j, r0 - w.start - f:r1 - w.start - f] for lg, f in outs]
                    try:
                        on_rows(index0 + i0 + j, r0, r1, chunks, ids[r0 + 1:r1 + 1])
                    except ValueError as e:  # the kernels count rows from r0: say where that is
                        raise ValueError(f"{e} (row k of this chunk predicts input_ids[{r0 + 1} + k], "
                                         f"window {index0 + i0 + j} = input_ids[{w.start}:{w.end}])") from e
                    del chunks
        return batch

    def finished(batch):  # after a batch's on_rows calls: progress, then the caller's hook
        done[0] += sum(w.end - w.start for w in batch)
        if bar is not None:
            bar.update(len(batch))
            dt = time.perf_counter() - t0
            if dt > 0:
                bar.set_postfix(tok_s=f"{done[0] / dt:,.0f}", refresh=False)
        if on_batch is not None:
            on_batch(sum(w.b - w.a for w in batch))

    pool = pending = None
    if overlap is None:
        overlap = any(d.type != "cpu" for d in devs)
    if overlap and len(windows) > batch_size:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="ppldelta-rows")
    side = {}  # CUDA device of logits -> the worker's stream there (SIDE_STREAM)

    def post_on_side(i0, batch, box, events):
        """post() on the worker's own streams: each waits for the event recorded after the forward
        that made its logits, so the worker's launches and syncs wait for batch i's forward only,
        not for batch i+1's that the main thread is queuing meanwhile on the default stream."""
        import contextlib

        with contextlib.ExitStack() as stack:
            for ev, s in events:
                s.wait_event(ev)
            for s in {id(s): s for _, s in events}.values():
                stack.enter_context(torch.cuda.stream(s))
            return post(i0, batch, box)
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
                    # non_blocking: a host-to-device copy that does not wait for the device's queue
                    nb = dev.type == "cuda"
                    outs.append(_forward_logits(m, x.to(dev, non_blocking=nb),
                                                None if mask is None else mask.to(dev, non_blocking=nb),
                                                first_row, uk, uc))
                del x, mask
                if pool is None:
                    finished(post(i0, batch, [outs]))
                else:  # batch i-1's rows are done (or raise) before batch i's are handed over
                    events = []
                    if SIDE_STREAM and all(lg.is_cuda for lg, _ in outs):
                        for lg, _ in outs:
                            if lg.device not in side:
                                side[lg.device] = torch.cuda.Stream(lg.device)
                            ev = torch.cuda.Event()
                            ev.record(torch.cuda.current_stream(lg.device))
                            events.append((ev, side[lg.device]))
                            # the logits' memory is reused only once the work queued on the
                            # worker's stream before they are freed is done
                            lg.record_stream(side[lg.device])
                    if pending is not None:
                        fut, pending = pending, None
                        finished(fut.result())
                    pending = (pool.submit(post_on_side, i0, batch, [outs], events) if events
                               else pool.submit(post, i0, batch, [outs]))
                del outs  # this batch's logits live on only in the worker's hands
            if pending is not None:
                fut, pending = pending, None
                finished(fut.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------- scoring
def score(model, input_ids, *, max_length=None, stride=None, batch_size=1, protocol="sliding",
          bos_token_id=None, progress=True, device=None, tokenizer=None):
    """Per-token log-probs of a causal LM over one token sequence, and how they were produced.

    ``model``: any ``transformers`` causal LM (plain or quantized) or a module whose forward takes
    ``input_ids`` and returns ``.logits``.  ``input_ids``: list, numpy or torch, 1-D (or (1, N)).
    ``protocol``: a name in ``ppldelta.protocols.PROTOCOLS``.
    ``max_length``: window / n_ctx / seqlen (default 1024 for sliding and hf, 512 for llama.cpp,
    2048 for gptq); ``stride``: sliding and hf only (default ``max_length // 2``).
    ``batch_size``: windows per forward (padded with an attention mask where lengths differ).
    ``device``: where the input ids go (default: the model's device; the model is not moved).
    On an accelerator the per-token work of batch i runs while batch i+1's forward does (two
    batches' logits alive at a time); on the CPU one batch's logits at a time, and the row
    kernel uses torch's thread count (``torch.set_num_threads``).

    ``bos_token_id`` (``"llama.cpp"`` only): the id written over each chunk's first token, or
    False for none; by default the vocabulary decides, as in llama.cpp: ``tokenizer`` (an object
    or a name) adds a BOS -> its ``bos_token_id``, adds none -> False; without a tokenizer,
    ``model.config.bos_token_id``.

    Log-probs are float64-accurate and computed the same way by every entry point: the C kernel
    (``ppldelta.token_log_probs``) on CPU logits, a float64 log-softmax on the model's device
    otherwise, per row chunk; only the ``(n_scored,)`` log-probs come back (float64 numpy).
    Returns ``(log_probs, Protocol)``; log-probs are in target order.  For
    ``protocol="window-mean"`` the values are per-window mean log-probs (see
    :func:`window_mean_perplexity`), not per-token ones.
    """
    ids = as_ids(input_ids)
    n = int(ids.numel())
    spec, L, S, bos, bos_from = resolve(protocol, max_length, stride, bos_token_id, model, tokenizer)
    windows = _protocols.plan(spec, n, L, S, bos)
    offs = _protocols.offsets(windows)
    out = np.empty(int(offs[-1]), dtype=np.float64)

    def on_rows(k, r0, r1, chunks, targets):
        o = offs[k] + (r0 - windows[k].a)
        out[o:o + (r1 - r0)] = _kl_torch.log_probs_rows(chunks[0], targets)

    _dist.run_windows([model], ids, windows, batch_size=batch_size, device=device, progress=progress,
                      desc=f"log-probs ({spec.name})", on_rows=on_rows, columns=[out], offs=offs)
    result, extra = out, {}
    if not spec.per_token:
        result = _protocols.window_means(out, windows)
        if np.isnan(result).any():
            extra["warning"] = ("a window of one token has no target: its loss is NaN, so the loop's "
                                "average is NaN (as with outputs.loss in transformers)")
    proto = make_protocol(spec, windows, L, S, n, ids.numpy(), bos, bos_from, batch_size, **extra)
    _last[0] = proto
    return result, proto


def token_log_probs(model, input_ids, *, max_length=None, stride=None, batch_size=1,
                    protocol="sliding", bos_token_id=None, progress=True, device=None, tokenizer=None):
    """Per-token log-probs (float64 numpy) of ``model`` over ``input_ids``; see :func:`score`
    (same arguments; the Protocol of the call is kept in ``ppldelta.hf.last_protocol``)."""
    lp, _ = score(model, input_ids, max_length=max_length, stride=stride, batch_size=batch_size,
                  protocol=protocol, bos_token_id=bos_token_id, progress=progress, device=device,
                  tokenizer=tokenizer)
    return lp


def window_mean_perplexity(model, input_ids, max_length=1024, stride=512, *, progress=False, device=None):
    """The stride loop as commonly copied, reproduced to show its bias (do not use it to measure
    anything): ``protocol="window-mean"``.

    Windows start at ``0, stride, 2*stride, ...`` (until the end of the text, so the last ones are
    ever shorter); each window's loss is the mean NLL over all its tokens after the first, including
    the ``max_length - stride`` tokens the previous window already scored; the window losses are
    averaged without weights and exponentiated.  Tokens in overlaps count twice (or more), short
    tail windows weigh as much as full ones, and the start of every window is scored with little
    context.  (As usually printed, the loop calls ``model(target_ids)`` without ``labels=``, so
    ``outputs.loss`` is None; this is the loop with ``labels=target_ids``, the evident intent.)
    """
    vals, _ = score(model, input_ids, max_length=max_length, stride=stride, protocol="window-mean",
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
    ids = as_ids(input_ids)
    lp, proto = score(model, ids, max_length=max_length, stride=stride, protocol="hf",
                      progress=progress, device=device)
    windows = _protocols.plan("hf", int(ids.numel()), proto.max_length, proto.stride)
    num = den = 0.0
    o = 0
    for w in windows:
        c = w.b - w.a
        num += -float(np.mean(lp[o:o + c])) * w.weight
        den += w.weight
        o += c
    return float(math.exp(num / den))
