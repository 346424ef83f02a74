"""Combine ppldelta.Accumulator state across torch.distributed workers."""
from __future__ import annotations

from .accumulate import Accumulator


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
