"""The GGUF scoring path's fast route (ppldelta.llamacpp._eval_window): a real ``llama_cpp.Llama``
is decoded through libllama with logits for the scored rows only, read in place, instead of
``Llama.eval`` (every position's logits, all copied into ``Llama.scores``).  The oracle is the old
way, written here: ``reset(); eval(chunk); scores[a:b]``; every result must keep its bits.  The
real-model tests run llama-cpp-python on a GGUF (PPLDELTA_TEST_GGUF, or the agreement job's cached
SmolLM2; more files in PPLDELTA_TEST_GGUF_VARIANTS, separated by spaces) and skip without it."""
import os
import sys
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppldelta import llamacpp, protocols
from ppldelta.logits import token_log_probs as kernel_log_probs

GGUF = os.environ.get("PPLDELTA_TEST_GGUF",
                      os.path.expanduser("~/.cache/ppldelta/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
VARIANTS = [GGUF] + os.environ.get("PPLDELTA_TEST_GGUF_VARIANTS", "").split()
TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs into the forest where "
        "nobody can see it any more. ") * 40


def old_rows(llama, ids, w):
    """The old way: Llama.eval of the whole window from an empty cache, rows a..b-1 of scores."""
    chunk = np.asarray(ids[w.start : w.end]).tolist()
    if w.bos is not None:
        chunk[0] = w.bos
    llama.reset()
    llama.eval(chunk)
    return np.array(llama.scores[w.a - w.start : w.b - w.start], dtype=np.float32)


class Wrapped:
    """A wrapper around a Llama (as tests/agreement's _Dies): its eval must be the one that runs."""

    def __init__(self, llama):
        self._llama, self.evals = llama, 0

    def __getattr__(self, name):
        return getattr(self._llama, name)

    def eval(self, chunk):
        self.evals += 1
        return self._llama.eval(chunk)


# ---------------------------------------------------------------------------- everywhere
def test_stand_ins_and_wrappers_run_through_their_eval():
    class Stand:
        _logits_all, n_batch = True, 8
        scores = np.zeros((8, 3), np.float32)

        def reset(self):
            pass

        def eval(self, chunk):
            self.scores[: len(chunk)] = np.arange(len(chunk), dtype=np.float32)[:, None]

    w = protocols.Window(start=0, end=6, a=2, b=5, bos=9)
    s = Stand()
    assert not llamacpp._decodes_directly(s) and not llamacpp._decodes_directly(Wrapped(s))
    np.testing.assert_array_equal(llamacpp._eval_window(s, np.arange(10), w)[:, 0], [2.0, 3.0, 4.0])


def test_load_gguf_threads_default_to_the_usable_cpus(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=lambda **kw: seen.update(kw)))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(28))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    llamacpp.load_gguf(path, n_ctx=64)
    assert (seen["n_threads"], seen["n_threads_batch"], seen["n_batch"], seen["n_ubatch"]) == (cpus, cpus, 64, 64)
    llamacpp.load_gguf(path, n_ctx=64, n_threads=3, n_threads_batch=5)  # the caller's counts win
    assert (seen["n_threads"], seen["n_threads_batch"]) == (3, 5)


# ---------------------------------------------------------------------------- the real llama-cpp-python
_LLAMAS = {}


@pytest.fixture(autouse=True, scope="module")
def _close_llamas():
    yield
    for llama in _LLAMAS.values():
        llama.close()
    _LLAMAS.clear()


def real(path=GGUF, n_ctx=128, **kw):
    pytest.importorskip("llama_cpp")
    if not os.path.isfile(path):
        pytest.skip(f"no GGUF model at {path} (PPLDELTA_TEST_GGUF)")
    key = (path, n_ctx, tuple(sorted(kw.items())))
    if key not in _LLAMAS:
        _LLAMAS[key] = llamacpp.load_gguf(path, n_ctx=n_ctx, **kw)
    llama = _LLAMAS[key]
    if not llamacpp._decodes_directly(llama):
        pytest.skip("this libllama offloads to a GPU: the fast route is off there")
    return llama


def ids_of(llama, n):
    ids = np.asarray(llama.tokenize(TEXT.encode(), add_bos=True, special=False), np.int64)
    assert ids.size >= n
    return ids[:n]


@pytest.mark.parametrize("path", VARIANTS)
def test_token_log_probs_and_chunk_logits_keep_their_bits(path):
    llama = real(path)
    ids = ids_of(llama, 3 * 128 + 5)
    windows = list(protocols.chunks(ids.size, 128, 64, llamacpp._bos_of(llama, None)))
    old = [old_rows(llama, ids, w) for w in windows]
    want = np.concatenate([kernel_log_probs(r.astype(np.float64), ids[w.a + 1 : w.b + 1])
                           for r, w in zip(old, windows)])
    got = llamacpp.token_log_probs(llama, ids, n_ctx=128)
    assert got.tobytes() == want.tobytes()
    for r, c in zip(old, llamacpp.chunk_logits(llama, ids, n_ctx=128)):
        assert c.dtype == np.float32 and c.tobytes() == r.tobytes()


def test_reference_file_bytes_are_those_of_the_eval_route(tmp_path):
    llama = real()
    ids = ids_of(llama, 2 * 128)
    wrapped = Wrapped(llama)  # not a Llama: runs through Llama.eval, the old route
    a = llamacpp.build_reference(wrapped, tmp_path / "old.ppldref", tokens=ids, n_ctx=128, k=8, progress=False)
    b = llamacpp.build_reference(llama, tmp_path / "new.ppldref", tokens=ids, n_ctx=128, k=8, progress=False)
    assert wrapped.evals == 2
    assert open(a, "rb").read() == open(b, "rb").read()
    rep = llamacpp.evaluate_against_reference(llama, a, progress=False)
    assert rep.ppl_ratio.value == 1.0


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(n_batch=st.sampled_from([16, 32, 128]), start=st.integers(0, 20), n=st.integers(1, 100),
       a=st.integers(0, 99), span=st.integers(0, 99), bos=st.booleans())
def test_any_window_any_batch_size_keeps_its_bits(n_batch, start, n, a, span, bos):
    llama = real(n_batch=n_batch, n_ubatch=n_batch)
    ids = ids_of(llama, 128)
    a = min(a, n - 1)
    b = min(a + span, n - 1) if n > 1 else a  # rows a..b-1 predict tokens a+1..b inside the window
    w = protocols.Window(start=start, end=start + n, a=start + a, b=start + b,
                         bos=llama.token_bos() if bos else None)
    want = old_rows(llama, ids, w)
    got = llamacpp._eval_window(llama, ids, w)
    assert got.shape == want.shape == (b - a, llama.n_vocab())
    assert np.asarray(got).tobytes() == want.tobytes()


def test_thread_count_never_changes_a_logit():
    one, two = real(n_threads=1, n_threads_batch=1), real(n_threads=2, n_threads_batch=2)
    ids = ids_of(one, 128)
    w = protocols.Window(start=0, end=128, a=64, b=127, bos=one.token_bos())
    assert np.array(llamacpp._eval_window(one, ids, w)).tobytes() == np.array(llamacpp._eval_window(two, ids, w)).tobytes()
