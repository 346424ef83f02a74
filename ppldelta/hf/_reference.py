"""References: score the original model once into a reference file, then compare any quantized
model against that file with only the quantized model loaded.

``build_reference`` runs a causal LM over the windows of a protocol (``_run.run_windows``: the
same loop, no_grad and float64 rules as ``score``), summarizes every scored row where the logits
are (``refstats.summarize`` on the CPU, ``_ref_torch.summarize_torch`` on an accelerator: only
K values per token cross the bus) and streams the records to disk window by window
(``reffile.ReferenceWriter``: a killed build resumes where it stopped).
``evaluate_against_reference`` runs the quantized model over the same windows, compares its
logits with the stored records per window (``refstats.compare`` / ``_ref_torch.compare_torch``)
and reports through ``ppldelta.analysis.analyze`` (exact perplexity statistics, Δp and top-1
agreement; KL estimates with certified bounds).

The token ids live in the reference: the header's ``tokens`` entry holds them (little-endian
int32, base64) with their ``tokens_sha256``, so a reference is evaluated without its text; a
caller that passes texts or input ids anyway has them checked against that hash.

Header entries written here (the FILE layer adds its own: K, record dtype, window plan):
``kind``, ``model`` (name, class, dtype, config_sha256, weights_sha256 or None), ``tokenizer``
(name, class, vocab_sha256, vocab size), ``tokenizer_sha256`` and ``tokens_sha256`` (top level,
for ``reffile.check_compatible``), ``tokens`` (n, sha256, dtype, base64 ids), ``text`` (where the
text came from, its sha256, joining and special tokens), ``protocol`` (name, max_length, stride,
bos, bos_from, notes), ``window_records`` (records per window: enforced by the writer), ``k``,
``versions``, ``source``, ``groups`` (the texts' group labels as runs over the token stream, or
None: ``reffile.groups_entry``).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os

import numpy as np

from .. import analysis
from .. import protocols as _protocols
from . import _load
from ._load import is_model, model_name, tokenize, torch_module
from . import _dist
from ._run import _progress, as_ids, check_vocab, resolve, run_windows

__all__ = ["build_reference", "evaluate_against_reference", "compare_to_reference", "load_model",
           "load_tokenizer", "reference_header", "encode_ids", "decode_ids", "config_sha256", "weights_sha256"]

#: Parameters + buffers up to this many bytes are hashed into the header (``weights_sha256``);
#: larger models record only the config hash (reading 100+ GB to hash them is not cheap).
WEIGHTS_HASH_MAX_BYTES = 1 << 32

KIND = "ppldelta reference"


def _stats():
    from .. import refstats

    return refstats


def _file():
    from .. import reffile

    return reffile


# ---------------------------------------------------------------------------- provenance
def encode_ids(ids) -> dict:
    """The header's ``tokens`` entry: the token ids as little-endian int32, base64."""
    a = np.asarray(ids).reshape(-1)
    if a.size and (int(a.min()) < 0 or int(a.max()) > np.iinfo(np.int32).max):
        raise ValueError("token ids must lie in [0, 2**31)")
    a = np.ascontiguousarray(a, dtype="<i4")
    return {"n": int(a.size), "sha256": _file().tokens_sha256(a), "dtype": "<i4",
            "encoding": "base64", "ids": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_ids(entry: dict) -> np.ndarray:
    """The token ids (int64) of a header's ``tokens`` entry, checked against its sha256."""
    if not isinstance(entry, dict) or "ids" not in entry:
        raise ValueError("the reference stores no token ids: pass texts= or input_ids=")
    raw = base64.b64decode(entry["ids"].encode("ascii"), validate=True)
    a = np.frombuffer(raw, dtype=np.dtype(entry.get("dtype", "<i4")))
    if a.size != int(entry.get("n", a.size)) or _file().tokens_sha256(a) != entry.get("sha256"):
        raise ValueError("the reference's stored token ids do not match their sha256 (damaged header)")
    return a.astype(np.int64)


def config_sha256(model) -> str | None:
    """sha256 of the model config's JSON (sorted keys, without the path and library version,
    which say where and with what it was saved, not what it is); None without a config."""
    cfg = getattr(model, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    if to_dict is None:
        return None
    d = dict(to_dict())
    for key in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash"):
        d.pop(key, None)
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_sha256(model, max_bytes=WEIGHTS_HASH_MAX_BYTES) -> str | None:
    """sha256 over the state dict (name, dtype, shape, bytes of each plain tensor, in order),
    or None where that is not cheap: more than ``max_bytes``, tensors on the meta device
    (offloaded), tensor subclasses of quantizers."""
    torch = torch_module()
    sd = getattr(model, "state_dict", None)
    if sd is None:
        return None
    try:
        items = list(sd().items())
    except Exception:  # noqa: BLE001 - a module whose state_dict cannot be listed: no hash
        return None
    total = 0
    for _, t in items:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
            return None
        total += t.numel() * t.element_size()
    if total > max_bytes:
        return None
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in items:
            h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode("utf-8"))
            flat = t.detach().reshape(-1).contiguous().cpu()
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _versions() -> dict:
    from importlib import metadata

    out = {"numpy": np.__version__}
    for dist in ("ppldelta", "torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return out


def _tokenizer_entry(tok) -> dict | None:
    if tok is None:
        return None
    try:
        n = len(tok)
    except TypeError:
        n = None
    return {"name": getattr(tok, "name_or_path", None) or type(tok).__name__,
            "class": type(tok).__name__, "vocab_sha256": _file().vocab_sha256(tok), "vocab_size": n}


def reference_header(*, model: dict, tokenizer: dict | None, ids, protocol: dict, windows, k: int,
                     text: dict | None = None, source: dict | None = None, probes: int | None = None,
                     groups: dict | None = None, choices: dict | None = None) -> dict:
    """The provenance header of a reference (see the module docstring); deterministic (no
    timestamps), so that a resumed build writes the same bytes.  ``groups``:
    ``reffile.groups_entry`` of the texts' labels, or None; ``choices``: the original's
    multiple-choice scores (``hf._choices.original_entry``), or None."""
    tokens = encode_ids(ids)
    return {"kind": KIND, "model": model, "tokenizer": tokenizer,
            "tokenizer_sha256": tokenizer["vocab_sha256"] if tokenizer else None,
            "tokens_sha256": tokens["sha256"], "tokens": tokens, "text": text, "protocol": protocol,
            "window_records": [int(w.b - w.a) for w in windows],
            "k": int(k), "probes": _stats().DEFAULT_PROBES if probes is None else int(probes),
            "probe_offsets": _stats().PROBE_OFFSETS,
            "versions": _versions(), "source": source, "groups": groups, "choices": choices}


def _protocol_entry(spec, windows, L, S, n, bos, bos_from) -> dict:
    notes = _protocols.notes(spec, windows, L, S, n, bos_from)
    notes.pop("window_sizes", None)
    return {"name": spec.name, "max_length": int(L), "stride": None if S is None else int(S),
            "bos": None if bos is None or bos is False else int(bos), "bos_from": bos_from,
            "writes_bos": bool(spec.writes_bos), "n_tokens": int(n),
            "n_scored": int(sum(w.b - w.a for w in windows)), "notes": notes}


# ---------------------------------------------------------------------------- loading
def load_model(name_or_path, *, torch_dtype="auto", **kwargs):
    """:func:`ppldelta.hf._load.load_model` with ``torch_dtype="auto"`` (keep the checkpoint's
    dtype) as the default of the reference path."""
    return _load.load_model(name_or_path, torch_dtype, **kwargs)


def load_tokenizer(name_or_path, **kwargs):
    """:func:`ppldelta.hf._load.load_tokenizer` of a name or path."""
    return _load.load_tokenizer(None, name_or_path, **kwargs)


def _tokenizer_for(tokenizer, model):
    return _load.load_tokenizer(tokenizer, model)


def _summarize(logits_rows, targets, k, probes, positions):
    """Records of one row chunk, computed where the logits are (``_ref_torch`` dispatches: the
    CPU functions for CPU and MPS tensors, the torch twin elsewhere); positions: the targets'
    indices in the token stream (they set the probes' offsets)."""
    from . import _ref_torch

    return _ref_torch.summarize_torch(logits_rows, targets, k, probes=probes, positions=positions)


def _compare(logits_rows, records):
    from . import _ref_torch

    return _ref_torch.compare_torch(logits_rows, records)


# ---------------------------------------------------------------------------- build
def _own_loop(model):
    """The window loop of a model that brings its own (``run_windows``'s signature; NumPy ids and
    logits, no torch): ``ppldelta.llamacpp``'s GGUF models.  None for a torch model."""
    return getattr(model, "ppldelta_run_windows", None)


def _token_bar(windows, desc, progress):
    return _progress(int(sum(w.b - w.a for w in windows)), desc, progress, unit="tok")


def build_windows(model, ids, windows, todo, writer, k, *, batch_size=1, device=None, progress=True,
                  desc="reference", on_batch=None):
    """The window loop of a build: run ``model`` over ``windows[i]`` for every ``i`` in ``todo``
    (increasing), summarize each scored row chunk where the logits are and hand each finished
    window to ``writer.write_window(i, records)`` in order.  Memory: one batch's logits and one
    window's records.  (A sharded build calls this with its own share of the windows.)"""
    sub = [windows[i] for i in todo]
    parts: list = []
    nxt = [0]  # position in todo of the next window to write
    rd = writer.dtype
    bar = _token_bar(sub, desc, progress)

    def flush_until(j):  # windows that score nothing are never seen by on_rows: write them empty
        while nxt[0] < j:
            writer.write_window(todo[nxt[0]], np.zeros(0, dtype=rd))
            nxt[0] += 1

    def on_rows(j, r0, r1, chunks, targets):
        parts.append(np.asarray(_summarize(chunks[0], targets, k, writer.probes, np.arange(r0 + 1, r1 + 1))))
        if bar is not None:
            bar.update(r1 - r0)
        if r1 == sub[j].b:
            flush_until(j)
            recs = parts[0] if len(parts) == 1 else np.concatenate(parts)
            parts.clear()
            writer.write_window(todo[j], recs)
            nxt[0] = j + 1

    try:
        (_own_loop(model) or run_windows)([model], ids, sub, batch_size=batch_size, device=device,
                                          progress=False, desc=desc, on_rows=on_rows, on_batch=on_batch)
        flush_until(len(sub))
    finally:
        if bar is not None:
            bar.close()


def _same_header(stored: dict, header: dict):
    """The first entry of ``header`` that ``stored`` does not hold as is (None: all match)."""
    fresh = json.loads(json.dumps(header))
    for key, val in fresh.items():
        if key == "versions":  # a newer library reads the same reference
            continue
        if stored.get(key) != val:
            return key
    return None


def _finished(out, header) -> bool:
    """Whether ``out`` is a finished reference of ``header`` (a resumed build returns it as it is);
    False when there is no ``out``; a ValueError when it holds a different reference."""
    if not os.path.exists(out):
        return False
    bad = _same_header(_file().read_reference(out).header, header)
    if bad is None:
        return True
    raise ValueError(f"{out} exists and holds a different reference (its {bad!r} differs): "
                     "remove it or pass resume=False to overwrite")


def _prepare(model, texts, input_ids, tokenizer, protocol, max_length, stride, bos_token_id, join,
             add_special_tokens, groups=None):
    spec = _protocols.get(protocol)
    if not spec.per_token:
        raise ValueError(f"the {spec.name} protocol gives per-window means, not per-token values: "
                         "a reference needs a per-token protocol")
    if (texts is None) == (input_ids is None):
        raise ValueError("pass exactly one of texts= and input_ids=")
    tok = None
    text_entry = group_entry = None
    if groups is not None and (texts is None or isinstance(texts, (str, os.PathLike))):
        raise ValueError("groups needs texts as a list (one label per text), not a file, a string or input_ids")
    if texts is not None:
        tok = _tokenizer_for(tokenizer, model)
        special = spec.add_special_tokens if add_special_tokens is None else bool(add_special_tokens)
        if groups is not None:
            texts = list(texts)
            names, per_text = _file().text_labels(groups, len(texts))
        ids_np, text_idx, tnotes = tokenize(texts, tok, spec.join if join is None else join, special,
                                            with_labels=groups is not None)
        text_entry = {k: tnotes[k] for k in ("text_source", "text_sha256", "n_texts", "join",
                                             "add_special_tokens")}
        if groups is not None:
            group_entry = _file().groups_entry(names, np.asarray(per_text, dtype=np.int64)[text_idx])
    else:
        if tokenizer is not None:
            tok = _tokenizer_for(tokenizer, model)
        ids_np = _adaptids(input_ids)
    return spec, tok, ids_np, text_entry, group_entry


def _adaptids(input_ids):
    return as_ids(input_ids).numpy().astype(np.int64, copy=False)


def build_reference(model, texts=None, input_ids=None, out=None, *, tokenizer=None, protocol="sliding",
                    max_length=None, stride=None, k=None, batch_size=1, device=None, progress=True,
                    resume=True, bos_token_id=None, join=None, add_special_tokens=None,
                    load_kwargs=None, probes=None, groups=None, choices=None) -> str:
    """Score ``model`` (the original) once and write its reference file to ``out``.

    ``model``: a loaded causal LM, or a hub id / local path (loaded with :func:`load_model`
    and ``load_kwargs``: the checkpoint's dtype by default).  The tokens: ``texts`` (as for
    ``evaluate_perplexity``: a list of strings, a text file, a datasets split; tokenized once
    with ``tokenizer``, default the model's own) or ``input_ids`` (one sequence).
    ``protocol`` / ``max_length`` / ``stride`` / ``bos_token_id``: as for :func:`ppldelta.hf.score`
    (per-token protocols only).  ``k``: top-K log-probs kept per scored token (default
    ``refstats.DEFAULT_K`` = 24); ``probes``: tail probes per scored token (default
    ``refstats.DEFAULT_PROBES`` = 8; 0 writes records without probes).  ``groups``: one label per
    text (``texts`` a list; e.g. "prose", "code"), stored in the header so that every evaluation
    against the reference reports per-group deltas (a token belongs to the text it comes from).
    ``device``: where the input ids go (the model is not moved); logits are summarized on the
    model's device.  ``choices``: multiple-choice items (a JSON Lines file or a list of dicts,
    ``ppldelta.choices``): the original's per-choice log-likelihoods (lm-eval's rule) go into the
    header, so that every evaluation with the same items counts flips without the original.

    The file is written window by window (``out.part`` plus a journal) and renamed to ``out``
    when complete.  ``resume=True``: an interrupted build continues after its last verified
    window, and a finished ``out`` whose header matches this call's is returned as it is (a
    different one is refused: pass ``resume=False`` to overwrite).  Returns ``out``.
    """
    if out is None:
        raise TypeError("build_reference needs out= (the reference file to write)")
    rf, rs = _file(), _stats()
    k = rs.DEFAULT_K if k is None else int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    probes = rs.DEFAULT_PROBES if probes is None else int(probes)
    if probes < 0:
        raise ValueError(f"probes must be >= 0, got {probes}")
    if not is_model(model):
        model = load_model(model, **(load_kwargs or {}))
    spec, tok, ids_np, text_entry, group_entry = _prepare(model, texts, input_ids, tokenizer, protocol,
                                                          max_length, stride, bos_token_id, join,
                                                          add_special_tokens, groups)
    n = int(ids_np.size)
    spec, L, S, bos, bos_from = resolve(spec.name, max_length, stride, bos_token_id, model, tok)
    windows = _protocols.plan(spec, n, L, S, bos)
    model_entry = {"name": str(model_name(model)), "class": type(model).__name__,
                   "dtype": str(getattr(model, "dtype", None)), "config_sha256": config_sha256(model),
                   "weights_sha256": weights_sha256(model)}
    header = reference_header(model=model_entry, tokenizer=_tokenizer_entry(tok), ids=ids_np,
                              protocol=_protocol_entry(spec, windows, L, S, n, bos, bos_from),
                              windows=windows, k=k, text=text_entry, probes=probes, groups=group_entry,
                              source={"kind": "model", "logits": "full precision of the model's forward; "
                                      "log-sum-exp and log-probs in float64"})
    out = os.fspath(out)
    if choices is not None:
        from . import _choices

        ctok = tok if tok is not None else _tokenizer_for(tokenizer, model)
        enc, prefix = _choices.hf_encoder(ctok)
        header["choices"] = _choices.original_entry(model, out, header, choices, enc, prefix,
                                                    _choices.max_length_of(model, ctok), batch_size=batch_size,
                                                    device=device, progress=progress)
    if resume and _finished(out, header):
        return out
    ids = as_ids(ids_np)
    ctx = _dist.context()
    if ctx is not None:  # under torchrun: a shard per rank, merged by rank 0 (hf/_dist.py)
        desc = f"reference ({spec.name}, K={k})"
        return _dist.build_sharded(
            ctx, ids, windows, out=out, header=header, k=k, batch_size=batch_size, resume=resume,
            progress=progress, desc=desc, probes=probes,
            build=lambda todo, writer, on_batch: build_windows(
                model, ids, windows, todo, writer, k, batch_size=batch_size, device=device,
                progress=False, desc=desc, on_batch=on_batch))
    with rf.ReferenceWriter(out, header, k, n_windows=len(windows), resume=resume, probes=probes) as w:
        todo = [i for i in range(len(windows)) if i not in w.done]
        build_windows(model, ids, windows, todo, w, k, batch_size=batch_size, device=device,
                      progress=progress, desc=f"reference ({spec.name}, K={k})")
        w.finalize()
    return out


# ---------------------------------------------------------------------------- evaluate
COLUMNS = ("original_log_probs", "quantized_log_probs", "same_top1", "top1_in_top5", "top1_in_top10",
           "delta_p", "kld", "kld_lo", "kld_hi", "kld_reverse", "kld_reverse_lo", "kld_reverse_hi")


def _open(reference):
    rf = _file()
    if isinstance(reference, (str, os.PathLike)):
        return rf.read_reference(os.fspath(reference))
    if hasattr(reference, "header") and hasattr(reference, "records"):
        return reference
    raise TypeError(f"reference must be a path or a read_reference() object, not {type(reference).__name__}")


def eval_windows(model, ids, windows, todo, records, offs, cols, *, batch_size=1, device=None,
                 progress=True, desc="evaluate", on_batch=None):
    """The window loop of an evaluation: run ``model`` over ``windows[i]`` for ``i`` in ``todo``,
    compare each scored row chunk with its stored ``records`` (where the logits are) and write
    the per-token results into ``cols`` (arrays over all scored tokens, window ``i``'s at
    ``offs[i]``).  (A sharded evaluation calls this with its own share of the windows.)"""
    sub = [windows[i] for i in todo]
    check_vocab(model, ids)  # also for a model with its own loop
    bar = _token_bar(sub, desc, progress)

    def on_rows(j, r0, r1, chunks, targets):
        i = todo[j]
        o = int(offs[i]) + (r0 - windows[i].a)
        recs = np.array(records[o:o + (r1 - r0)])  # K values per row, out of the read-only map
        lq = chunks[0]
        if len(recs) and lq.shape[-1] <= max(int(recs["token"].max()), int(recs["ids"].max())):
            raise ValueError(f"the model's vocabulary ({lq.shape[-1]} logits) does not hold the "
                             "reference's token ids: a different tokenizer?")
        st = _compare(lq, recs)
        for key, arr in cols.items():
            if key in st:
                arr[o:o + (r1 - r0)] = np.asarray(st[key])
        if bar is not None:
            bar.update(r1 - r0)

    try:
        (_own_loop(model) or run_windows)([model], ids, sub, batch_size=batch_size, device=device,
                                          progress=False, desc=desc, on_rows=on_rows, on_batch=on_batch)
    finally:
        if bar is not None:
            bar.close()


def _check_tokens(header, texts, input_ids, tokenizer, model):
    """The token ids of the evaluation: the reference's own, checked against any texts /
    input ids / tokenizer the caller passes."""
    rf = _file()
    stored = header.get("tokens")
    tok = None
    if tokenizer is not None or texts is not None:
        tok = _tokenizer_for(tokenizer, model)
        sha = rf.vocab_sha256(tok)
        if header.get("tokenizer_sha256") is not None:
            rf.check_compatible(header, tokenizer_sha256=sha)
    if texts is not None or input_ids is not None:
        if texts is not None and input_ids is not None:
            raise ValueError("pass at most one of texts= and input_ids=")
        if texts is not None:
            spec = _protocols.get(header["protocol"]["name"])
            t = header.get("text") or {}
            join = t.get("join") or spec.join
            special = t.get("add_special_tokens", spec.add_special_tokens)
            ids, _, _ = tokenize(texts, tok, join, special)
        else:
            ids = _adaptids(input_ids)
        rf.check_compatible(header, tokens_sha256=rf.tokens_sha256(np.asarray(ids, dtype="<i4")))
        return np.asarray(ids, dtype=np.int64), tok
    if not isinstance(stored, dict) or "ids" not in stored:
        raise ValueError("the reference stores no token ids: pass texts= or input_ids=")
    return decode_ids(stored), tok


def _n_weights(model):
    """The parameter count of ``model``'s architecture unquantized: its class built from its config
    on the meta device (no memory), so packed 4-bit / int8 weights (bitsandbytes, quanto, GPTQ)
    count as the weights they stand for and tied embeddings once; None when that cannot be built
    (a model that is not a transformers PreTrainedModel).  A model object that brings its own loop
    (``_own_loop``) may bring its count too: ``ppldelta_n_weights`` (a number or a method)."""
    import copy

    own = getattr(model, "ppldelta_n_weights", None)
    if own is not None:
        return int(own() if callable(own) else own)
    if getattr(model, "config", None) is None or not hasattr(type(model), "config_class"):
        return None
    try:
        torch = torch_module()
        with torch.device("meta"):
            m = type(model)(copy.deepcopy(model.config))
        return int(sum(p.numel() for p in m.parameters()))
    except Exception:  # a model that cannot be rebuilt from its config: the size per weight is unknown
        return None


def compare_to_reference(model, reference, *, texts=None, input_ids=None, tokenizer=None, protocol=None,
                         batch_size=1, device=None, progress=True, verify=True, bos_token_id=None,
                         load_kwargs=None) -> dict:
    """Per-token comparison of ``model`` with a reference file (the arrays behind
    :func:`evaluate_against_reference`): ``refstats.compare``'s keys (original_log_probs,
    quantized_log_probs, same_top1, top1_in_top5/10, delta_p, kld, kld_lo, kld_hi, kld_reverse,
    kld_reverse_lo, kld_reverse_hi), each one value per scored token in the reference's order,
    plus ``target_positions`` (index of each scored target in the token ids), ``groups`` (each
    scored token's group from the reference's labels, or None: ``reffile.scored_groups``), ``protocol`` (a
    dict), ``n_tokens`` and ``n_weights`` (the parameter count of the model's architecture
    unquantized, or None).  Arguments as for :func:`evaluate_against_reference`."""
    ref = _open(reference)
    if getattr(ref, "is_shard", False):
        raise ValueError(f"{ref.path} is one shard of a reference: merge the shards first "
                         "(ppldelta.reffile.merge_shards)")
    if verify and hasattr(ref, "verify"):
        ref.verify()
    header = ref.header
    if protocol is not None:
        _file().check_compatible(header, protocol=_protocols.get(protocol).name)
    if not is_model(model):
        model = load_model(model, **(load_kwargs or {}))
    ids_np, tok = _check_tokens(header, texts, input_ids, tokenizer, model)
    p = header["protocol"]
    n = int(ids_np.size)
    spec = _protocols.get(p["name"])
    bos = p.get("bos")
    bos_from = p.get("bos_from")
    if spec.writes_bos and bos is None and bos_from == "unknown":  # converted llama.cpp files
        _, _, _, bos, bos_from = resolve(spec.name, p["max_length"], p.get("stride"), bos_token_id,
                                         model, tok)
    elif spec.writes_bos and bos is None:
        bos = False
    windows = _protocols.plan(spec, n, p["max_length"], p.get("stride"), bos)
    offs = _protocols.offsets(windows)
    counts = np.diff(np.asarray(ref.window_offsets, dtype=np.int64))
    if counts.size != len(windows) or not np.array_equal(counts, np.diff(offs)):
        raise ValueError("the reference's window plan does not match its protocol over its tokens "
                         "(a damaged or foreign file)")
    records = ref.records
    m = int(offs[-1])
    if len(records) != m:
        raise ValueError(f"the reference holds {len(records)} records for {m} scored tokens")
    positions = _protocols.target_positions(windows)
    if not np.array_equal(np.asarray(records["token"], dtype=np.int64), ids_np[positions]):
        raise ValueError("the reference's records do not predict its tokens (a damaged file)")
    cols = {key: np.empty(m, dtype=bool if key.startswith(("same", "top1")) else np.float64)
            for key in COLUMNS}
    ids, desc = ids_np if _own_loop(model) else as_ids(ids_np), f"evaluate ({spec.name}, K={header.get('k')})"
    ctx = _dist.context()
    if ctx is None:
        eval_windows(model, ids, windows, list(range(len(windows))), records, offs, cols,
                     batch_size=batch_size, device=device, progress=progress, desc=desc)
    else:  # under torchrun: each rank its share, the columns gathered (hf/_dist.py)
        _dist.sharded(ctx, ids, windows, batch_size=batch_size, progress=progress, desc=desc, n_models=1,
                      work=lambda lo, hi, on_batch: eval_windows(
                          model, ids, windows, list(range(lo, hi)), records, offs, cols,
                          batch_size=batch_size, device=device, progress=False, desc=desc,
                          on_batch=on_batch),
                      columns=list(cols.values()), offs=offs)
    cols["target_positions"] = positions
    cols["groups"] = _file().scored_groups(header, positions)
    cols["n_tokens"] = n
    cols["n_weights"] = _n_weights(model)
    cols["protocol"] = {
        "name": spec.name, "max_length": p["max_length"], "stride": p.get("stride"), "n_scored": m,
        "n_tokens": n, "bos": None if bos in (None, False) else int(bos),
        "notes": {"reference": str(getattr(ref, "path", "")), "k": header.get("k"),
                  "tokens_sha256": header.get("tokens_sha256"),
                  "original": (header.get("model") or {}).get("name"), "quantized": str(model_name(model))}}
    return cols


def evaluate_against_reference(model, reference, *, texts=None, input_ids=None, tokenizer=None,
                               protocol=None, batch_size=1, device=None, progress=True, groups=None,
                               expected=None, verify=True, bos_token_id=None, load_kwargs=None,
                               **analyze_kwargs):
    """Compare ``model`` (a quantized variant) against a reference file of its original, with
    only ``model`` loaded; returns the :func:`ppldelta.analyze` report.

    ``model``: a loaded causal LM, or an id / path (:func:`load_model` with ``load_kwargs``).
    ``reference``: a path or a ``reffile.read_reference`` object.  The tokens are the
    reference's own (stored in its header); ``texts`` / ``input_ids`` / ``tokenizer`` /
    ``protocol``, when given, are checked against the reference (a different tokenizer
    vocabulary, different token ids or another protocol is a ValueError naming the mismatch,
    never a number).  The windows are the reference's protocol's, so every scored token meets
    its stored record.  Exact, as from two full logits rows: both perplexities and every
    perplexity statistic, Δp, same top-1, the original's top-1 in the quantized top-5/10;
    KL(P||Q) and KL(Q||P): point estimates with certified per-token bounds (the report's
    ``kld_bounds`` / ``kld_reverse_bounds``).  Per-group results: by the labels the reference was
    built with (``build_reference(groups=...)``), or ``groups``: one label per input token (the
    label of the predicted token is used), which takes precedence.  ``verify``: check the file's checksum first.
    ``bos_token_id``: only for a converted llama.cpp file, which does not say whether BOS was
    written (default: the tokenizer's, else the model config's, as llama-perplexity).
    The report's ``per_token`` attribute holds :func:`compare_to_reference`'s dict (the
    per-token arrays, plus ``n_weights``); it is not part of ``to_dict()``.
    """
    c = compare_to_reference(model, reference, texts=texts, input_ids=input_ids, tokenizer=tokenizer,
                             protocol=protocol, batch_size=batch_size, device=device, progress=progress,
                             verify=verify, bos_token_id=bos_token_id, load_kwargs=load_kwargs)
    g = c["groups"]  # the reference's own (its texts' labels), unless groups= says otherwise
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.size != c["n_tokens"]:
            raise ValueError(f"groups has {g.size} labels for {c['n_tokens']} input tokens (one per token)")
        g = g[c["target_positions"]]
    rep = analysis.analyze(
        c["original_log_probs"], c["quantized_log_probs"], groups=g, kld=c["kld"],
        kld_reverse=c["kld_reverse"], same_top1=c["same_top1"], top1_in_top5=c["top1_in_top5"],
        top1_in_top10=c["top1_in_top10"], kld_bounds=(c["kld_lo"], c["kld_hi"]),
        kld_reverse_bounds=(c["kld_reverse_lo"], c["kld_reverse_hi"]), expected=expected,
        kld_definition=f"reference top-K estimate (K={c['protocol']['notes']['k']})",
        protocol=c["protocol"], **analyze_kwargs)
    rep.per_token = c  # not part of to_dict(): the arrays behind the report, for saving them
    return rep
