"""Coverage-guided fuzzer for the C core (ppldelta._core), with a pure-Python oracle.

Every fuzz input (bytes) is decoded deterministically into one call of
``ppldelta.perplexity_delta``, ``ppldelta.perplexity``, ``ppldelta._core.sum_log_probs`` or
``ppldelta._core._round4`` on a chosen SIMD path, with inputs built from the bytes:

* containers: lists, tuples (items mixing floats, ints, bools, NumPy scalars, Fractions,
  Decimals, objects with ``__float__``/``__index__``, objects whose ``__float__`` raises or
  returns a non-float, huge ints, strings, None...), nested lists, ndarrays, memoryviews,
  array.array, ``__array__``/``__array_interface__``/DLPack-only objects, invalid objects;
* ndarrays of every dtype the core reads (float64/32/16 in both byte orders, long double,
  signed/unsigned ints, bool) and some it must reject (complex, object, str, datetime),
  in every layout: C/Fortran order, transposed, strided with positive and negative steps,
  zero strides (as_strided, broadcast_to), unaligned (frombuffer on a byte buffer at an
  offset), 0-d, read-only, exact-size buffers (so that AddressSanitizer sees over-reads);
* values: NaN, +-inf, -0.0, subnormals, huge and tiny magnitudes, values just below/at/above
  the positive tolerance, ties that only a 2^-1000 term breaks (forcing the exact and the
  math.fsum fallback paths), random bit patterns;
* positive_tolerance: missing, 0, the default, huge, inf, negative, NaN, wrong types.

``check(case)`` compares the result with the oracle: math.fsum over the C-order flattened
float64 values (exact Fraction arithmetic when fsum overflows), perplexity = exp(-fsum/n), and
the delta dict with the reference's formulas (tests/oracle.py) and the documented behaviours
(empty -> ValueError, length mismatch -> ValueError, NaN -> ValueError naming the first NaN's
flat C index, value > tolerance -> ValueError naming it, original perplexity inf -> ValueError,
quantized inf -> inf fields and 'poor'; lists are validated block by block as the core reads
them).  Any mismatch, or an exception of another type, raises ``Mismatch`` (a crash for the
fuzzer).

The bugs this fuzzer found (see tests/reliability/README.md: A1, a list shrunk by code run
while the *other* input is processed; B1/B2, partial-sum overflow and inf - inf with positive
values allowed) are fixed: their inputs are generated and checked strictly by default
(``PPLDELTA_FUZZ_KNOWN_BUGS=0`` / ``PPLDELTA_FUZZ_STRICT=0`` restore the old lenient mode).

Usage:
  python tests/reliability/fuzz_core.py [libFuzzer flags] [CORPUS_DIR...]   # atheris
  python tests/reliability/fuzz_core.py --replay FILE_OR_DIR...             # check inputs
  python tests/reliability/fuzz_core.py --describe FILE                     # print a case
  python tests/reliability/fuzz_core.py --random SECONDS [CORPUS_DIR]       # no atheris:
        hypothesis-driven random inputs plus mutations of the corpus, same checks
Environment: PPLDELTA_FUZZ_STATS=path writes running counters as JSON (flushed every 0.5 s).
"""
from __future__ import annotations

import array
import decimal
import fractions
import json
import math
import operator
import os
import re
import struct
import sys
import time
import warnings

import numpy as np

import ppldelta
from ppldelta import _adapt, _core

INF = math.inf
NAN = math.nan
BLOCK = int(getattr(_core, "BLOCK", 1024))
ISAS = list(_core.supported_simd())
KEYS = ["original_perplexity", "quantized_perplexity", "absolute_delta", "relative_delta_pct",
        "quality"]
KNOWN_BUGS_MODE = os.environ.get("PPLDELTA_FUZZ_KNOWN_BUGS", "1") == "1"  # A1 fixed: on by default
STRICT = os.environ.get("PPLDELTA_FUZZ_STRICT", "1") == "1"  # B1/B2 fixed: strict by default
MAX_N = 5000

warnings.simplefilter("ignore")  # casts of huge values to float32/float16 and the like


class Mismatch(AssertionError):
    """The core disagrees with the oracle (or raised something else): a fuzzer crash."""


# ----------------------------------------------------------------------------- bytes


