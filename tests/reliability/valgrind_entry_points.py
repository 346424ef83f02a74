"""Every entry point of ppldelta._core, every dtype, layout, container and error path, on small
inputs, on every SIMD path this CPU (or valgrind's emulated CPU) supports; each result is
checked against the oracle of fuzz_core.py.

Meant to run under valgrind memcheck (see .ci/reliability):

    PYTHONMALLOC=malloc valgrind --error-exitcode=1 --leak-check=full \\
        python tests/reliability/valgrind_entry_points.py

and also runs (fast) on its own.  Prints one summary line; exits non-zero on a mismatch.
"""
from __future__ import annotations

import array
import decimal
import fractions
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reliability import fuzz_core as fc  # noqa: E402
from reliability.fuzz_core import Case  # noqa: E402

from ppldelta import _core  # noqa: E402

INF, NAN = math.inf, math.nan


def arrays():
    """(description, array) in every dtype and layout, 1073 values or fewer."""
    rng = np.random.default_rng(7)
    b = -rng.exponential(2.0, (37, 29))
    for dt in ["<f8", "<f4", "<f2", ">f8", ">f4", ">f2", "g"]:
        a = b.astype(dt)
        yield f"{dt} C", a
        yield f"{dt} F", np.asfortranarray(a)
        yield f"{dt} T", a.T
        yield f"{dt} step", a[::2, ::3]
        yield f"{dt} reversed", a[::-1, ::-1]
        yield f"{dt} 1d-step7", a.reshape(-1)[::7]
        yield f"{dt} 1d-rev", a.reshape(-1)[::-1]
        yield f"{dt} zero-stride", np.lib.stride_tricks.as_strided(a.reshape(-1)[:1], shape=(3000,), strides=(0,))
        yield f"{dt} broadcast", np.broadcast_to(a[0], (5, 29))
        for off in (1, 3):
            raw = bytearray(a.nbytes + off)
            u = np.frombuffer(raw, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape)
            u[...] = a
            yield f"{dt} unaligned+{off}", u
        yield f"{dt} 0-d", np.array(a[0, 0])
        ro = a.copy()
        ro.flags.writeable = False
        yield f"{dt} read-only", ro
        yield f"{dt} 3-d", a.reshape(-1)[:1060].reshape(10, 2, 53).transpose(2, 0, 1)
        for n in (1, 3, 15, 16, 17, 31, 33, 1023, 1024, 1025):
            yield f"{dt} n={n}", np.frombuffer(a.reshape(-1)[:n].tobytes(), dtype=a.dtype)
    ints = np.round(b).astype(np.int64)
    for dt in ["i1", "i2", "<i4", "<i8", ">i8"]:
        yield f"{dt}", ints.astype(dt)
        yield f"{dt} F", np.asfortranarray(ints.astype(dt))
    for dt in ["u1", "<u2", "<u4", "<u8"]:
        yield f"{dt} zeros", np.zeros((7, 3), dtype=dt)
    yield "bool false", np.zeros(40, dtype=bool)
    yield "subclass", b.view(fc.ArrSub)


def sequences():
    vals = (-np.random.default_rng(8).exponential(2.0, 1073)).tolist()
    yield "list", vals
    yield "tuple", tuple(vals)
    yield "list-1", vals[:1]
    yield "list-17", vals[:17]
    mixed = list(vals[:60])
    mixed[1], mixed[2], mixed[3] = -3, False, np.float32(-1.5)
    mixed[4], mixed[5], mixed[6] = np.float16(-0.25), np.int64(-7), fractions.Fraction(-1, 3)
    mixed[7], mixed[8], mixed[9] = decimal.Decimal("-0.1"), fc.Floaty(-2.5), fc.FloatSub(-0.75)
    mixed[10], mixed[11] = fc.Indexy(-4), np.float64(-9.0)
    yield "list mixed", mixed
    yield "tuple mixed", tuple(mixed)
    yield "nested list", np.array(vals[:60]).reshape(6, 10).tolist()
    yield "list of arrays", list(np.array(vals[:60]).reshape(6, 10))
    yield "tuple of tuples", tuple(tuple(r) for r in np.array(vals[:12]).reshape(3, 4).tolist())
    base = np.array(vals[:100])
    yield "memoryview f8", memoryview(base)
    yield "memoryview f4", memoryview(base.astype(np.float32))
    yield "array.array d", array.array("d", vals[:100])
    yield "array.array f", array.array("f", vals[:100])
    yield "__array__", fc.ArrayLike(base)
    yield "__array_interface__", fc.IfaceLike(base)
    yield "dlpack", fc.DLPackOnly(base)
    yield "numpy scalar", np.float64(-1.25)
    yield "tie (fsum fallback)", [-1.0, -(2.0 ** -53), -(2.0 ** -1000)]
    yield "tie x40", fc.TIE * 40
    yield "-inf", [-1.0, -INF]
    yield "overflow", [-1e308, -1e308]
    yield "huge", [-1.7976931348623157e308, -1.0]
    yield "subnormal", [-5e-324, -2.2250738585072014e-308]
    yield "slightly positive", [5e-4, -1.0, 1e-3]


