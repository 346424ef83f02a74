"""Stress of the C core: threads, a million calls, inputs mutated during calls, interrupts.

    python tests/reliability/stress.py                 # the full run (.ci/reliability)
    python tests/reliability/stress.py --calls 100000 --seconds 2 --interrupt-n 100000000

Parts (each also a function that tests/reliability/test_stress.py calls with small sizes):

* threads_agree: many threads call every entry point (perplexity_delta, perplexity,
  sum_log_probs, _round4) on a pool of inputs (every dtype and layout, lists, tuples, error
  inputs) while one more thread keeps switching the SIMD path; every result must equal the
  single-thread result (the exact results do not depend on the SIMD path).
* calls_rss: N calls (10^6 by default) cycling over the entry points and their error paths;
  the resident set size must stay flat after a warm-up.
* mutation: ndarrays written (values, NaNs) by other threads while they are reduced; lists
  appended to, cleared and refilled by another thread while reduced; list items whose
  __float__ mutates the list.  Only "no crash, a sane outcome" is required.  Patterns that hit
  the known use-after-free (a list shrunk while the *other* input of perplexity_delta is
  processed) are not run here; see test_stress.py::test_fixed_bug_A1_*.
* interrupt: how long a 10^9-element zero-stride reduction takes, and when a SIGINT sent
  during it turns into KeyboardInterrupt (the core does not check for signals between blocks:
  only when the call returns).

Prints one summary line per part and a final one; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import threading
import time

import numpy as np

import ppldelta
from ppldelta import _core

ISAS = _core.supported_simd()


# ----------------------------------------------------------------------------- helpers


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def under_sanitizer() -> bool:
    """True when AddressSanitizer is loaded (RSS figures are meaningless there)."""
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except OSError:
        return False
    return "libasan" in maps or "libclang_rt.asan" in maps or "asan_with_fuzzer" in maps


def _outcome(f, *args, **kw):
    try:
        return ("ok", f(*args, **kw))
    except Exception as exc:  # noqa: BLE001 - the outcome is compared as a whole
        return ("raise", type(exc).__name__, str(exc))


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "raise":
        return a[1:] == b[1:]
    x, y = a[1], b[1]
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (math.isnan(x) and math.isnan(y))
    return x == y


def input_pool(n: int = 3000, seed: int = 1):
    """(name, input) pairs: every dtype and layout, lists and tuples, and error inputs."""
    rng = np.random.default_rng(seed)
    base = -rng.exponential(2.0, n)
    b2 = base[: (n // 30) * 30].reshape(-1, 30)
    pool = [
        ("f8", base), ("f4", base.astype(np.float32)), ("f2", base.astype(np.float16)),
        (">f8", base.astype(">f8")), ("g", base.astype(np.longdouble)),
        ("i8", np.round(base).astype(np.int64)), ("F", np.asfortranarray(b2)), ("T", b2.T),
        ("step", base[::3]), ("rev", base[::-1]), ("f4-step2d", b2.astype(np.float32)[::2, ::-3]),
        ("zero-stride", np.lib.stride_tricks.as_strided(base[:1], shape=(n,), strides=(0,))),
        ("list", base.tolist()), ("tuple", tuple(base[:500].tolist())),
        ("list-small", base[:7].tolist()),
    ]
    raw = bytearray(base.nbytes + 3)
    un = np.frombuffer(raw, dtype=np.float64, count=n, offset=3)
    un[...] = base
    pool.append(("unaligned", un))
    nan = base.copy()
    nan[n // 2] = math.nan
    pos = base.tolist()
    pos[1500 % n] = 0.5
    pool += [("nan", nan), ("positive-list", pos), ("empty", []), ("str-item", [-1.0, "x"]),
             ("tie", [-1.0, -(2.0 ** -53), -(2.0 ** -1000)])]
    return pool


def _calls_for(pool):
    """(label, function, args) for every entry point over the pool."""
    calls = []
    names = [p[0] for p in pool]
    for name, x in pool:
        calls.append((f"perplexity({name})", ppldelta.perplexity, (x,)))
        calls.append((f"sum_log_probs({name})", _core.sum_log_probs, (x,)))
        calls.append((f"perplexity_delta({name},{name})", ppldelta.perplexity_delta, (x, x)))
    by = dict(pool)
    for a, b in [("f8", "f4"), ("f8", "list"), ("F", "T"), ("f8", "nan"), ("f8", "step"),
                 ("list", "zero-stride"), ("f8", "empty")]:
        if a in names and b in names:
            calls.append((f"perplexity_delta({a},{b})", ppldelta.perplexity_delta, (by[a], by[b])))
    for x in (0.00015, -2.5e-5, 1234.56785, -0.0):
        calls.append((f"_round4({x})", _core._round4, (x,)))
    return calls


# ----------------------------------------------------------------------------- threads


def threads_agree(n_threads: int = 8, rounds: int = 40, n: int = 3000, switch_isa: bool = True):
    """Every thread calls every entry point `rounds` times; results must match."""
    calls = _calls_for(input_pool(n))
    want = [_outcome(f, *args) for _, f, args in calls]
    errors: list = []
    counts = [0] * n_threads
    stop = threading.Event()
    barrier = threading.Barrier(n_threads + (1 if switch_isa else 0))

    def work(k):
        rnd = random.Random(k)
        order = list(range(len(calls)))
        try:
            barrier.wait()
            for _ in range(rounds):
                rnd.shuffle(order)
                for i in order:
                    label, f, args = calls[i]
                    got = _outcome(f, *args)
                    counts[k] += 1
                    if not _same(got, want[i]):
                        errors.append((label, got, want[i]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(("thread", repr(exc), None))

    def switcher():
        before = _core.simd()
        barrier.wait()
        i = 0
        while not stop.is_set():
            _core._set_simd(ISAS[i % len(ISAS)])
            i += 1
            time.sleep(0.0005)
        _core._set_simd(before)
        counts_switch[0] = i

    counts_switch = [0]
    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    sw = threading.Thread(target=switcher) if switch_isa else None
    t0 = time.perf_counter()
    for t in threads + ([sw] if sw else []):
        t.start()
    for t in threads:
        t.join()
    stop.set()
    if sw:
        sw.join()
    return {"threads": n_threads + (1 if sw else 0), "calls": sum(counts),
            "distinct_calls": len(calls), "isa_switches": counts_switch[0],
            "mismatches": len(errors), "examples": errors[:3],
            "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- RSS


class _Boom:
    def __float__(self):
        raise RuntimeError("boom")


def calls_rss(total: int = 10 ** 6, warmup: int = 20000, checkpoints: int = 10):
    """`total` calls cycling over entry points and error paths; RSS sampled along the way."""
    a = -np.random.default_rng(3).exponential(1.0, 64)
    lst = a.tolist()
    tup = tuple(lst[:16])
    nan = a.copy()
    nan[17] = math.nan
    f4 = a.astype(np.float32)
    F = np.asfortranarray(a.reshape(8, 8))
    boom = [-1.0, _Boom()]
    ops = [
        lambda: ppldelta.perplexity_delta(lst, a),
        lambda: ppldelta.perplexity(f4),
        lambda: _core.sum_log_probs(tup),
        lambda: ppldelta.perplexity(F),
        lambda: ppldelta.perplexity_delta(nan, a),          # ValueError (NaN)
        lambda: ppldelta.perplexity_delta(a, a[:-1]),       # ValueError (length)
        lambda: ppldelta.perplexity([]),                    # ValueError (empty)
        lambda: ppldelta.perplexity([-1.0, "x"]),           # TypeError
        lambda: ppldelta.perplexity(boom),                  # RuntimeError from __float__
        lambda: ppldelta.perplexity(lst, positive_tolerance=-1),  # ValueError (tolerance)
        lambda: _core._round4(0.00015),
        lambda: ppldelta.perplexity_delta([-1.0], [-800.0]),  # inf fields
    ]
    nops = len(ops)
    samples = []
    done = 0
    errors = 0
    t0 = time.perf_counter()
    step = max(1, (total - warmup) // checkpoints)
    target = warmup
    while done < total:
        end = min(total, target)
        while done < end:
            try:
                ops[done % nops]()
            except (ValueError, TypeError, RuntimeError):
                errors += 1
            done += 1
        samples.append((done, rss_bytes()))
        target += step
    secs = time.perf_counter() - t0
    base = samples[0][1]
    growth = max(s[1] for s in samples) - base
    return {"calls": done, "raised": errors, "rss_start_mb": round(base / 2 ** 20, 1),
            "rss_end_mb": round(samples[-1][1] / 2 ** 20, 1),
            "rss_growth_kb": growth // 1024, "seconds": round(secs, 2),
            "us_per_call": round(secs / max(done, 1) * 1e6, 2)}


# ----------------------------------------------------------------------------- mutation


class _ListMutator:
    """A list item whose __float__ changes the list it is in."""

    def __init__(self, target, how):
        self.target, self.how, self.calls = target, how, 0

    def __float__(self):
        t = self.target
        self.calls += 1
        if self.calls > 3:  # a list that grows on every read would never end math.fsum
            return -1.0
        if self.how == 0:
            t.append(-1.0)
        elif self.how == 1 and t:
            t.pop()
        elif self.how == 2:
            saved = list(t)
            t.clear()
            t.extend(saved)
        else:
            t[:] = [-0.5] * (len(t) + 5)
        return -1.0


def mutation(seconds: float = 3.0, n: int = 200_000, n_readers: int = 3):
    """Arrays and lists changed by other threads during calls: no crash, sane outcomes."""
    ok_exc = (ValueError, RuntimeError, TypeError)
    stop = threading.Event()
    arr = -np.random.default_rng(5).exponential(1.0, n)
    arr2d = arr.reshape(-1, 100)
    shared: list = (-np.random.default_rng(6).exponential(1.0, 5000)).tolist()
    other: list = list(shared)
    counts = {"array_calls": 0, "list_calls": 0, "self_mutating_calls": 0, "writes": 0,
              "list_mutations": 0, "raised": 0}
    bad: list = []

    def array_writer():
        rng = np.random.default_rng(7)
        while not stop.is_set():
            i = int(rng.integers(0, n))
            arr[i] = math.nan
            arr[(i * 7) % n :] = -rng.exponential(1.0, n - (i * 7) % n)
            arr[i] = -1.0
            counts["writes"] += 1

    def list_mutator():
        rnd = random.Random(8)
        while not stop.is_set():
            k = rnd.randrange(6)
            if k == 0:
                shared.append(-0.25)
            elif k == 1:
                shared.clear()
            elif k == 2:
                shared.extend([-1.0] * rnd.randrange(1, 3000))
            elif k == 3 and shared:
                del shared[rnd.randrange(len(shared)):]
            elif k == 4:
                shared[:] = [-2.0] * rnd.randrange(0, 6000)
            else:
                shared.insert(0, float("nan") if rnd.random() < 0.1 else -3.0)
            counts["list_mutations"] += 1
            if counts["list_mutations"] % 50 == 0:
                time.sleep(0)

    def call(f, *args, key):
        try:
            r = f(*args)
            if isinstance(r, float) and not (r >= 0 or math.isnan(r)):
                bad.append((f.__name__, r))
        except ok_exc:
            counts["raised"] += 1
        except Exception as exc:  # noqa: BLE001
            bad.append((f.__name__, repr(exc)))
        counts[key] += 1

    def reader(k):
        rnd = random.Random(100 + k)
        while not stop.is_set():
            c = rnd.randrange(9)
            if c == 0:
                call(ppldelta.perplexity, arr, key="array_calls")
            elif c == 1:
                call(_core.sum_log_probs, arr2d.T, key="array_calls")
            elif c == 2:
                call(ppldelta.perplexity_delta, arr, arr[::-1], key="array_calls")
            elif c == 3:
                call(ppldelta.perplexity, shared, key="list_calls")
            elif c == 4:
                call(_core.sum_log_probs, shared, key="list_calls")
            elif c == 5:  # both inputs lists: the GIL is held for the whole call
                call(ppldelta.perplexity_delta, shared, shared, key="list_calls")
            elif c == 6:
                call(ppldelta.perplexity_delta, shared, other, key="list_calls")
            else:
                holder: list = []
                holder.extend([-1.0] * rnd.randrange(0, 3000))
                holder.insert(rnd.randrange(len(holder) + 1), _ListMutator(holder, rnd.randrange(4)))
                f = rnd.choice([ppldelta.perplexity, _core.sum_log_probs,
                                lambda h: ppldelta.perplexity_delta(h, h)])
                call(f, holder, key="self_mutating_calls")

    threads = [threading.Thread(target=array_writer), threading.Thread(target=list_mutator)]
    threads += [threading.Thread(target=reader, args=(k,)) for k in range(n_readers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    counts.update({"threads": len(threads), "unexpected": len(bad), "examples": bad[:3],
                   "seconds": round(time.perf_counter() - t0, 2)})
    return counts


# ----------------------------------------------------------------------------- interrupts


def interrupt(n: int = 10 ** 9, delay: float = 0.2):
    """Duration of n-element zero-stride reductions, and SIGINT latency during one."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("interrupt() must run in the main thread")
    x64 = np.lib.stride_tricks.as_strided(np.array([-0.5]), shape=(n,), strides=(0,))
    x32 = np.lib.stride_tricks.as_strided(np.array([-0.5], dtype=np.float32), shape=(n,), strides=(0,))
    out = {"n": n}
    for label, f in [("perplexity_f64", lambda: ppldelta.perplexity(x64)),
                     ("sum_log_probs_f64", lambda: _core.sum_log_probs(x64)),
                     ("perplexity_delta_f64", lambda: ppldelta.perplexity_delta(x64, x64)),
                     ("perplexity_f32", lambda: ppldelta.perplexity(x32))]:
        t = time.perf_counter()
        f()
        out[label + "_s"] = round(time.perf_counter() - t, 3)

    # SIGINT from another thread `delay` seconds into a sum_log_probs call.  Whatever happens,
    # the KeyboardInterrupt is caught here: after the call, this thread waits (in a try) until
    # the signal has been sent and handled, so it can never escape into the caller.
    sent = [0.0]

    def fire():
        time.sleep(delay)
        sent[0] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    th = threading.Thread(target=fire)
    returned = None
    got = None
    try:
        t0 = time.perf_counter()
        th.start()
        try:
            r = _core.sum_log_probs(x64)
            returned = time.perf_counter()
            out["result_ok"] = r == (n, -0.5 * n)
            deadline = returned + 10.0
            while time.perf_counter() < deadline:
                time.sleep(0.001)
        except KeyboardInterrupt:
            got = time.perf_counter()
    finally:
        th.join()
        signal.signal(signal.SIGINT, old)
    out["interrupted"] = got is not None
    # KeyboardInterrupt is raised as the call returns, so "during the call" shows in the timing:
    # an interruptible core stops well before the uninterrupted duration
    out["stopped_early"] = got is not None and got - t0 < 0.8 * out["sum_log_probs_f64_s"]
    if got is not None:
        out["latency_s"] = round(got - sent[0], 4)
    out["call_s"] = round((returned or got or time.perf_counter()) - t0, 3)
    if returned is not None and returned < sent[0]:
        out["note"] = "the call ended before the signal was sent: use a larger n"
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=300, help="rounds over all calls per thread")
    p.add_argument("--calls", type=int, default=10 ** 6)
    p.add_argument("--rss-limit-kb", type=int, default=8192)
    p.add_argument("--seconds", type=float, default=5.0, help="mutation phase")
    p.add_argument("--interrupt-n", type=int, default=10 ** 9)
    args = p.parse_args(argv)
    failed = []
    t0 = time.perf_counter()

    r = threads_agree(args.threads, args.rounds)
    print(f"stress threads: {r}", flush=True)
    if r["mismatches"]:
        failed.append("threads")
    total_calls = r["calls"]
    threads_max = r["threads"]

    r = calls_rss(args.calls)
    print(f"stress calls/RSS: {r}", flush=True)
    if not under_sanitizer() and r["rss_growth_kb"] > args.rss_limit_kb:
        failed.append("rss")
    total_calls += r["calls"]

    r = mutation(args.seconds)
    print(f"stress mutation: {r}", flush=True)
    if r["unexpected"]:
        failed.append("mutation")
    total_calls += r["array_calls"] + r["list_calls"] + r["self_mutating_calls"]
    threads_max = max(threads_max, r["threads"])

    r = interrupt(args.interrupt_n)
    print(f"stress interrupt: {r}", flush=True)
    if not r.get("interrupted"):
        failed.append("interrupt (no KeyboardInterrupt at all)")

    print(f"stress summary: {total_calls} calls, up to {threads_max} threads, "
          f"{time.perf_counter() - t0:.1f} s, {'FAILED: ' + ', '.join(failed) if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
