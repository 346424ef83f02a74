"""The one input adapter: every array-like argument of every entry point becomes an ndarray here,
and nowhere else.

- ``as_array``: any array-like (lists, tuples, ndarrays, torch tensors on any device, with
  autograd or in bfloat16, objects with ``__dlpack__``, ``__array__``, ``__array_interface__`` or
  the buffer protocol); masked arrays and non-numbers are refused.  The C core calls it for the
  inputs it does not read in place (csrc/input.c reads lists, tuples and ndarrays itself).
- ``as_f64``: flat float64 values of one per-token input (log-probs, KLD, flags).
- ``as_flags`` / ``as_kld``: a checked per-token flag or KL divergence array (one rule for
  analyze and Accumulator.update).
- ``as_rows`` / ``as_targets``: logits as (rows, vocab) views, bfloat16 kept raw; token targets.
- ``as_ids``: one sequence of token ids (ppldelta.hf).
- ``group_codes``: per-token group labels or {name: selection} as (names, codes).
"""
from __future__ import annotations

import numpy as np


def _from_torch(t):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()  # only (tokens,) log-probs cross the bus, never logits
    if t.is_complex():
        raise TypeError("complex tensors are not log-probabilities")
    if t.dtype.is_floating_point and t.dtype.itemsize == 2 and str(t.dtype) == "torch.bfloat16":
        # NumPy has no bfloat16: widen exactly to float32 (log-prob vectors are small).
        t = t.float()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.numpy()


def _is_torch(obj) -> bool:
    return (type(obj).__module__ or "").startswith("torch") and hasattr(obj, "detach")


def _noun(name: str) -> str:
    return "log-probabilities" if "log_prob" in name else "values"


def as_array(obj, name: str = "input") -> np.ndarray:
    """An ndarray view of ``obj`` (TypeError for things that are not real numbers, and for
    masked arrays, whose mask would otherwise be ignored)."""
    if obj is None or isinstance(obj, (str, bytes, bytearray, dict, set, complex)) or (
        isinstance(obj, (int, float)) and not isinstance(obj, np.generic)
    ):
        raise TypeError(
            f"{name} must be a sequence or array of {_noun(name)}, not {type(obj).__name__}"
        )
    if isinstance(obj, np.ma.MaskedArray):  # one rule for every entry point: masks are not applied
        raise TypeError(
            f"{name} is a masked array: ppldelta does not apply masks; pass {name}.compressed() "
            "(the unmasked values; for paired inputs, keep the same positions of both) or "
            f"{name}.filled(value)"
        )
    if _is_torch(obj):
        return _from_torch(obj)
    if not hasattr(obj, "__array__") and not hasattr(obj, "__array_interface__") and hasattr(
        obj, "__dlpack__"
    ):
        try:
            return np.from_dlpack(obj)
        except (TypeError, RuntimeError, BufferError) as exc:
            raise TypeError(f"{name}: cannot read {type(obj).__name__} via DLPack: {exc}") from None
    try:
        arr = np.asarray(obj)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: cannot read {type(obj).__name__} as an array: {exc}") from None
    if arr.dtype == object and arr.ndim == 0:
        raise TypeError(
            f"{name} must be a sequence or array of {_noun(name)}, not {type(obj).__name__}"
        )
    if arr.dtype.kind == "c":  # NumPy would drop the imaginary parts with a warning
        raise TypeError(f"{name} has complex dtype {arr.dtype}: expected real numbers")
    return arr


def as_f64(x, name: str = "input") -> np.ndarray:
    """Flat float64 values of a per-token input (real numbers or bools)."""
    a = as_array(x, name)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} has dtype {a.dtype}: expected real numbers")
    return np.asarray(a, dtype=np.float64).reshape(-1)


KLD_ROUNDING = 1e-6  # a per-token KLD below -this is no rounding of a zero: refused


def as_per_token(x, name: str, n: int, keep=None) -> np.ndarray:
    """A per-token KL divergence (``kld...``: >= 0, +inf allowed; down to -1e-6 tolerated as the
    rounding of a float32 computation of a zero) or flag (bool or 0/1) as flat float64, one value
    per token; with ``keep``, values given per position are first reduced to the scored ones.
    NaN and bad values are a ValueError naming the index."""
    a = as_f64(x, name)
    if keep is not None and a.size == keep.size and not keep.all():
        a = a[keep]
    if a.size != n:
        raise ValueError(f"{name} has {a.size} values for {n} tokens")
    kld = name.startswith("kld")
    bad = np.isnan(a) | (a < -KLD_ROUNDING) if kld else (a != 0) & (a != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if np.isnan(a[i]):
            raise ValueError(f"{name} contains NaN at index {i}")
        raise ValueError(f"{name}[{i}] = {float(a[i])!r} is not " + (
            f"a KL divergence (>= 0, or >= -{KLD_ROUNDING:g} as rounding)" if kld else "a flag (a bool, 0 or 1)"))
    return a


def scored(x, name: str, keep):
    """x without the positions whose target is ignore_index, when it has one value per position
    (lists and tuples pass through untouched when nothing is dropped: the C core reads them)."""
    if x is None or keep is None or keep.all():
        return x
    a = as_array(x, name)
    return a.reshape(-1)[keep] if a.size == keep.size else a


# ----------------------------------------------------------------------------- logits and token ids

def as_rows(x, name: str, bf16: bool):
    """(rows, vocab) ndarray view of logits of shape (..., vocab), their leading shape, and
    whether they hold raw bfloat16 bits (torch bfloat16 tensors, or uint16/int16 with bf16=True)."""
    if _is_torch(x):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.contiguous().view(dtype=__import__("torch").int16)
            bf16 = True
        x = t.numpy()
    a = as_array(x, name)
    if a.ndim < 1:
        raise ValueError(f"{name} must have a vocabulary axis")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} has dtype {a.dtype}: logits must be real numbers")
    if bf16 and a.dtype not in (np.uint16, np.int16):
        raise TypeError(f"{name}: bf16=True needs the raw 16-bit pattern (uint16/int16), got {a.dtype}")
    if not bf16 and a.dtype not in (np.float64, np.float32, np.float16):
        a = a.astype(np.float64)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    lead = a.shape[:-1]
    a = a.reshape(-1, a.shape[-1])  # a view whenever the layout allows
    if a.shape[1] > 1 and a.strides[1] != a.itemsize:
        a = np.ascontiguousarray(a)
    return a, lead, bf16


