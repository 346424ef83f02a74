"""Read per-token log-probabilities (or labels) from the files evaluation pipelines write.

Supported: .npy, .npz (``file.npz:key``, or the only/first array), .pt/.pth (a tensor, or a
dict: ``file.pt:key``), .safetensors (``:key`` or the first tensor), .json (a list, or a dict
with a ``log_probs`` list), .jsonl (one number, list or object per line), and plain text (one
number per line; blank lines and ``#`` comments skipped).
"""
from __future__ import annotations

import json
import os

import numpy as np

_KEYS = ("log_probs", "logprobs", "log_prob", "logprob", "lp", "token_logprobs", "values")


def _split_key(path: str):
    base, sep, key = path.rpartition(":")
    if sep and os.path.splitext(base)[1] in (".npz", ".pt", ".pth", ".safetensors") and not os.path.exists(path):
        return base, key
    return path, None


def _pick(mapping, key, path):
    if key is not None:
        if key not in mapping:
            raise ValueError(f"{path}: no key {key!r} (have {sorted(mapping)[:10]})")
        return mapping[key]
    for k in _KEYS:
        if k in mapping:
            return mapping[k]
    if len(mapping) == 0:
        raise ValueError(f"{path}: no arrays")
    return mapping[next(iter(mapping))]


def _from_json_obj(obj, path):
    if isinstance(obj, dict):
        for k in _KEYS:
            if k in obj:
                return obj[k]
        raise ValueError(f"{path}: JSON object without one of {_KEYS}")
    return obj


def read_values(path: str, dtype=np.float64) -> np.ndarray:
    """Read a 1-D array of values from any supported file (see the module docstring)."""
    path, key = _split_key(os.fspath(path))
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr = np.load(path, mmap_mode="r")
    elif ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arr = np.asarray(_pick({k: z[k] for k in z.files}, key, path))
    elif ext in (".pt", ".pth"):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = _pick(obj, key, path)
        arr = obj.detach().float().numpy() if hasattr(obj, "detach") else np.asarray(obj)
    elif ext == ".safetensors":
        from safetensors.numpy import load_file

        arr = _pick(load_file(path), key, path)
    elif ext == ".json":
        with open(path) as f:
            arr = np.asarray(_from_json_obj(json.load(f), path), dtype=dtype)
    elif ext == ".jsonl":
        vals = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    v = _from_json_obj(json.loads(line), f"{path}:{i}")
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not JSON ({exc})") from None
                vals.extend(v if isinstance(v, list) else [v])
        arr = np.asarray(vals, dtype=dtype)
    else:
        vals = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    try:
                        vals.append(float(line))
                    except ValueError:
                        raise ValueError(f"{path}:{i}: not a number: {line[:40]!r}") from None
        arr = np.asarray(vals, dtype=dtype)
    return np.asarray(arr).reshape(-1)


def read_labels(path: str) -> np.ndarray:
    """Group labels, one per token: any format above, or text with one label per line."""
    p, _ = _split_key(os.fspath(path))
    ext = os.path.splitext(p)[1].lower()
    if ext in (".npy", ".npz", ".pt", ".pth", ".safetensors", ".json", ".jsonl"):
        try:
            return read_values(path, dtype=object)
        except (TypeError, ValueError):
            pass
    with open(p) as f:
        return np.asarray([ln.strip() for ln in f if ln.strip()])