class Reader:
    """Deterministic decoding of fuzz bytes; reads past the end give zeros."""

    def __init__(self, data: bytes):
        self.d = bytes(data)
        self.i = 0

    def byte(self) -> int:
        if self.i >= len(self.d):
            return 0
        self.i += 1
        return self.d[self.i - 1]

    def take(self, k: int) -> bytes:
        out = self.d[self.i:self.i + k]
        self.i += len(out)
        return out + b"\0" * (k - len(out))

    def int_in(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        if span <= 1:
            return lo
        nbytes = 1 if span <= 256 else 2 if span <= 65536 else 4
        return lo + int.from_bytes(self.take(nbytes), "little") % span

    def pick(self, seq):
        return seq[self.int_in(0, len(seq) - 1)]

    def f64(self) -> float:
        return struct.unpack("<d", self.take(8))[0]

    def seed(self) -> int:
        return int.from_bytes(self.take(4), "little")


# ----------------------------------------------------------------------------- odd items


class FuzzBoom(Exception):
    """Raised by Boomy.__float__: must propagate unchanged through the core."""


class Floaty:
    def __init__(self, v):
        self.v = v

    def __float__(self):
        return self.v

    def __repr__(self):
        return f"Floaty({self.v!r})"


class FloatSub(float):
    """A float subclass whose __float__ lies: the core reads the float payload."""

    def __float__(self):
        return 12345.0


class Indexy:
    def __init__(self, k):
        self.k = k

    def __index__(self):
        return self.k

    def __repr__(self):
        return f"Indexy({self.k})"


class Boomy:
    def __float__(self):
        raise FuzzBoom("boom")

    def __repr__(self):
        return "Boomy()"


class BadFloat:
    def __float__(self):
        return "not a float"

    def __repr__(self):
        return "BadFloat()"


class SelfMutator:
    """__float__ changes the list that holds it (append, pop, clear/refill, replace)."""

    def __init__(self, target: list, how: int, v: float):
        self.target, self.how, self.v, self.calls = target, how, v, 0

    def __float__(self):
        self.calls += 1
        t = self.target
        if self.calls > 3:  # a list that grows on every read would never end math.fsum
            return self.v
        if self.how == 0:
            t.append(-1.0)
        elif self.how == 1:
            if t:
                t.pop()
        elif self.how == 2:
            saved = list(t)
            t.clear()
            t.extend(saved)
        elif self.how == 3:
            t[:] = [-0.5] * (len(t) + 3)
        elif self.how == 4:
            del t[len(t) // 2:]
        else:
            t.insert(0, -2.0)
        return self.v

    def __repr__(self):
        return f"SelfMutator(how={self.how})"


class CrossMutator:
    """Bug A1 (fixed): __float__ clears *another* list that the core has already opened."""

    def __init__(self, other: list, v: float):
        self.other, self.v = other, v

    def __float__(self):
        self.other.clear()
        self.other.append(-1.0)
        return self.v

    def __repr__(self):
        return "CrossMutator()"


class ArrayLike:
    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)

    def __repr__(self):
        return f"ArrayLike({self._a.dtype}, {self._a.shape})"


class IfaceLike:
    def __init__(self, a):
        self._a = a
        self.__array_interface__ = a.__array_interface__

    def __repr__(self):
        return f"IfaceLike({self._a.dtype}, {self._a.shape})"


class DLPackOnly:
    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()

    def __repr__(self):
        return f"DLPackOnly({self._a.dtype}, {self._a.shape})"


class ArrSub(np.ndarray):
    pass


class CrossArray:
    """Bug A1 (fixed): converting this input (via the adapter) clears the other input list."""

    def __init__(self, other: list, a):
        self.other, self._a = other, a

    def __array__(self, dtype=None, copy=None):
        self.other.clear()
        return self._a

    def __repr__(self):
        return "CrossArray()"


# ----------------------------------------------------------------------------- values

TIE = [-1.0, -(2.0 ** -53), -(2.0 ** -1000)]  # a midpoint broken by 2^-1000: exact + fsum paths


def _palette(r: Reader) -> float:
    k = r.byte() % 40
    if k < 8:
        return -r.int_in(0, 2000) / 64.0
    if k < 12:
        return -math.ldexp(r.int_in(1, 2 ** 20), -r.int_in(0, 70))
    if k < 14:
        return float(np.float32(-math.ldexp(r.int_in(1, 2 ** 16), -r.int_in(0, 40))))
    return [
        -0.0, 0.0, NAN, -INF, INF, -5e-324, 5e-324, -2.2250738585072014e-308,
        1e-300, 5e-4, 1e-3, 1.0000000000000002e-3, 2e-3, 0.5, 1.0, -1e308,
        -1.7976931348623157e308, 1e308, r.f64(), -(2.0 ** -r.int_in(40, 1074)),
        -float(r.int_in(0, 30)), -2.0 ** -53, -1.0, -(1 + 2.0 ** -52), -1e-12, -745.5,
    ][k - 14]


def _values(r: Reader, n: int) -> list:
    mode = r.byte() % 6
    if n == 0:
        return []
    if mode == 0:  # every element from the palette
        return [_palette(r) for _ in range(n)]
    if mode == 1:  # constant
        return [_palette(r)] * n
    if mode == 5:  # the tie pattern, padded
        pad = _palette(r)
        base = (TIE * (n // 3 + 1))[:n]
        return [pad if i % 7 == 6 else v for i, v in enumerate(base)]
    # random distribution + sprinkled specials
    rng = np.random.default_rng(r.seed())
    dist = r.byte() % 6
    if dist == 0:
        v = rng.uniform(-8, 0, n)
    elif dist == 1:
        v = -rng.exponential(2.0, n) ** 1.5
    elif dist == 2:
        v = np.where(rng.random(n) < 0.05, -rng.uniform(10, 30, n), -rng.exponential(0.05, n))
    elif dist == 3:
        v = rng.uniform(-0.01, 0.002, n)
    elif dist == 4:
        v = -rng.lognormal(0.5, 1.2, n)
    else:
        v = (-rng.exponential(2.0, n)).astype(np.float32).astype(np.float64)
    out = v.tolist()
    for _ in range(r.byte() % 5 if mode == 2 else 0):
        out[r.int_in(0, n - 1)] = _palette(r)
    if mode == 4:  # shift onto a quality threshold later (delta): keep as is here
        pass
    return out


# ----------------------------------------------------------------------------- inputs

N_CHOICES = [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1023,
             1024, 1025, 2047, 2048, 2049, 3071, 4095, 4097]


def _pick_n(r: Reader) -> int:
    k = r.byte() % 4
    if k == 0:
        return r.pick(N_CHOICES)
    if k == 1:
        return r.int_in(0, 300)
    if k == 2:
        return r.int_in(0, MAX_N)
    return r.int_in(0, 12)


FLOAT_DTYPES = ["<f8", "<f4", "<f2", ">f8", ">f4", ">f2", "g"]
INT_DTYPES = ["i1", "i2", "<i4", "<i8", ">i8", "u1", "<u2", "<u4", "<u8", "?"]
BAD_DTYPES = ["c16", "O", "U3", "M8[s]", "V8"]


def _shape_for(r: Reader, n: int):
    nd = r.pick([1, 1, 2, 2, 3])
    if nd == 1 or n == 0:
        return (n,) if nd == 1 else (0, r.int_in(0, 3))
    if nd == 2:
        divs = [d for d in range(1, min(n, 64) + 1) if n % d == 0]
        a = r.pick(divs)
        return (a, n // a)
    a = r.int_in(1, 4)
    b = r.int_in(1, 5)
    c = max(1, n // (a * b))
    return (a, b, c)


def _typed_array(r: Reader, dt: str, count: int):
    """count values of dtype dt (floats from _values; ints/bools from their own ranges)."""
    dtype = np.dtype(dt)
    if dtype.kind == "f":
        with np.errstate(all="ignore"):
            return np.array(_values(r, count), dtype=np.float64).astype(dtype)
    rng = np.random.default_rng(r.seed())
    if dtype.kind == "b":
        return rng.random(count) < [0.0, 0.01, 0.5][r.byte() % 3]
    info = np.iinfo(dtype)
    lo, hi = [(max(info.min, -100), 0), (info.min, 0), (info.min, info.max), (0, 1), (0, 0)][r.byte() % 5]
    return rng.integers(lo, hi, count, dtype=dtype.newbyteorder("="), endpoint=True).astype(dtype)


def _make_array(r: Reader, n: int):
    """An ndarray with n elements (or another count for some layouts) and a chosen layout."""
    k = r.byte() % 20
    dt = FLOAT_DTYPES[k % 7] if k < 14 else INT_DTYPES[r.byte() % len(INT_DTYPES)]
    if k == 19:
        dt = BAD_DTYPES[r.byte() % len(BAD_DTYPES)]
        try:
            return np.zeros(max(n, 1), dtype=dt), f"bad-dtype {dt}"
        except (TypeError, ValueError):
            return np.zeros(max(n, 1), dtype="c16"), "bad-dtype c16"
    layout = r.byte() % 14
    dtype = np.dtype(dt)
    if layout == 0:  # exact-size buffer (bytes): over-reads hit the end of the allocation
        a = _typed_array(r, dt, n)
        return np.frombuffer(a.tobytes(), dtype=dtype), f"{dt} frombuffer-exact n={n}"
    if layout == 1:  # C-contiguous nd
        shape = _shape_for(r, n)
        a = _typed_array(r, dt, int(np.prod(shape))).reshape(shape)
        return a, f"{dt} C {shape}"
    if layout == 2:  # Fortran
        shape = _shape_for(r, n)
        a = np.asfortranarray(_typed_array(r, dt, int(np.prod(shape))).reshape(shape))
        return a, f"{dt} F {shape}"
    if layout == 3:  # transposed
        shape = _shape_for(r, n)
        a = _typed_array(r, dt, int(np.prod(shape))).reshape(shape).T
        return a, f"{dt} T {shape}"
    if layout == 4:  # 1-D strided, positive or negative step
        step = r.pick([2, 3, 5, -1, -2, -3])
        base = _typed_array(r, dt, n * abs(step))
        return base[::step], f"{dt} 1d-step {step} n={n}"
    if layout == 5:  # nd strided with negative steps
        shape = _shape_for(r, n)
        big = tuple(s * 2 for s in shape)
        base = _typed_array(r, dt, int(np.prod(big))).reshape(big)
        sl = tuple(slice(None, None, r.pick([2, -2, -1])) for _ in shape)
        return base[sl], f"{dt} nd-step {shape}"
    if layout == 6:  # zero stride, 1-D (sometimes huge)
        count = r.pick([n] * 14 + [10 ** 5, 2 * 10 ** 5])  # long runs: rare (slow oracle)
        base = _typed_array(r, dt, 1)
        return np.lib.stride_tricks.as_strided(base, shape=(count,), strides=(0,)), f"{dt} zero-stride n={count}"
    if layout == 7:  # broadcast (zero stride in one dim of an nd array)
        shape = _shape_for(r, n)
        if len(shape) < 2:
            shape = (1, shape[0])
        row = _typed_array(r, dt, shape[-1])
        return np.broadcast_to(row, shape), f"{dt} broadcast {shape}"
    if layout == 8:  # unaligned
        off = r.int_in(1, 7)
        a = _typed_array(r, dt, n)
        raw = bytearray(a.nbytes + off)
        u = np.frombuffer(raw, dtype=dtype, count=n, offset=off)
        u[...] = a
        if r.byte() % 2 and n > 1:
            shape = _shape_for(r, n)
            if int(np.prod(shape)) == n:
                u = u.reshape(shape)
        return u, f"{dt} unaligned+{off} {u.shape}"
    if layout == 9:  # 0-d
        a = _typed_array(r, dt, 1)
        return np.array(a[0], dtype=dtype), f"{dt} 0-d"
    if layout == 10:  # read-only
        a = _typed_array(r, dt, n)
        a.flags.writeable = False
        return a, f"{dt} read-only n={n}"
    if layout == 11:  # ndarray subclass
        return _typed_array(r, dt, n).view(ArrSub), f"{dt} subclass n={n}"
    if layout == 12:  # 3-d transposed axes
        a = _typed_array(r, dt, max(n, 1) * 2).reshape(2, max(n, 1), 1)[:, :n]
        return a.transpose(1, 2, 0), f"{dt} 3d-transpose n={n}"
    a = _typed_array(r, dt, n)
    return a, f"{dt} contiguous n={n}"


ITEM_KINDS = ["float"] * 8 + ["int", "bool", "np.float32", "np.float64", "np.float16", "np.int64",
                              "Fraction", "Decimal", "Floaty", "FloatSub", "Indexy", "Boomy",
                              "BadFloat", "BigInt", "str", "None", "complex", "bytes",
                              "bytearray", "innerlist", "SelfMutator"]


def _item(r: Reader, v: float, kind: str, holder: list):
    finite = math.isfinite(v)
    if kind == "int" and finite:
        return int(v)
    if kind == "bool":
        return bool(r.byte() & 1) if v > 0 else False
    if kind == "np.float32":
        return np.float32(v)
    if kind == "np.float64":
        return np.float64(v)
    if kind == "np.float16":
        return np.float16(v)
    if kind == "np.int64" and finite and abs(v) < 9e18:
        return np.int64(int(v))
    if kind == "Fraction" and finite:
        return fractions.Fraction(v)
    if kind == "Decimal":
        return decimal.Decimal(v)
    if kind == "Floaty":
        return Floaty(v)
    if kind == "FloatSub":
        return FloatSub(v)
    if kind == "Indexy" and finite:
        return Indexy(int(v))
    if kind == "Boomy":
        return Boomy()
    if kind == "BadFloat":
        return BadFloat()
    if kind == "BigInt":
        return r.pick([-(10 ** 400), 10 ** 400, -(2 ** 1023), -(2 ** 1024)])
    if kind == "str":
        return "-1.0"
    if kind == "None":
        return None
    if kind == "complex":
        return complex(v, 0.0) if finite else 1j
    if kind == "bytes":
        return b"-1"
    if kind == "bytearray":
        return bytearray(b"-1")
    if kind == "innerlist":
        return [v]
    if kind == "SelfMutator":
        return SelfMutator(holder, r.byte() % 6, v if finite else -1.0)
    return v


def _make_source(r: Reader, n: int, info: dict):
    """One input (list, tuple, ndarray, array-like, invalid object) with about n values."""
    kind = r.byte() % 16
    if kind < 6:
        a, desc = _make_array(r, n)
        return a, "ndarray " + desc
    if kind in (6, 7, 8, 9):
        vals = _values(r, n)
        mixed = kind >= 8
        holder: list = []
        if mixed:
            # a few item kinds per list, so that most mixed lists are valid input
            kinds = [ITEM_KINDS[r.byte() % len(ITEM_KINDS)] for _ in range(r.int_in(1, 3))]
            if "SelfMutator" in kinds and r.byte() % 4:
                kinds.remove("SelfMutator")
            kinds = kinds or ["float"]
            density = r.pick([1, 2, 4, 16])
            items = []
            for v in vals:
                k = kinds[r.byte() % len(kinds)] if r.byte() % density == 0 else "float"
                it = _item(r, v, k, holder)
                if isinstance(it, SelfMutator):
                    info["mutating"] = True
                items.append(it)
        else:
            items = vals
        if kind in (7, 9) and not info.get("mutating"):
            return tuple(items), f"tuple n={n}{' mixed' if mixed else ''}"
        holder.extend(items)
        return holder, f"list n={n}{' mixed' if mixed else ''}"
    if kind == 10:  # nested: list of lists / tuples / rows of arrays
        shape = _shape_for(r, n)
        if len(shape) == 1:
            shape = (1, shape[0])
        a = np.array(_values(r, int(np.prod(shape))), dtype=np.float64).reshape(shape)
        m = a.reshape(shape[0], int(np.prod(shape[1:])))
        style = r.byte() % 4
        if style == 0:
            return a.tolist(), f"nested-list {shape}"
        if style == 1:
            return tuple(tuple(row) for row in m.tolist()), f"nested-tuple {shape}"
        if style == 2:
            return [row for row in m], f"list-of-arrays {shape}"
        rows = m.tolist()
        if rows and len(rows[-1]) > 0:
            rows[-1] = rows[-1][:-1]  # ragged
        return rows, f"ragged {shape}"
    if kind in (11, 12, 13):
        base = np.ascontiguousarray(np.array(_values(r, n), dtype=np.float64))
        style = r.byte() % 8
        if style == 0:
            return memoryview(base), f"memoryview f8 n={n}"
        if style == 1:
            return memoryview(base.astype(np.float32)), f"memoryview f4 n={n}"
        if style == 2:
            return array.array("d", base.tolist()), f"array.array d n={n}"
        if style == 3:
            return array.array("f", base.astype(np.float32).tolist()), f"array.array f n={n}"
        if style == 4:
            return ArrayLike(base), f"__array__ n={n}"
        if style == 5:
            return IfaceLike(base), f"__array_interface__ n={n}"
        if style == 6:
            return DLPackOnly(base), f"dlpack n={n}"
        return (np.float64(base[0]) if n else np.float32(-1.0)), "numpy scalar"
    if kind == 14:
        bad = r.pick([None, 3.0, -1, "abc", b"abc", bytearray(b"ab"), {"a": 1}, {1.0}, 1 + 2j,
                      object(), Floaty(-1.0), range(3), iter([-1.0])])
        return bad, f"invalid {type(bad).__name__}"
    vals = _values(r, n)
    return vals, f"list n={n}"


# ----------------------------------------------------------------------------- cases

MISSING = object()
TOLS = [MISSING, MISSING, MISSING, 1e-3, 0.0, -0.0, 5e-4, 1e-2, 0.5, 1.0, 2.0, 1e10, 1e300,
        1.7976931348623157e308, INF, -1.0, NAN, 0, 1, np.float32(1e-3), "x", None]


class Case:
    def __init__(self):
        self.op = "delta"
        self.isa = "scalar"
        self.tol = MISSING
        self.kw = False
        self.args: list = []
        self.desc: list = []
        self.mutating = False
        self.x = 0.0  # _round4 argument
        self.argerr = 0

    @classmethod
    def of(cls, op, *args, tol=MISSING, isa=None, kw=False, argerr=0, mutating=False, x=0.0,
           desc=None):
        """A hand-made case (valgrind_entry_points.py, tests)."""
        c = cls()
        c.op, c.args, c.tol, c.kw, c.argerr, c.mutating, c.x = op, list(args), tol, kw, argerr, mutating, x
        c.isa = isa or _core.simd()
        c.desc = [desc or type(a).__name__ for a in args]
        return c

    def __repr__(self):
        tol = "default" if self.tol is MISSING else repr(self.tol)
        if self.op == "round4":
            return f"Case(_round4({self.x!r}), isa={self.isa})"
        return (f"Case({self.op}, isa={self.isa}, tol={tol}, kw={self.kw}, "
                f"args=[{'; '.join(self.desc)}]{', mutating' if self.mutating else ''}"
                f"{', argerr=%d' % self.argerr if self.argerr else ''})")


def decode(data: bytes) -> Case:
    r = Reader(data)
    c = Case()
    c.op = r.pick(["delta", "delta", "delta", "delta", "perplexity", "perplexity", "sum", "sum",
                   "round4", "delta"])
    c.isa = r.pick(ISAS)
    t = r.byte()
    c.tol = TOLS[t % len(TOLS)] if t < 240 else abs(r.f64())
    c.kw = bool(r.byte() & 1)
    c.argerr = r.byte() % 32
    c.argerr = c.argerr if c.argerr < 5 else 0
    if c.op == "round4":
        c.x = r.f64() if r.byte() & 1 else (r.int_in(-10 ** 9, 10 ** 9) + 0.5) / 10 ** r.int_in(0, 8)
        return c
    info: dict = {}
    n = _pick_n(r)
    a, da = _make_source(r, n, info)
    c.args, c.desc = [a], [da]
    if c.op == "delta":
        mode = r.byte() % 8
        if mode == 0:  # independent input of its own size
            b, db = _make_source(r, _pick_n(r), info)
        elif mode == 1:  # the same object twice
            b, db = a, "same object"
        elif mode in (2, 3):  # the same values shifted onto a quality threshold (or near it)
            try:
                vals = np.asarray(a, dtype=np.float64).reshape(-1)
            except Exception:
                vals = np.full(n, -1.0)
            t = r.pick([1.0, 5.0, 10.0, 0.0, -3.0]) + r.pick([0.0, 1e-6, -1e-6, 1e-9, -1e-9, 1e-12, -1e-12])
            with np.errstate(all="ignore"):
                q = vals - math.log1p(t / 100)
            b = q.tolist() if mode == 2 else q
            db = f"shifted t={t} ({'list' if mode == 2 else 'ndarray'})"
        elif mode == 4 and KNOWN_BUGS_MODE and isinstance(a, list):
            other = _values(r, len(a))
            other[-1:] = [CrossMutator(a, -1.0)] if other else []
            b, db = other, "KNOWN-BUG A1 cross-mutator list"
            info["mutating"] = True
        elif mode == 5 and KNOWN_BUGS_MODE and isinstance(a, list):
            b, db = CrossArray(a, np.full(len(a), -1.0)), "KNOWN-BUG A1 cross-array"
            info["mutating"] = True
        else:  # same size, own values and container
            b, db = _make_source(r, n, info)
        c.args.append(b)
        c.desc.append(db)
    c.mutating = bool(info.get("mutating"))
    return c


# ----------------------------------------------------------------------------- oracle


class Raise:
    """An expected exception: exact type and a regex searched in its message."""

    def __init__(self, typ, pattern=None):
        self.typ, self.pattern = typ, pattern

    def __repr__(self):
        return f"Raise({self.typ.__name__}, {self.pattern!r})"


class Expect(Exception):
    def __init__(self, raise_: Raise):
        super().__init__(raise_)
        self.r = raise_


def _item_value(it, name: str, i: int) -> float:
    """What pd_item_to_double makes of a list item."""
    if isinstance(it, float):
        return float.__float__(it)
    if isinstance(it, (complex, str, bytes)) or it is None:
        raise Expect(Raise(TypeError, rf"^{name}\[{i}\] is "))
    t = type(it)
    try:
        if hasattr(t, "__float__"):
            v = it.__float__()
            if not isinstance(v, float):
                raise TypeError("non-float")
            return float(v)
        if hasattr(t, "__index__"):
            return float(operator.index(it))
        raise TypeError("not a number")
    except OverflowError:
        raise Expect(Raise(ValueError, rf"^{name}\[{i}\] is an integer too large")) from None
    except TypeError:
        raise Expect(Raise(TypeError, rf"^{name}\[{i}\] is ")) from None
    except Expect:
        raise
    except Exception as exc:  # FuzzBoom and friends propagate as they are
        raise Expect(Raise(type(exc), re.escape(str(exc)))) from None


def _bad_value(name: str, i: int, v: float) -> Raise:
    if math.isnan(v):
        return Raise(ValueError, rf"^{name} contains NaN at index {i}\b")
    return Raise(ValueError, rf"^{name}\[{i}\]( \(flat C-order index; position \[[0-9, ]*\]\))? = .* is positive")


class Src:
    """The oracle's view of one opened input."""

    def __init__(self, kind, obj, n, arr=None):
        self.kind, self.obj, self.n, self.arr = kind, obj, n, arr


def oracle_open(x, name: str) -> Src:
    if isinstance(x, (list, tuple)):
        if len(x) == 0 or not isinstance(x[0], (list, tuple, np.ndarray)):
            return Src("seq", x, len(x))
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = _adapt.as_array(x, name)
        except Exception as exc:
            raise Expect(Raise(type(exc))) from None
        if not isinstance(arr, np.ndarray):
            raise Expect(Raise(TypeError))
    if arr.dtype.kind not in "fiub":
        raise Expect(Raise(TypeError))
    return Src("array", arr, int(arr.size), arr)


def oracle_values(src: Src, name: str, tol: float) -> list:
    """The values the core sums, validated the way the core validates them."""
    if src.kind == "seq":
        out = []
        n = src.n
        for start in range(0, n, BLOCK):
            block = [_item_value(src.obj[i], name, i) for i in range(start, min(n, start + BLOCK))]
            for j, v in enumerate(block):
                if not (v <= tol):
                    raise Expect(_bad_value(name, start + j, v))
            out.extend(block)
        return out
    with np.errstate(all="ignore"):
        vals = np.asarray(src.arr, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~(vals <= tol))
    if bad.size:
        i = int(bad[0])
        raise Expect(_bad_value(name, i, float(vals[i])))
    return vals.tolist()


def _round_fraction(f: fractions.Fraction) -> float:
    limit = 2 ** 1024 - 2 ** 970  # values at or beyond this round to infinity
    if abs(f) >= limit:
        return INF if f > 0 else -INF
    return float(f)


def exact_sum(vals: list) -> float:
    """Correctly rounded sum (math.fsum), with overflow to +-inf; NaN for inf - inf."""
    has_pinf = INF in vals
    has_ninf = -INF in vals
    if has_pinf and has_ninf:
        return NAN
    if has_ninf:
        return -INF
    if has_pinf:
        return INF
    try:
        return math.fsum(vals)
    except OverflowError:
        return _round_fraction(sum((fractions.Fraction(v) for v in vals), fractions.Fraction(0)))


def positive_overflow_domain(vals: list) -> bool:
    """KNOWN BUG B1 (only with a huge positive_tolerance): the core's accumulator records an
    overflow of its running sum as +-inf, even when the exact sum is finite, e.g.
    sum_log_probs([1e308, 1e308, -1e308], positive_tolerance=inf) gives inf, not 1e308 (and
    [-1e308, -1e308, 1e308] gives -inf).  With every value <= a small tolerance, an overflow
    of the running sum implies an overflow of the exact sum, so the default is not affected.
    (Before the fix in progress, +inf values also came out as -inf: now they are right.)"""
    if INF in vals and -INF in vals:
        # KNOWN BUG B2: +inf and -inf together (positive_tolerance=inf only): math.fsum raises,
        # the reference's sum() gives nan; the core gives -inf or nan depending on the SIMD
        # path and on whether the two land in the same lane.
        return True
    finite = [v for v in vals if math.isfinite(v)]
    try:
        pos = math.fsum(v for v in finite if v > 0)
    except OverflowError:
        return True
    try:
        neg = math.fsum(v for v in finite if v < 0)
    except OverflowError:
        neg = -INF
    return pos > 2.0 ** 1000 or (neg < -(2.0 ** 1000) and pos > 0)


def cexp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def _tol_value(tol):
    if tol is MISSING:
        return 1e-3
    try:
        if isinstance(tol, (str, bytes)) or tol is None:
            raise TypeError
        t = float(tol)
    except TypeError:
        raise Expect(Raise(TypeError)) from None
    if not (t >= 0.0):
        raise Expect(Raise(ValueError, "^positive_tolerance must be a number >= 0"))
    return t


def delta_fields(so: float, sq: float, n: int):
    """pd_fields_eval + the checks after it, in the reference's order."""
    avg_o = so / n
    avg_q = sq / n
    ppl_o = cexp(-avg_o)
    ppl_q = cexp(-avg_q)
    absolute = ppl_q - ppl_o
    rel = (absolute / ppl_o) * 100 if ppl_o > 0 else 0.0
    if math.isinf(ppl_o):
        raise Expect(Raise(ValueError, "^the original model's perplexity overflows"))
    quality = ("excellent" if rel < 1.0 else "good" if rel < 5.0
               else "acceptable" if rel < 10.0 else "poor")
    return {KEYS[0]: round(ppl_o, 4), KEYS[1]: round(ppl_q, 4), KEYS[2]: round(absolute, 4),
            KEYS[3]: round(rel, 4), KEYS[4]: quality}


def expected(case: Case):
    """('ok', value, known_bug_domain) or ('raise', Raise, known_bug_domain)."""
    domain = False
    try:
        if case.op == "round4":
            return "ok", round(case.x, 4), False
        if case.argerr:
            return "raise", Raise(TypeError), False
        tol = _tol_value(case.tol)
        if case.op == "delta":
            names = ["original_log_probs", "quantized_log_probs"]
            srcs = [oracle_open(case.args[0], names[0]), oracle_open(case.args[1], names[1])]
            if srcs[0].n == 0 or srcs[1].n == 0:
                which = names[0] if srcs[0].n == 0 else names[1]
                raise Expect(Raise(ValueError, rf"^{which} is empty"))
            if srcs[0].n != srcs[1].n:
                raise Expect(Raise(ValueError, rf"^length mismatch: original_log_probs has "
                                               rf"{srcs[0].n} values, quantized_log_probs has {srcs[1].n} "))
            vo = oracle_values(srcs[0], names[0], tol)
            vq = oracle_values(srcs[1], names[1], tol)
            domain = positive_overflow_domain(vo) or positive_overflow_domain(vq)
            so, sq = exact_sum(vo), exact_sum(vq)
            return "ok", delta_fields(so, sq, srcs[0].n), domain
        src = oracle_open(case.args[0], "log_probs")
        if case.op == "perplexity" and src.n == 0:
            raise Expect(Raise(ValueError, "^log_probs is empty"))
        vals = oracle_values(src, "log_probs", tol)
        domain = positive_overflow_domain(vals)
        s = exact_sum(vals) if vals else 0.0
        if case.op == "sum":
            return "ok", (src.n, s), domain
        return "ok", cexp(-(s / src.n)), domain
    except Expect as e:
        return "raise", e.r, domain


def _call(case: Case):
    if case.op == "round4":
        return _core._round4(case.x)
    kw = {} if case.tol is MISSING else {"positive_tolerance": case.tol}
    if case.op == "delta":
        f = ppldelta.perplexity_delta
        names = ("original_log_probs", "quantized_log_probs")
    elif case.op == "perplexity":
        f, names = ppldelta.perplexity, ("log_probs",)
    else:
        f, names = _core.sum_log_probs, ("log_probs",)
    args = list(case.args)
    if case.argerr == 1:  # one positional argument too many
        return f(*args, [-1.0])
    if case.argerr == 2:  # unexpected keyword
        return f(*args, tolerance=1e-3)
    if case.argerr == 3:  # duplicate
        return f(*args, **{names[0]: args[0]})
    if case.argerr == 4:  # missing
        return f(*args[:-1])
    if case.kw:
        return f(**dict(zip(names, args)), **kw)
    return f(*args, **kw)


def execute(case: Case):
    """('ok', value) or ('raise', exception) from the core on the case's SIMD path."""
    before = _core.simd()
    _core._set_simd(case.isa)
    try:
        return "ok", _call(case)
    except Exception as exc:  # noqa: BLE001 - every exception is compared with the oracle
        return "raise", exc
    finally:
        _core._set_simd(before)


def _same_float(a, b) -> bool:
    if type(a) is not float or type(b) is not float:
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b


def _same(got, want) -> bool:
    if isinstance(want, dict):
        return (isinstance(got, dict) and list(got) == KEYS and got["quality"] == want["quality"]
                and all(_same_float(got[k], want[k]) for k in KEYS[:4]))
    if isinstance(want, tuple):
        return (isinstance(got, tuple) and len(got) == 2 and type(got[0]) is int
                and got[0] == want[0] and _same_float(got[1], want[1]))
    if isinstance(want, float) and want == 0.0 and isinstance(got, float) and got == 0.0:
        return math.copysign(1, want) == math.copysign(1, got)
    return _same_float(got, want)


STATS = {"executions": 0, "calls": {}, "outcomes": {}, "known_bug_hits": 0, "mutating": 0,
         "skipped_oracle": 0, "max_n": 0}
_STATS_PATH = os.environ.get("PPLDELTA_FUZZ_STATS")
_last_flush = [0.0]


def flush_stats(force=False):
    if not _STATS_PATH:
        return
    now = time.monotonic()
    if force or now - _last_flush[0] > 0.5:
        _last_flush[0] = now
        tmp = _STATS_PATH + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(STATS, fh)
        os.replace(tmp, _STATS_PATH)


def _count(d: str, key: str):
    STATS[d][key] = STATS[d].get(key, 0) + 1


def check(case: Case) -> str:
    """Run the case and compare with the oracle; raise Mismatch on any disagreement."""
    STATS["executions"] += 1
    _count("calls", case.op)
    for a in case.args:
        if isinstance(a, (list, tuple, np.ndarray)):
            STATS["max_n"] = max(STATS["max_n"], len(a) if not isinstance(a, np.ndarray) else int(a.size))
    if case.mutating:
        # Values change while the core reads them: only "no crash, a sane outcome" is checked.
        STATS["mutating"] += 1
        STATS["skipped_oracle"] += 1
        kind, got = execute(case)
        label = "ok" if kind == "ok" else type(got).__name__
        _count("outcomes", "mutating:" + label)
        if kind == "raise" and not isinstance(got, (ValueError, TypeError, RuntimeError, FuzzBoom)):
            raise Mismatch(f"{case}: unexpected {type(got).__name__}: {got}")
        flush_stats()
        return "mutating:" + label
    wkind, want, domain = expected(case)
    kind, got = execute(case)
    ok = False
    if wkind == "ok" and kind == "ok":
        ok = _same(got, want)
    elif wkind == "raise" and kind == "raise":
        ok = type(got) is want.typ and (want.pattern is None or re.search(want.pattern, str(got)) is not None)
    if not ok and domain and not STRICT:
        STATS["known_bug_hits"] += 1
        _count("outcomes", "known-bug-B1B2")
        flush_stats()
        return "known-bug-B1B2"
    if not ok:
        gdesc = repr(got) if kind == "ok" else f"{type(got).__name__}: {got}"
        raise Mismatch(f"{case}\n  core:   {gdesc}\n  oracle: {want!r}")
    label = "ok" if kind == "ok" else type(got).__name__
    _count("outcomes", label)
    flush_stats()
    return label


def check_bytes(data: bytes) -> str:
    return check(decode(data))


# ----------------------------------------------------------------------------- drivers


def _corpus_files(paths):
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                f = os.path.join(p, name)
                if os.path.isfile(f):
                    yield f
        else:
            yield p


def replay(paths) -> int:
    bad = 0
    for f in _corpus_files(paths):
        with open(f, "rb") as fh:
            data = fh.read()
        try:
            label = check_bytes(data)
            print(f"ok  {os.path.basename(f)}: {label}")
        except Mismatch as exc:
            bad += 1
            print(f"BAD {f}: {exc}")
    flush_stats(True)
    return 1 if bad else 0


def _mutate(data: bytes, rnd) -> bytes:
    b = bytearray(data or b"\0")
    for _ in range(rnd.randint(1, 8)):
        if not b:
            b.append(rnd.randrange(256))
        op = rnd.randrange(4)
        i = rnd.randrange(len(b))
        if op == 0:
            b[i] = rnd.randrange(256)
        elif op == 1:
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 2 and len(b) < 4096:
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif len(b) > 1:
            del b[i:i + rnd.randint(1, 4)]
    return bytes(b)


def random_fuzz(seconds: float, corpus_dirs, crash_dir=".") -> int:
    """Fallback without atheris: hypothesis-generated byte strings plus mutations of the corpus
    (no coverage guidance), through the same decoder and checker."""
    import random

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seeds = []
    for f in _corpus_files(corpus_dirs):
        with open(f, "rb") as fh:
            seeds.append(fh.read())
    rnd = random.Random(int(time.time()))
    deadline = time.monotonic() + seconds

    def one(data):
        try:
            check_bytes(data)
        except Mismatch:
            path = os.path.join(crash_dir, "crash-random-%d" % int(time.time() * 1000))
            with open(path, "wb") as fh:
                fh.write(data)
            print(f"crash input written to {path}", file=sys.stderr)
            raise

    @settings(max_examples=200, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=1, max_size=2048))
    def batch(data):
        one(data)

    while time.monotonic() < deadline:
        batch()
        for _ in range(200):
            if seeds:
                one(_mutate(rnd.choice(seeds), rnd))
    flush_stats(True)
    return 0


def main(argv):
    if len(argv) > 1 and argv[1] == "--replay":
        return replay(argv[2:])
    if len(argv) > 1 and argv[1] == "--describe":
        for f in _corpus_files(argv[2:]):
            with open(f, "rb") as fh:
                c = decode(fh.read())
            print(os.path.basename(f), c)
            print("   oracle:", expected(c)[:2] if not c.mutating else "(mutating: not computed)")
        return 0
    if len(argv) > 2 and argv[1] == "--random":
        return random_fuzz(float(argv[2]), argv[3:])
    import atheris

    # Python-level coverage of the harness (the oracle's branches are the input classes) and
    # of the adapter; native coverage comes from building _core with -fsanitize=fuzzer-no-link.
    # Functions that run once per input only: instrumenting the per-value loops (_palette,
    # _item, _item_value, oracle_values) costs 5x in executions for little signal.
    if os.environ.get("PPLDELTA_FUZZ_PYCOV", "1") == "1":
        for fn in (decode, _make_source, _make_array, expected, oracle_open, delta_fields,
                   _adapt.as_array):
            try:
                atheris.instrument_func(fn)
            except Exception:  # pragma: no cover - instrumentation is best effort
                pass

    def test_one_input(data: bytes):
        check_bytes(data)

    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