def as_targets(targets, lead: tuple, vocab: int, ignore_index) -> np.ndarray:
    """Flat int64 targets, each a token id in [0, vocab) or ignore_index, checked in the given
    dtype (a uint64 2^64 - 100 is out of range, not -100)."""
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index {ignore_index} does not fit in int64")
    t = as_array(targets, "targets")
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets must be integers (token ids), got {t.dtype}")
    if t.shape != lead:
        raise ValueError(f"targets has shape {t.shape}, logits have leading shape {lead}")
    flat = t.reshape(-1)
    if flat.size:
        # compare as Python ints against the dtype's range: no wrap-around in any integer type
        info = np.iinfo(flat.dtype)
        ok = (flat >= 0) & (flat <= flat.dtype.type(min(vocab - 1, info.max))) if vocab > 0 else \
            np.zeros(flat.shape, bool)
        if info.min <= ignore_index <= info.max:
            ok |= flat == flat.dtype.type(ignore_index)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"targets[{i}] = {int(flat[i])} is outside the vocabulary [0, {vocab}) "
                             f"and is not ignore_index ({ignore_index})")
    return np.ascontiguousarray(flat.astype(np.int64))


def as_ids(input_ids) -> np.ndarray:
    """One sequence of token ids as a contiguous 1-D int64 ndarray (``torch.from_numpy`` of it
    is the long tensor the models take): a BatchEncoding or dict's ``"input_ids"``, a tensor on
    any device, an array or a list; shape (n,) or (1, n).  Floats and bools are a TypeError."""
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:  # BatchEncoding / dict
        input_ids = input_ids["input_ids"]
    torch_dtype = str(input_ids.dtype) if _is_torch(input_ids) else None
    scalar = input_ids is None or np.isscalar(input_ids)  # a shape error below, as for 2-D ids
    a = np.asarray(input_ids) if scalar else as_array(input_ids, "input_ids")
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"input_ids must be one sequence (1-D, or 2-D with one row), got shape {tuple(a.shape)}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"input_ids must be integer token ids, got "
                        f"{torch_dtype or ('torch.' + a.dtype.name if a.dtype.kind in 'fb' else a.dtype)}")
    if a.size and (a.min() < 0 or (a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max)):
        i = int(np.argmax(a < 0)) if a.min() < 0 else int(np.argmax(a > np.iinfo(np.int64).max))
        raise ValueError(f"input_ids must be token ids in [0, 2**63) (-100 is a label's ignore_index, not an "
                         f"input), got {a[i]} at index {i}")
    return np.ascontiguousarray(a, dtype=np.int64)


# ----------------------------------------------------------------------------- group labels

def _label_codes(labels):
    """(names, codes) of per-token group labels, compared as str(label) (so 1 and "1" are one
    group, as in the report's keys), names in order of first appearance."""
    if labels.dtype.kind not in "biuUS":  # floats, objects, mixtures: compare their str()
        labels = np.array([str(v) for v in labels.tolist()], dtype=str)
    uniq, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first)  # names in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    names = [str(u) for u in uniq[order].tolist()]
    return names, rank[inv.reshape(-1)].astype(np.intp)


def group_codes(groups, n: int, keep=None):
    """(names, codes) from per-token labels or {name: slice | (start, stop) | indices | mask}.
    With ``keep`` (scored positions of logits), dict selections index positions and per-position
    labels are dropped in step with the ignored targets."""
    n_pos = n if keep is None else keep.size
    if isinstance(groups, dict):
        codes = np.full(n_pos, -1, dtype=np.intp)
        names = []
        for i, (name, sel) in enumerate(groups.items()):
            if isinstance(sel, tuple) and len(sel) == 2:
                sel = slice(*sel)
            idx = np.arange(n_pos)[sel]
            if np.any(codes[idx] >= 0):
                raise ValueError(f"group {name!r} overlaps another group")
            codes[idx] = i
            if str(name) in names:
                raise ValueError(f"two groups are named {str(name)!r} (labels are compared as str())")
            names.append(str(name))
        if np.any(codes < 0):
            raise ValueError(f"{int(np.count_nonzero(codes < 0))} tokens belong to no group")
        return names, (codes if keep is None else codes[keep])
    labels = (np.asarray(groups) if isinstance(groups, (list, tuple))
              else as_array(groups, "groups")).reshape(-1)
    if keep is not None and labels.size == n_pos:
        labels = labels[keep]
    if labels.size != n:
        raise ValueError(f"groups has {labels.size} labels for {n} tokens (one label per token, "
                         "or a dict of name -> slice/(start, stop)/indices)")
    return _label_codes(labels)
