"""ppldelta.distributed.partition and the sharding switch (NumPy only, no torch)."""
import itertools
import os

import pytest

from ppldelta import distributed


def test_partition_contiguous_balanced_deterministic():
    for weights in ([5] * 10, [12, 32, 12, 12, 1, 0, 40, 7], [0, 0, 0], [], [3], list(range(50))):
        for world in (1, 2, 3, 4, 7, 64):
            b = distributed.partition(weights, world)
            assert len(b) == world + 1 and b[0] == 0 and b[-1] == len(weights)
            assert all(x <= y for x, y in zip(b, b[1:]))  # contiguous, in order, covering all
            assert b == distributed.partition(list(weights), world)  # deterministic
            total = sum(weights)
            prefix = [0, *itertools.accumulate(weights)]
            for r in range(1, world):  # each cut is the boundary nearest to r/world of the work
                best = min(abs(p * world - r * total) for p in prefix)
                assert abs(prefix[b[r]] * world - r * total) == best


def test_partition_examples_and_errors():
    assert distributed.partition([1] * 6, 3) == [0, 2, 4, 6]
    assert distributed.partition([10, 1, 1, 1, 1], 2) == [0, 1, 5]
    assert distributed.partition([1, 1], 4) == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="world"):
        distributed.partition([1], 0)
    with pytest.raises(ValueError, match=">= 0"):
        distributed.partition([1, -1], 2)


def test_local_turns_sharding_off(monkeypatch):
    assert distributed.sharding_enabled()
    with distributed.local():
        assert not distributed.sharding_enabled()
        with distributed.local():
            assert not distributed.sharding_enabled()
        assert not distributed.sharding_enabled()
    assert distributed.sharding_enabled()
    monkeypatch.setenv("PPLDELTA_SHARD", "0")
    assert not distributed.sharding_enabled()
    assert os.environ["PPLDELTA_SHARD"] == "0"
