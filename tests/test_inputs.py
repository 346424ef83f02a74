"""Every input the core accepts (zero-copy layouts, casts, lists, torch, buffers) and every
input it must reject, with the messages users see."""
import array
import gc
import math
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import ppldelta
from _deps import needs_torch, torch
from ppldelta import _core
from oracle import fsum_perplexity

RNG = np.random.default_rng(42)
BASE = -RNG.exponential(2.0, (37, 29))  # 1073 values: exercises blocks and SIMD tails


def _flat_c(a):
    return np.asarray(a, dtype=np.float64).reshape(-1).tolist()


def _zoo():
    """(name, array) with the same logical values laid out every way NumPy allows."""
    b = BASE
    yield "c-contig", b.copy()
    yield "fortran", np.asfortranarray(b)
    yield "transposed", b.T
    yield "strided", b[::2, ::3]
    yield "reversed", b[::-1, ::-1]
    yield "1d-strided", b.reshape(-1)[::7]
    yield "1d-reversed", b.reshape(-1)[::-1]
    yield "0-d", np.array(-1.25)
    ro = b.copy()
    ro.flags.writeable = False
    yield "read-only", ro
    raw = np.zeros(b.size * 8 + 1, dtype=np.uint8)
    un = np.frombuffer(raw.data, dtype=np.float64, count=b.size, offset=1).reshape(b.shape)
    un[...] = b
    assert not un.flags.aligned
    yield "unaligned", un
    yield "big-endian", b.astype(">f8")
    yield "float32", b.astype(np.float32)
    yield "float32-big-endian", b.astype(">f4")
    yield "float32-fortran-strided", np.asfortranarray(b.astype(np.float32))[::2, ::-1]
    yield "float16", b.astype(np.float16)
    yield "float16-strided", b.astype(np.float16)[:, ::2]
    yield "float16-big-endian", b.astype(">f2")
    yield "longdouble", b.astype(np.longdouble)
    yield "int64", np.round(b).astype(np.int64)
    yield "uint8-zeros", np.zeros(10, dtype=np.uint8)
    yield "bool-false", np.zeros(5, dtype=bool)
    yield "3-d", b.reshape(-1)[:1060].reshape(10, 2, 53).transpose(2, 0, 1)


@pytest.mark.parametrize("name,arr", list(_zoo()), ids=[n for n, _ in _zoo()])
def test_array_zoo(name, arr, isa):
    want = fsum_perplexity(_flat_c(arr))
    assert ppldelta.perplexity(arr) == want
    n, total = _core.sum_log_probs(arr)
    assert n == arr.size and total == math.fsum(_flat_c(arr))
    other = np.ascontiguousarray(arr, dtype=np.float64) - 0.01
    got = ppldelta.perplexity_delta(arr, other)
    assert got["original_perplexity"] == round(want, 4)


