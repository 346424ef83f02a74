"""Loading: torch (lazily), texts, tokenizers and models, and what to record about them
(tokenizer name, text and token hashes, library versions)."""
from __future__ import annotations

import hashlib
import os

import numpy as np


def torch_module():
    """torch, imported on first use (``pip install ppldelta[hf]``)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("ppldelta.hf needs PyTorch: pip install 'ppldelta[hf]'") from e
    return torch


def ids_sha256(ids) -> str:
    a = np.ascontiguousarray(np.asarray(ids, dtype="<i8"))
    return hashlib.sha256(a.tobytes()).hexdigest()


# ---------------------------------------------------------------------------- texts
MAX_PATH = 4096  # PATH_MAX on Linux: a longer string is text, not a path


def load_texts(texts):
    """(list of strings, source description, whether to join)."""
    if texts is None:
        try:
            from datasets import load_dataset
        except ImportError as e:
            raise ImportError("texts=None loads WikiText-2 (raw, test) with the `datasets` package, which is "
                              "not installed: pass texts= (a list of strings or a file)") from e
        data = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return list(data["text"]), "datasets:wikitext/wikitext-2-raw-v1/test", True
    if isinstance(texts, str) and ("\n" in texts or "\r" in texts or len(texts) > MAX_PATH):
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


def encode(tokenizer, text, add_special_tokens, offsets=False):
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


def tokenize(texts, tokenizer, join, add_special_tokens, with_labels=False):
    """Token ids of the joined texts (tokenized once) and, with_labels, the index of the text
    each token comes from (separator tokens belong to the text before them)."""
    texts, source, joinable = load_texts(texts)
    joined = join.join(texts) if joinable else texts[0]
    labels = None
    if not with_labels:
        ids, _ = encode(tokenizer, joined, add_special_tokens)
    else:
        starts = []
        pos = 0
        for i, t in enumerate(texts):
            starts.append(pos)
            pos += len(t) + (len(join) if i < len(texts) - 1 else 0)
        ids, off = None, None
        try:
            ids, off = encode(tokenizer, joined, add_special_tokens, offsets=True)
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
                p, _ = encode(tokenizer, piece, add_special_tokens and i == 0)
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
        "tokens_sha256": ids_sha256(ids),
    }
    return ids, labels, notes


def _safe_len(tok):
    try:
        return len(tok)
    except TypeError:
        return None


def tokenizer_bos(tok):
    """What llama.cpp's add-BOS flag of the vocabulary says: the id the tokenizer puts in front
    of a text, False if it adds none, None if it cannot tell (then the model config decides)."""
    bos = getattr(tok, "bos_token_id", None)
    try:
        ids, _ = encode(tok, "", True)
    except (TypeError, ValueError, AttributeError, NotImplementedError, KeyError):
        flag = getattr(tok, "add_bos_token", None)
        if flag is False:
            return False
        return int(bos) if flag is True and bos is not None else None
    return int(bos) if bos is not None and ids.size and int(ids[0]) == int(bos) else False


def versions():
    out = {}
    for mod in ("torch", "transformers"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


# ---------------------------------------------------------------------------- models
def _default_dtype(torch_dtype):
    torch = torch_module()
    if torch_dtype is None:
        return torch.float16 if torch.cuda.is_available() else torch.float32
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
            raise ValueError(f"unknown torch dtype {torch_dtype!r} (e.g. auto, float32, bfloat16, float16)")
        return getattr(torch, torch_dtype)
    return torch_dtype


def _default_device_map():
    """One process per GPU under torchrun: each rank loads onto its own device; one process (or
    one per node): spread over every visible GPU; no GPU: the CPU."""
    torch = torch_module()
    if not torch.cuda.is_available():
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) > 1:
        return {"": int(os.environ.get("LOCAL_RANK", "0") or 0)}
    return "auto"


def load_model(name_or_path, torch_dtype=None, *, device_map=None, revision=None, gguf_file=None,
               trust_remote_code=False, quantization_config=None, **kwargs):
    """The one model loader: ``AutoModelForCausalLM.from_pretrained`` with the loading arguments
    passed through.  ``torch_dtype``: None = float16 on CUDA, float32 on the CPU; "auto" keeps
    the checkpoint's dtype; or a dtype / its name.  ``device_map`` None = the default above."""
    import transformers
    from transformers import AutoModelForCausalLM

    kw = dict(kwargs)
    major = int(transformers.__version__.split(".")[0])
    kw["dtype" if major >= 5 else "torch_dtype"] = _default_dtype(torch_dtype)
    kw["device_map"] = _default_device_map() if device_map is None else device_map
    for key, val in (("revision", revision), ("gguf_file", gguf_file),
                     ("quantization_config", quantization_config)):
        if val is not None:
            kw[key] = val
    if trust_remote_code:
        kw["trust_remote_code"] = True
    kw["output_loading_info"] = True
    model, info = AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), **kw)
    missing = _untied(model, info.get("missing_keys") or ())
    if missing:  # newly initialised weights: every number would be a random model's
        raise ValueError(f"{os.fspath(name_or_path)}: the checkpoint lacks {len(missing)} of the model's weights "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which "
                         "transformers would fill with random values: a damaged or partial checkpoint, or "
                         "one of another architecture")
    return model.eval()


def _untied(model, missing) -> list:
    """The missing keys that are not tied to a weight that was loaded (a tied lm_head that a
    loader lists as missing shares the embedding's storage)."""
    missing = set(missing)
    if not missing:
        return []
    try:
        params = dict(model.named_parameters(remove_duplicate=False))
    except (TypeError, AttributeError):  # pragma: no cover - not a torch module
        return sorted(missing)
    loaded = {p.data_ptr() for n, p in params.items() if n not in missing}
    return sorted(k for k in missing if k not in params or params[k].data_ptr() not in loaded)


def is_model(obj):
    return not isinstance(obj, (str, os.PathLike)) and callable(obj)


def model_name(model):
    return (getattr(model, "name_or_path", None)
            or getattr(getattr(model, "config", None), "_name_or_path", None)
            or type(model).__name__)


def load_tokenizer(tokenizer, model_or_name, *, revision=None, gguf_file=None, trust_remote_code=False):
    """The one tokenizer loader: ``tokenizer`` itself if it is an object, else
    ``AutoTokenizer.from_pretrained`` of its name (or of the model's name) with the loading
    arguments of :func:`load_model`."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    name = tokenizer if tokenizer is not None else (
        model_or_name if isinstance(model_or_name, (str, os.PathLike)) else model_name(model_or_name))
    if not name or not isinstance(name, (str, os.PathLike)) or name == type(model_or_name).__name__:
        raise ValueError("pass tokenizer= (a tokenizer object or name): the model has no name_or_path")
    kw = {k: v for k, v in (("revision", revision), ("gguf_file", gguf_file)) if v is not None}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    return AutoTokenizer.from_pretrained(os.fspath(name), **kw)
