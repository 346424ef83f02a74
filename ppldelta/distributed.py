"""torch.distributed for ppldelta: merging Accumulator state across ranks, the deterministic work
partition that sharded runs use, and the switch that turns sharding off.

``ppldelta.hf`` shards its runs across the ranks of an initialised process group (or one that
``torchrun`` / ``accelerate launch`` describes in the environment): see ``ppldelta/hf/_dist.py``.
This module holds the parts without torch (``partition``, ``local``) and ``all_reduce``; torch
is imported lazily."""
from __future__ import annotations

import bisect
import contextlib
import os
import threading

from .accumulate import Accumulator

__all__ = ["all_reduce", "partition", "local", "sharding_enabled"]

_state = threading.local()


def all_reduce(acc: Accumulator, group=None) -> Accumulator:
    """Every rank gets the accumulator of all ranks' tokens (exact: same numbers as one pass).

    Uses ``torch.distributed.all_gather_object`` on the JSON-able state, so it works with any
    backend (gloo, nccl) once the process group is initialised."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, acc.state_dict(), group=group)
    merged = Accumulator(block_size=acc.block_size)
    for s in states:
        merged.merge(Accumulator.from_state(s))
    return merged


def partition(weights, world: int) -> list:
    """Contiguous, balanced split of work units across ``world`` ranks: boundaries ``b`` (a list
    of ``world + 1`` ints, ``b[0] = 0``, ``b[world] = len(weights)``); rank ``r`` gets the units
    ``b[r] .. b[r+1]-1``.  ``b[r]`` is the unit boundary whose prefix weight is nearest to
    ``r / world`` of the total (ties: the earlier boundary), in exact integer arithmetic, so
    every rank computes the same split.  Weights are non-negative integers (scored tokens)."""
    world = int(world)
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    prefix = [0]
    for w in weights:
        w = int(w)
        if w < 0:
            raise ValueError("weights must be >= 0")
        prefix.append(prefix[-1] + w)
    n, total = len(prefix) - 1, prefix[-1]
    scaled = [p * world for p in prefix]
    bounds = [0]
    for r in range(1, world):
        target = r * total
        k = bisect.bisect_left(scaled, target)  # first boundary at or past the target
        if k > 0 and (k > n or target - scaled[k - 1] <= scaled[k] - target):
            k -= 1
        bounds.append(max(bounds[-1], min(k, n)))
    bounds.append(n)
    return bounds


def sharding_enabled() -> bool:
    """False inside :func:`local` or with ``PPLDELTA_SHARD=0`` in the environment."""
    return getattr(_state, "local", 0) == 0 and os.environ.get("PPLDELTA_SHARD", "1") != "0"


@contextlib.contextmanager
def local():
    """Inside ``with ppldelta.distributed.local():`` the ``ppldelta.hf`` entry points run on this
    rank's inputs alone, as in a single process, with no collective: for jobs in which every rank
    scores different data (then merge with :func:`all_reduce`).  Outside it, under an
    initialised process group, every rank must make the same calls with the same inputs."""
    _state.local = getattr(_state, "local", 0) + 1
    try:
        yield
    finally:
        _state.local -= 1