def bad_inputs():
    """(description, input): each must raise, with the oracle's exception."""
    for pos in (0, 5, 1023, 1024, 1072):
        v = [-1.0] * 1073
        v[pos] = NAN
        yield f"NaN@{pos} list", v
        yield f"NaN@{pos} f8", np.array(v)
        yield f"NaN@{pos} f4 F", np.asfortranarray(np.array(v, dtype=np.float32).reshape(37, 29))
        yield f"NaN@{pos} >f2", np.array(v, dtype=">f2")
        w = list(v)
        w[pos] = 2.5
        yield f"positive@{pos} list", w
        yield f"positive@{pos} f8 T", np.array(w).reshape(29, 37).T
    yield "+inf", np.array([-1.0, INF])
    yield "Boomy", [-1.0, fc.Boomy()]
    yield "BadFloat", [-1.0, fc.BadFloat()]
    yield "BigInt", [-(10 ** 400)]
    yield "str item", [-1.0, "x"]
    yield "None item", [None]
    yield "complex item", [1j]
    yield "bytearray item", [-1.0, bytearray(b"1")]
    yield "inner list", [-1.0, [-2.0]]
    yield "ragged", [[-1.0, -2.0], [-3.0]]
    for bad in (None, "abc", b"abc", 3.0, 1 + 2j, {"a": 1}, object(), np.array(["a", "b"]),
                np.array([1 + 1j]), np.array([1.0], dtype=object), np.zeros(3, dtype="M8[s]"),
                iter([-1.0])):
        yield f"invalid {type(bad).__name__}", bad
    yield "empty list", []
    yield "empty array", np.zeros((0, 5))


def mutating():
    for how in range(6):
        holder: list = []
        holder.extend([-1.0] * 40 + [fc.SelfMutator(holder, how, -1.0)] + [-2.0] * 40)
        yield f"self-mutator how={how}", holder


