"""Replay the fuzzer's seed corpus (tests/reliability/corpus) through the fuzz checker: every
input is decoded into a call of the core and compared with the pure-Python oracle."""
import math
import os

import numpy as np
import pytest

from oracle import fsum_delta
from ppldelta import _core
from reliability import fuzz_core as fc

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
FILES = sorted(os.listdir(CORPUS)) if os.path.isdir(CORPUS) else []


def test_corpus_is_there():
    assert len(FILES) >= 24


@pytest.mark.parametrize("name", FILES)
def test_corpus_input(name):
    with open(os.path.join(CORPUS, name), "rb") as fh:
        fc.check_bytes(fh.read())


def test_corpus_covers_every_entry_point_and_outcome():
    ops, labels = set(), set()
    for name in FILES:
        with open(os.path.join(CORPUS, name), "rb") as fh:
            case = fc.decode(fh.read())
        ops.add(case.op)
        labels.add(fc.check(case))
    assert ops == {"delta", "perplexity", "sum", "round4"}
    assert {"ok", "ValueError", "TypeError"} <= labels


def test_decoding_is_deterministic():
    for data in (b"", b"\x00" * 50, bytes(range(256)), b"\xff" * 300):
        assert repr(fc.decode(data)) == repr(fc.decode(data))


def test_oracle_agrees_with_tests_oracle():
    rng = np.random.default_rng(0)
    for n in (1, 7, 1025):
        o = (-rng.exponential(2.0, n)).tolist()
        q = (np.array(o) - 0.05).tolist()
        assert fc.delta_fields(math.fsum(o), math.fsum(q), n) == fsum_delta(o, q)


def test_checker_catches_a_wrong_result(monkeypatch):
    case = fc.Case.of("perplexity", [-1.0, -2.0])
    assert fc.check(case) == "ok"
    monkeypatch.setattr(fc, "_call", lambda c: 1.0)
    with pytest.raises(fc.Mismatch):
        fc.check(case)


def test_fixed_bug_B1_partial_sum_overflow():
    # with positive values allowed, partial sums overflowed although the exact sum is finite
    assert _core.sum_log_probs([1e308, 1e308, -1e308], positive_tolerance=math.inf) == (3, 1e308)