def test_memmap(tmp_path):
    path = tmp_path / "lp.npy"
    np.save(path, BASE.astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    assert ppldelta.perplexity(mm) == fsum_perplexity(_flat_c(mm))


def test_no_copy_for_float_arrays(monkeypatch):
    # The adapter (and with it any conversion) is never consulted for ndarrays and lists.
    import ppldelta._adapt as adapt

    calls = []
    orig = adapt.as_array
    monkeypatch.setattr(adapt, "as_array", lambda *a: calls.append(a) or orig(*a))
    for x in (BASE, BASE.astype(np.float32), BASE.T, BASE.tolist()[0], tuple(BASE[0])):
        ppldelta.perplexity(x)
    assert calls == []


def test_lists_and_tuples_match_reference():
    vals = BASE.reshape(-1).tolist()
    want = fsum_perplexity(vals)
    assert ppldelta.perplexity(vals) == want
    assert ppldelta.perplexity(tuple(vals)) == want
    assert ppldelta.perplexity([np.float32(v) for v in vals[:50]]) == fsum_perplexity(
        [float(np.float32(v)) for v in vals[:50]])
    # ints and bools are numbers, as for the reference's sum()
    assert ppldelta.perplexity([-1, -2, False, -3.5]) == fsum_perplexity([-1, -2, 0, -3.5])
    # nested lists are 2-D data
    assert ppldelta.perplexity([[-1.0, -2.0], [-3.0, -4.0]]) == fsum_perplexity([-1, -2, -3, -4])


def test_buffer_protocol_and_interfaces():
    vals = BASE.reshape(-1)[:100]
    want = fsum_perplexity(vals.tolist())
    assert ppldelta.perplexity(memoryview(vals)) == want
    assert ppldelta.perplexity(array.array("d", vals.tolist())) == want

    class ArrayInterface:
        def __init__(self, a):
            self.__array_interface__ = a.__array_interface__
            self._a = a

    assert ppldelta.perplexity(ArrayInterface(vals)) == want

    from reliability.fuzz_core import DLPackOnly  # the fuzzer's DLPack-only wrapper

    assert ppldelta.perplexity(DLPackOnly(vals)) == want


@needs_torch
def test_torch_tensors():
    vals = torch.from_numpy(BASE.astype(np.float32))
    want = fsum_perplexity(vals.double().reshape(-1).tolist())
    assert ppldelta.perplexity(vals) == want
    assert ppldelta.perplexity(vals.t()) == want  # non-contiguous view
    g = vals.clone().requires_grad_(True)
    assert ppldelta.perplexity(g) == want
    bf = vals.to(torch.bfloat16)
    assert ppldelta.perplexity(bf) == fsum_perplexity(bf.float().reshape(-1).tolist())
    half = vals.half()
    assert ppldelta.perplexity(half) == fsum_perplexity(half.double().reshape(-1).tolist())
    d = ppldelta.perplexity_delta(vals, vals - 0.05)
    assert d["quality"] == "acceptable"
    with pytest.raises(TypeError):
        ppldelta.perplexity(torch.zeros(3, dtype=torch.complex64))


# ----------------------------------------------------------------------------- bad input

def test_empty():
    for empty in ([], (), np.array([]), np.zeros((0, 5)), *([torch.zeros(0)] if torch else [])):
        with pytest.raises(ValueError, match="empty"):
            ppldelta.perplexity_delta(empty, empty)
        with pytest.raises(ValueError, match="log_probs is empty"):
            ppldelta.perplexity(empty)


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"original_log_probs has 3 values, quantized_log_probs has 2"):
        ppldelta.perplexity_delta([-1.0, -2.0, -3.0], [-1.0, -2.0])
    with pytest.raises(ValueError, match=r"has 6 values.*has 5"):
        ppldelta.perplexity_delta(np.zeros((2, 3)), np.zeros(5))


@pytest.mark.parametrize("make", [
    lambda v: list(v),
    lambda v: np.array(v),
    lambda v: np.array(v, dtype=np.float32),
    lambda v: np.array(v, dtype=np.float16),
    lambda v: np.array(v, dtype=">f8"),
    lambda v: np.array(v)[::-1][::-1],
    lambda v: np.repeat(np.array(v), 2)[::2],
], ids=["list", "f64", "f32", "f16", "big-endian", "view", "strided"])
def test_nan_reports_first_index(make, isa):
    for pos in [0, 5, 1023, 1024, 2999]:
        v = [-1.0] * 3000
        v[pos] = math.nan
        v[pos + 1 if pos + 1 < 3000 else 0] = math.nan if pos + 1 < 3000 else -1.0
        with pytest.raises(ValueError, match=rf"quantized_log_probs contains NaN at index {pos}\b"):
            ppldelta.perplexity_delta([-1.0] * 3000, make(v))


def test_nan_index_is_c_order_for_fortran_arrays():
    a = np.asfortranarray(np.full((4, 5), -1.0))
    a[1, 0] = math.nan  # flat C index 5; memory (Fortran) index 1
    a[0, 3] = math.nan  # flat C index 3: the first in C order
    with pytest.raises(ValueError, match=r"NaN at index 3 \(flat C-order index; position \[0, 3\]\)"):
        ppldelta.perplexity(a)


def test_positive_values_look_like_nll():
    with pytest.raises(ValueError, match=r"log_probs\[1\] = 2.3 is positive.*negative log-likelihoods"):
        ppldelta.perplexity([-0.1, 2.3, 1.0])
    # within the tolerance: accepted as is
    assert ppldelta.perplexity([0.0005, -1.0]) == math.exp(-(0.0005 - 1.0) / 2)
    with pytest.raises(ValueError, match="positive"):
        ppldelta.perplexity([0.0005, -1.0], positive_tolerance=0.0)
    assert ppldelta.perplexity([0.5, -1.0], positive_tolerance=math.inf) == math.exp(0.25)
    with pytest.raises(ValueError, match="positive_tolerance"):
        ppldelta.perplexity([-1.0], positive_tolerance=-1)
    with pytest.raises(ValueError, match="positive"):
        ppldelta.perplexity(np.array([-1.0, math.inf]))


@pytest.mark.parametrize("bad", [None, "abc", b"abc", 3.0, 1 + 2j, {"a": 1}, object(),
                                 np.array(["a", "b"]), np.array([1 + 1j]), np.array([1.0], dtype=object),
                                 ["a", "b"], [None], [1j], [-1.0, "x"]])