def main() -> int:
    t0 = time.perf_counter()
    isas = _core.supported_simd()
    default = _core.simd()
    checks = 0
    outcomes: dict = {}

    def run(case):
        nonlocal checks
        checks += 1
        label = fc.check(case)
        outcomes[label] = outcomes.get(label, 0) + 1

    for isa in isas:
        for desc, a in list(arrays()) + list(sequences()):
            try:
                shifted = np.asarray(a, dtype=np.float64) - 0.01
            except Exception:
                shifted = None
            for op in ("perplexity", "sum"):
                run(Case.of(op, a, isa=isa, desc=desc))
            run(Case.of("delta", a, a, isa=isa, desc=desc))
            if shifted is not None:
                run(Case.of("delta", a, shifted, isa=isa, desc=desc))
        for desc, a in bad_inputs():
            for op in ("perplexity", "sum"):
                run(Case.of(op, a, isa=isa, desc=desc))
            run(Case.of("delta", [-1.0] * 1073, a, isa=isa, desc=desc))
            run(Case.of("delta", a, np.full(1073, -1.0), isa=isa, desc=desc))
        for desc, a in mutating():
            run(Case.of("perplexity", a, isa=isa, mutating=True, desc=desc))
        # thresholds, overflow, length mismatch, tolerances, argument errors
        o = [-2.0] * 10
        for pct in (0.5, 1.0 - 1e-9, 1.0 + 1e-9, 5.0, 9.99, 10.01, -3.0):
            run(Case.of("delta", o, [v - math.log1p(pct / 100) for v in o], isa=isa))
        run(Case.of("delta", [-1.0, -2.0], [-1.0, -INF], isa=isa))
        run(Case.of("delta", [-1.0], [-800.0], isa=isa))
        run(Case.of("delta", [-INF, -1.0], [-1.0, -1.0], isa=isa))
        run(Case.of("delta", [-1e308, -1e308], [-1.0, -1.0], isa=isa))
        run(Case.of("delta", [-1.0] * 3, [-1.0] * 2, isa=isa))
        run(Case.of("delta", np.zeros((2, 3)), np.zeros(5), isa=isa))
        for tol in (0.0, 1e-3, 0.5, INF, 1e308, -1.0, NAN, "x", None, np.float32(1e-3), 0):
            run(Case.of("perplexity", [0.0005, -1.0, 0.3], tol=tol, isa=isa))
            run(Case.of("delta", [0.0005, -1.0], np.array([-1.0, 0.3]), tol=tol, isa=isa, kw=True))
            run(Case.of("sum", np.array([0.0005, -1.0, INF]), tol=tol, isa=isa))
        for argerr in (1, 2, 3, 4):
            for op in ("delta", "perplexity", "sum"):
                args = ([-1.0], [-1.0]) if op == "delta" else ([-1.0],)
                run(Case.of(op, *args, isa=isa, argerr=argerr))
        for x in (0.00005, 0.00015, -2.5e-5, 1e300, -0.0, 5e-324, INF, NAN, 4.5e11 + 0.12345):
            run(Case.of("round4", isa=isa, x=x))
    # the analysis layer's entry points: paired moments (groups, blocks, every input kind and
    # error), the reference dict from sums, the quality bands
    for isa in isas:
        _core._set_simd(isa)
        for desc, a in list(arrays()) + list(sequences()):
            try:
                n = int(np.asarray(a, dtype=np.float64).size)
                q = np.asarray(a, dtype=np.float64).reshape(-1) - 0.01
            except Exception:
                continue
            for kw in ({}, {"codes": np.arange(n) % 3, "n_groups": 3, "block_size": 7}):
                for args in ((a, q), (a, a)):
                    try:
                        _core.paired_moments(*args, **kw)
                        outcomes["moments:ok"] = outcomes.get("moments:ok", 0) + 1
                    except (ValueError, TypeError) as exc:
                        k = "moments:" + type(exc).__name__
                        outcomes[k] = outcomes.get(k, 0) + 1
                    checks += 1
        for desc, a in bad_inputs():
            for kw in ({}, {"codes": [0, 5], "n_groups": 2}, {"codes": [0.5], "n_groups": 1}):
                try:
                    _core.paired_moments(a, np.full(1073, -1.0), **kw)
                except (ValueError, TypeError, OverflowError):
                    pass
                checks += 1
    _core._set_simd(default)
    for so, sq, n in ((-10.0, -11.0, 5), (-1.0, -INF, 1), (-INF, -1.0, 1), (-1e308, -1e308, 2), (-1.0, -1.0, 0)):
        try:
            _core.reference(so, sq, n)
        except ValueError:
            pass
        checks += 1
    for pct in (-1.0, 0.5, 1.0, 4.99, 5.0, 10.0, INF, NAN):
        assert _core.quality(pct) in _core.QUALITIES
        checks += 1
    # the remaining entry points
    assert default in isas and "scalar" in isas
    for isa in isas:
        _core._set_simd(isa)
        assert _core.simd() == isa
    for bad in ("no-such-isa", 3):
        try:
            _core._set_simd(bad)
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError("_set_simd accepted %r" % (bad,))
    _core._set_simd(default)
    counts = _core._path_counts()
    assert len(counts) == 3 and all(isinstance(c, int) for c in counts)
    assert counts[2] > 0, "the superaccumulator fallback was not reached"
    print(f"valgrind_entry_points: {checks} checks on SIMD paths {' '.join(isas)} "
          f"(default {default}); path counts fast/exact/superaccumulator {counts}; outcomes {outcomes}; "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
