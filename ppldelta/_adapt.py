"""Turn array-likes that are not lists, tuples or ndarrays into ndarrays, without copies where
the data is already float32/float64 on the CPU.

Called from the C core (csrc/input.c) only for such inputs: torch tensors (any device, autograd,
bfloat16), objects with ``__dlpack__``, ``__array__``, ``__array_interface__`` or the buffer
protocol (memoryview, pandas Series).
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


def as_array(obj, name: str = "input") -> np.ndarray:
    """An ndarray view of ``obj`` (TypeError for things that are not real numbers, and for
    masked arrays, whose mask would otherwise be ignored).  The one adapter of every entry point:
    the C core calls it for inputs that are not lists, tuples or plain ndarrays, and analyze,
    Accumulator, the logits functions and the flips functions for every input."""
    if obj is None or isinstance(obj, (str, bytes, bytearray, dict, set, complex)) or (
        isinstance(obj, (int, float)) and not isinstance(obj, np.generic)
    ):
        raise TypeError(
            f"{name} must be a sequence or array of log-probabilities, not {type(obj).__name__}"
        )
    if isinstance(obj, np.ma.MaskedArray):  # one rule for every entry point: masks are not applied
        raise TypeError(
            f"{name} is a masked array: ppldelta does not apply masks; pass {name}.compressed() "
            "(the unmasked values; for paired inputs, keep the same positions of both) or "
            f"{name}.filled(value)"
        )
    mod = type(obj).__module__ or ""
    if mod.startswith("torch") and hasattr(obj, "detach"):
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
            f"{name} must be a sequence or array of log-probabilities, not {type(obj).__name__}"
        )
    return arr