def test_type_errors(bad):
    with pytest.raises(TypeError):
        ppldelta.perplexity(bad)
    other = [-1.0] * (len(bad) if isinstance(bad, (list, np.ndarray)) else 2)
    with pytest.raises(TypeError):
        ppldelta.perplexity_delta(other, bad)


def test_bad_float_conversion_propagates():
    class Boom:
        def __float__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ppldelta.perplexity([-1.0, Boom()])
    with pytest.raises(ValueError, match="too large"):
        ppldelta.perplexity([-(10 ** 400)])


def test_argument_errors():
    with pytest.raises(TypeError, match="missing required argument 'quantized_log_probs'"):
        ppldelta.perplexity_delta([-1.0])
    with pytest.raises(TypeError, match="unexpected keyword"):
        ppldelta.perplexity_delta([-1.0], [-1.0], tolerance=1)
    with pytest.raises(TypeError, match="multiple values"):
        ppldelta.perplexity_delta([-1.0], [-1.0], original_log_probs=[-1.0])


def test_neg_inf_and_overflow_documented_behaviour():
    # quantized -inf (a token the quantized model deems impossible): infinite perplexity
    d = ppldelta.perplexity_delta([-1.0, -2.0], [-1.0, -math.inf])
    assert d == {"original_perplexity": round(math.exp(1.5), 4), "quantized_perplexity": math.inf,
                 "absolute_delta": math.inf, "relative_delta_pct": math.inf, "quality": "poor"}
    # a finite mean whose exp overflows: same, without OverflowError
    d = ppldelta.perplexity_delta([-1.0], [-800.0])
    assert d["quantized_perplexity"] == math.inf and d["quality"] == "poor"
    assert ppldelta.perplexity([-800.0]) == math.inf
    assert ppldelta.perplexity([-1.0, -math.inf]) == math.inf
    # the original's perplexity infinite: the relative delta is undefined -> ValueError
    with pytest.raises(ValueError, match="original model's perplexity overflows"):
        ppldelta.perplexity_delta([-math.inf, -1.0], [-1.0, -1.0])
    with pytest.raises(ValueError, match="overflows"):
        ppldelta.perplexity_delta([-1e308, -1e308], [-1.0, -1.0])


# ----------------------------------------------------------------------------- scale, threads, leaks

def test_more_than_2_31_elements_zero_stride():
    n = 2 ** 31 + 5
    x = np.lib.stride_tricks.as_strided(np.array([-0.5]), shape=(n,), strides=(0,))
    n_got, total = _core.sum_log_probs(x)
    assert n_got == n and total == -0.5 * n
    assert ppldelta.perplexity_delta(x, x)["original_perplexity"] == round(math.exp(0.5), 4)


def test_threads_give_single_thread_results():
    arrays = [-RNG.exponential(2.0, 300_000 + i).astype(np.float32 if i % 2 else np.float64)
              for i in range(8)]
    want = [ppldelta.perplexity_delta(a, a - 0.01) for a in arrays]
    errors = []

    def work(k):
        try:
            for _ in range(20):
                for i, a in enumerate(arrays):
                    if ppldelta.perplexity_delta(a, a - 0.01) != want[i]:
                        errors.append(i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_no_reference_leaks():
    a = np.full(1000, -1.5)
    lst = a.tolist()
    objs = [a, lst, a.astype(">f8"), np.asfortranarray(np.full((30, 30), -1.0))]
    before = [sys.getrefcount(x) for x in objs]
    for _ in range(2000):
        for o in objs:
            ppldelta.perplexity_delta(o, o)
            ppldelta.perplexity(o)
            _core.sum_log_probs(o)
        for bad in ([math.nan], np.array([1.0]), [-1.0, "x"]):
            with pytest.raises((ValueError, TypeError)):
                ppldelta.perplexity(bad)
    del o  # the loop variable holds one reference
    assert [sys.getrefcount(x) for x in objs] == before


def test_no_memory_growth():
    a = -RNG.exponential(1.0, 5000)
    lst = a.tolist()
    nan = a.copy()
    nan[17] = math.nan

    def burst():
        for _ in range(3000):
            ppldelta.perplexity_delta(a, lst)
            ppldelta.perplexity(a.astype(">f8"))
            try:
                ppldelta.perplexity_delta(nan, a)
            except ValueError:
                pass
            try:
                ppldelta.perplexity_delta(a, a[:-1])
            except ValueError:
                pass

    burst()
    gc.collect()
    tracemalloc.start()
    snap1 = tracemalloc.take_snapshot()
    burst()
    gc.collect()
    snap2 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(s.size_diff for s in snap2.compare_to(snap1, "filename"))
    assert growth < 64 * 1024, growth


def test_simd_override_and_names():
    assert _core.simd() in _core.supported_simd()
    assert "scalar" in _core.supported_simd()
    with pytest.raises(ValueError):
        _core._set_simd("no-such-isa")


def _interrupt_after(seconds):
    """SIGINT from another process, as a terminal's Ctrl-C (needs no GIL of ours)."""
    import os
    import subprocess

    return subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -INT {os.getpid()}"])


def test_ctrl_c_interrupts_a_long_reduction():
    import time

    x = np.lib.stride_tricks.as_strided(np.array([-0.5]), shape=(2 ** 36,), strides=(0,))  # ~40 s
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):  # started inside: a loaded machine may deliver the
        killer = _interrupt_after(0.3)      # signal before the call begins
        ppldelta.perplexity_delta(x, x)
    # uninterrupted, the call takes about 40 s; the bound leaves room for a loaded machine
    assert time.perf_counter() - t0 < 10.0
    killer.wait()


def test_chunked_runs_do_not_change_sums():
    # 2^22-value runs are a multiple of the kernels' 1024-value blocks: same sum as one run
    x = (-RNG.exponential(2.0, (1 << 22) + 12345)).astype(np.float32)
    assert ppldelta.perplexity(x) == fsum_perplexity(x.astype(np.float64).tolist())


def test_ctrl_c_interrupts_many_short_inner_loops():
    import time

    # not coalescable: 2^30 inner loops of 4 values each (NpyIter path), no memory needed
    base = np.full(4, -0.5)
    x = np.lib.stride_tricks.as_strided(base, shape=(2 ** 30, 4), strides=(0, 8))[:, ::-1]
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        killer = _interrupt_after(0.3)
        ppldelta.perplexity(x)
    assert time.perf_counter() - t0 < 20.0  # uninterrupted: minutes (room for a loaded machine)
    killer.wait()


def test_other_threads_run_during_short_inner_loops():
    import time

    base = np.full(4, -0.5)
    x = np.lib.stride_tricks.as_strided(base, shape=(2 ** 23, 4), strides=(0, 8))[:, ::-1]
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.01)

    th = threading.Thread(target=ticker)
    th.start()
    time.sleep(0.05)
    n0 = len(ticks)
    ppldelta.perplexity(x)  # about a second
    stop.set()
    th.join()
    assert len(ticks) - n0 > 5


# ----------------------------------------------------------------------------- the one adapter, every entry point

def _entry_points():
    """(name, call(original, quantized)) for every function that takes per-token log-probs."""
    yield "perplexity", lambda o, q: ppldelta.perplexity(q)
    yield "perplexity_delta", lambda o, q: ppldelta.perplexity_delta(o, q)
    yield "analyze", lambda o, q: ppldelta.analyze(o, q, n_bootstrap=40)["reference"]
    yield "Accumulator", lambda o, q: ppldelta.Accumulator().update(o, q).report(n_bootstrap=40)["reference"]


@pytest.mark.parametrize("name,call", list(_entry_points()), ids=[n for n, _ in _entry_points()])
def test_dlpack_only_objects_work_in_every_entry_point(name, call):
    from reliability.fuzz_core import DLPackOnly

    o = BASE.reshape(-1)[:200].copy()
    q = o - 0.03
    assert call(DLPackOnly(o), DLPackOnly(q)) == call(o, q)
    assert call(DLPackOnly(o.astype(np.float32)), q) == call(o.astype(np.float32), q)


@pytest.mark.parametrize("name,call", [e for e in _entry_points() if e[0] in ("analyze", "Accumulator")],
                         ids=["analyze", "Accumulator"])
def test_masked_arrays_are_refused_not_half_read(name, call):
    q = np.ma.array([-1.0, math.nan, -2.0], mask=[False, True, False])
    with pytest.raises(TypeError, match=r"quantized_log_probs is a masked array.*compressed\(\)"):
        call(np.array([-1.0, -1.0, -2.0]), q)
    from ppldelta._adapt import as_array

    with pytest.raises(TypeError, match="x is a masked array"):
        as_array(np.ma.array([1.0]), "x")


def test_masked_arrays_are_refused_by_the_core_too():
    x = np.ma.masked_array([-1.0, np.nan, -2.0], mask=[False, True, False])
    for f in (lambda: ppldelta.perplexity(x), lambda: ppldelta.perplexity_delta(x, x),
              lambda: ppldelta.perplexity_delta([-1.0, -1.0, -1.0], x)):
        with pytest.raises(TypeError, match="masked array"):
            f()
    # other subclasses (memmap, user subclasses) are read as plain arrays, as before

    class Sub(np.ndarray):
        pass

    assert ppldelta.perplexity(np.array([[-1.0, -1.0]]).view(Sub)) == math.exp(1.0)
