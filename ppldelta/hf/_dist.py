"""Sharded runs on torch.distributed: the windows of one run split across the ranks of a process
group, each rank scoring its share, the per-token results gathered in window order so that every
rank returns the single-process result bit for bit.

When it applies: a process group is initialised (by the user, or here from the environment that
``torchrun`` / ``accelerate launch`` set: ``RANK`` and ``WORLD_SIZE`` > 1; gloo on CPU,
``cpu:gloo,cuda:nccl`` with CUDA), its world is > 1, and sharding is not turned off
(``ppldelta.distributed.local()``, ``PPLDELTA_SHARD=0``).  Otherwise :func:`run_windows` is
``_run.run_windows`` unchanged.

How:
- the work units are the single-process batches (``batch_size`` consecutive windows), so every
  forward sees exactly the input it sees in one process; ranks get contiguous runs of batches
  balanced by scored tokens (``ppldelta.distributed.partition``, identical on every rank);
- the ranks first check that they run the same plan on the same tokens (a clear error otherwise);
- after each batch every rank joins one small ``all_reduce`` (ok/error flag, scored tokens),
  pipelined one batch deep; ranks with fewer batches join with nothing to do.  A rank whose
  work raises joins with the error flag, every rank stops at its next synchronisation, and the
  failing rank's message is raised on every rank (the original exception on that rank,
  :class:`RankFailed` elsewhere): no hang.  The process groups made here have a finite timeout
  (``PPLDELTA_DIST_TIMEOUT`` seconds, default 1800) for a rank that dies or stalls;
- progress: one tqdm bar on rank 0 for the whole job (scored tokens, tokens/s, ETA), advanced
  by all ranks' counts at each synchronisation, and one line per rank on stderr;
- results: each rank's slice of every per-token column, gathered to all ranks
  (``all_gather_object`` of NumPy arrays) and written in window order: the full arrays, so
  percentiles stay exact.

CPU collectives only (flags, objects): a group on NCCL alone gets a gloo side group.  A model
loaded with ``device_map="auto"`` (one process per node, the model across its devices) works
unchanged: the input goes to the model's first device and the model is never moved.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import sys
import time
import traceback

from .. import distributed as _public

_made = {}  # what this module created: "default" (the default group), id(group) -> gloo side group


class RankFailed(RuntimeError):
    """Raised on every rank but the failing one when a rank's part of a sharded run raised."""


class _Stopped(Exception):
    """Another rank failed: leave the loop (internal)."""


def timeout():
    return datetime.timedelta(seconds=float(os.environ.get("PPLDELTA_DIST_TIMEOUT", "1800")))


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() else None


def _init_from_env(dist):
    """Initialise the default group from torchrun's variables (env://)."""
    import torch

    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timeout())
    _made["default"] = True
    atexit.register(_destroy)


def _destroy():
    dist = _dist()
    if dist is not None and dist.is_initialized() and _made.pop("default", None):
        dist.destroy_process_group()


def _cpu_group(dist):
    """A group that runs CPU collectives: the default one when it has gloo, else a gloo side
    group (made once, collectively)."""
    backend = str(dist.get_backend())
    if backend == "gloo" or "cpu:" in backend:
        return None  # the default group
    default = dist.distributed_c10d._get_default_group()
    key = id(default)
    if key not in _made:
        _made[key] = dist.new_group(backend="gloo", timeout=timeout())
    return _made[key]


class Context:
    """The process group of a sharded run: ``rank``, ``world`` and the CPU ``group``."""

    def __init__(self, dist, rank, world, group):
        self.dist, self.rank, self.world, self.group = dist, rank, world, group

    def gather(self, obj):
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out


def _no_group():
    """True when no process group can exist or be asked for: torch not imported (a group needs
    it: a GGUF run then never pays for importing torch) and no torchrun world above one."""
    return "torch" not in sys.modules and ("RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1)


def context():
    """The Context of a sharded run, or None (no group, a world of one, or sharding off)."""
    if not _public.sharding_enabled() or _no_group():
        return None
    dist = _dist()
    if dist is None:
        return None
    if not dist.is_initialized():
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        _init_from_env(dist)
    world = dist.get_world_size()
    if world <= 1:
        return None
    return Context(dist, dist.get_rank(), world, _cpu_group(dist))


def rank():
    """This process's rank (0 without a process group)."""
    dist = None if "torch" not in sys.modules else _dist()
    return dist.get_rank() if dist is not None and dist.is_initialized() else 0


def world():
    """The number of ranks (1 without a process group)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None and dist.is_initialized() else 1


# ---------------------------------------------------------------------------- the plan
class Shard:
    """This rank's share of a run: windows ``lo .. hi-1`` (whole batches), ``steps``: the most
    batches any rank has (every rank synchronises that many times)."""

    def __init__(self, ctx, windows, batch_size):
        nb = -(-len(windows) // batch_size)
        weights = [sum(w.b - w.a for w in windows[i * batch_size:(i + 1) * batch_size]) for i in range(nb)]
        bounds = _public.partition(weights, ctx.world)
        self.batches = bounds
        self.lo = min(bounds[ctx.rank] * batch_size, len(windows))
        self.hi = min(bounds[ctx.rank + 1] * batch_size, len(windows))
        self.steps = max(bounds[r + 1] - bounds[r] for r in range(ctx.world))
        self.total = sum(weights)
        self.mine = sum(weights[bounds[ctx.rank]:bounds[ctx.rank + 1]])


def signature(ids, windows, batch_size, n_models, what):
    """What every rank must agree on before a sharded run: the tokens, the plan, the batching."""
    import numpy as np

    h = hashlib.sha256(np.ascontiguousarray(ids.numpy() if hasattr(ids, "numpy") else ids,
                                            dtype="<i8").tobytes())
    h.update(repr([(w.start, w.end, w.a, w.b, w.bos) for w in windows]).encode())
    return {"tokens_and_windows_sha256": h.hexdigest(), "n_windows": len(windows),
            "batch_size": int(batch_size), "n_models": int(n_models), "call": what}


def check_same(ctx, sig):
    sigs = ctx.gather(sig)
    for r, s in enumerate(sigs):
        if s != sig:
            diff = sorted(k for k in set(sig) | set(s or {}) if not isinstance(s, dict) or s.get(k) != sig.get(k))
            raise ValueError(
                f"ppldelta: rank {ctx.rank} and rank {r} of the process group run different work "
                f"({', '.join(diff)} differ): a sharded run needs the same call with the same inputs "
                "on every rank; to score different data per rank, call inside "
                "`with ppldelta.distributed.local():` and merge with ppldelta.distributed.all_reduce")


# ---------------------------------------------------------------------------- synchronisation
class Sync:
    """The per-batch synchronisation: ok/error flag and scored tokens, summed over the ranks
    (pipelined one batch deep), and rank 0's progress bar."""

    def __init__(self, ctx, total, progress, desc):
        import torch

        self.torch, self.ctx = torch, ctx
        self.pending = None
        self.steps = 0
        self.stopped = False
        self.done = 0
        self.bar = None
        if progress and ctx.rank == 0:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=f"{desc} x{ctx.world} ranks", unit="tok",
                                unit_scale=True, dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                pass

    def _wait(self):
        if self.pending is None:
            return
        work, t = self.pending
        self.pending = None
        work.wait()
        err, tok = (int(v) for v in t.tolist())
        self.done += tok
        if self.bar is not None:
            self.bar.update(tok)
        if err:
            self.stopped = True
            raise _Stopped()

    def _issue(self, err, tokens):
        t = self.torch.tensor([err, tokens], dtype=self.torch.int64)
        work = self.ctx.dist.all_reduce(t, group=self.ctx.group, async_op=True)
        self.pending = (work, t)
        self.steps += 1

    def step(self, tokens):
        """After one batch of this rank (``on_batch``): raises _Stopped when a rank failed."""
        self._wait()
        self._issue(0, int(tokens))

    def finish(self, error, steps):
        """Join the synchronisations this rank still owes (idle ones up to ``steps``; a failed
        rank owes none) and the closing one, which carries this rank's error flag; then raise on
        every rank if any failed.  Every rank issues the same sequence of all_reduces: each waits
        the previous one before issuing the next, and all stop after the first that flags an
        error."""
        try:
            if not self.stopped:
                if error is None:
                    while self.steps < steps:
                        self.step(0)
                self._wait()  # the last step (may say that another rank failed)
                self._issue(0 if error is None else 1, 0)  # the closing agreement
                self._wait()
        except _Stopped:
            pass
        if self.bar is not None:
            self.bar.close()
        if not self.stopped:
            return
        mine = None
        if error is not None:
            mine = (type(error).__name__, str(error),
                    "".join(traceback.format_exception(type(error), error, error.__traceback__)))
        reports = self.ctx.gather(mine)
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if error is not None:
            raise error
        r, (name, msg, tb) = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankFailed(f"rank {r} failed{more}: {name}: {msg}\n--- traceback of rank {r} ---\n{tb}")


def _line(ctx, text):
    print(f"[ppldelta rank {ctx.rank}/{ctx.world}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the entry points
def sharded(ctx, ids, windows, *, batch_size, progress, desc, n_models, work, columns=(), offs=None):
    """One sharded run: ``work(lo, hi, on_batch)`` runs the windows ``lo .. hi-1`` (this rank's
    share, whole single-process batches) calling ``on_batch(scored tokens)`` after each batch and
    filling the per-token ``columns`` (window ``i`` at ``offs[i]``); afterwards every rank holds
    all of them.  Failures end the run on every rank (see the module docstring)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    check_same(ctx, signature(ids, windows, batch_size, n_models, desc))
    shard = Shard(ctx, windows, batch_size)
    if progress:
        _line(ctx, f"windows {shard.lo}..{shard.hi - 1} of {len(windows)} "
                   f"({shard.mine:,} of {shard.total:,} scored tokens)")
    sync = Sync(ctx, shard.total, progress, desc)
    t0 = time.perf_counter()
    error = None
    try:
        work(shard.lo, shard.hi, sync.step)
    except _Stopped:
        pass
    except Exception as e:  # noqa: BLE001 - every failure is reported to all ranks
        error = e
    sync.finish(error, shard.steps)
    if progress:
        dt = time.perf_counter() - t0
        _line(ctx, f"done: {shard.mine:,} scored tokens in {dt:.1f} s ({shard.mine / max(dt, 1e-9):,.0f} tok/s)")
    if not columns:
        return
    a, b = int(offs[shard.lo]), int(offs[shard.hi])
    parts = ctx.gather([c[a:b] for c in columns])
    for r, part in enumerate(parts):
        o = int(offs[min(shard.batches[r] * batch_size, len(windows))])
        for c, p in zip(columns, part):
            c[o:o + len(p)] = p


def run_windows(models, ids, windows, *, batch_size, device, progress, desc, on_rows, columns=(),
                offs=None):
    """``_run.run_windows``, sharded across the ranks when a process group applies (see the
    module docstring): ``columns`` are the per-scored-token output arrays that ``on_rows`` fills
    (indexed by ``offs``, the window offsets); afterwards every rank holds all of them.  Without
    a group, exactly ``_run.run_windows``."""
    from ._run import run_windows as run_local

    ctx = context()
    if ctx is None:
        run_local(models, ids, windows, batch_size=batch_size, device=device, progress=progress,
                  desc=desc, on_rows=on_rows)
        return

    def work(lo, hi, on_batch):
        run_local(models, ids, windows[lo:hi], batch_size=batch_size, device=device, progress=False,
                  desc=desc, on_rows=on_rows, index0=lo, on_batch=on_batch)

    sharded(ctx, ids, windows, batch_size=batch_size, progress=progress, desc=desc,
            n_models=len(models), work=work, columns=columns, offs=offs)


class _SkipDone:
    """A writer that drops the windows a resumed shard already holds (a batch that is partly
    written is run again whole, so that every forward sees its single-process input)."""

    def __init__(self, writer, done):
        self.writer, self.skip = writer, set(done)
        self.dtype, self.probes = writer.dtype, writer.probes

    def write_window(self, i, records):
        if i not in self.skip:
            self.writer.write_window(i, records)


def build_sharded(ctx, ids, windows, *, out, header, k, batch_size, resume, progress, desc, build, probes=None):
    """A sharded reference build: rank ``r`` writes the windows of its share to its own shard
    (``reffile.shard_path(out, r, world)``, resumable), rank 0 merges the shards into ``out``
    (``reffile.merge_shards``: the bytes of a one-process build) and removes them.  ``build(todo,
    writer, on_batch)`` runs the window indices ``todo`` (whole batches, increasing) and hands
    each finished window to ``writer.write_window``.  ``out`` must be on a file system that
    every rank sees.  Returns ``out`` on every rank."""
    from .. import reffile as rf

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    check_same(ctx, signature(ids, windows, batch_size, 1, desc + " -> " + os.path.abspath(out)))
    shard = Shard(ctx, windows, batch_size)
    path = rf.shard_path(out, ctx.rank, ctx.world)
    sync = Sync(ctx, shard.total, progress, desc)
    error, w = None, None
    try:
        w = rf.ReferenceWriter(path, header, k, n_windows=len(windows), windows=range(shard.lo, shard.hi),
                               resume=resume, probes=probes)
        done = w.done
        todo, skipped = [], 0
        for b0 in range(shard.lo, shard.hi, batch_size):
            batch = range(b0, min(b0 + batch_size, shard.hi))
            if all(i in done for i in batch):
                skipped += sum(windows[i].b - windows[i].a for i in batch)
            else:
                todo.extend(batch)
        if progress:
            _line(ctx, f"shard {path}: windows {shard.lo}..{shard.hi - 1} of {len(windows)} "
                       f"({shard.mine:,} of {shard.total:,} scored tokens; {skipped:,} already written)")
        sync.step(skipped)
        build(todo, _SkipDone(w, done), sync.step)
        w.finalize()
    except _Stopped:
        pass
    except Exception as e:  # noqa: BLE001 - every failure is reported to all ranks
        error = e
    finally:
        if w is not None:
            w.close()
    sync.finish(error, shard.steps + 1)
    paths = [rf.shard_path(out, r, ctx.world) for r in range(ctx.world)]
    merged = None
    if ctx.rank == 0:
        try:
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(f"{missing[0]} not found on rank 0: a sharded build writes its "
                                        "shards next to out=, which must be on a file system every rank sees")
            rf.merge_shards(paths, out)
        except Exception as e:  # noqa: BLE001
            merged = f"{type(e).__name__}: {e}"
    status = ctx.gather(merged)[0]
    if status is not None:
        raise RankFailed(f"rank 0 failed to merge the shards of {out}: {status}")
    os.remove(paths[ctx.rank])
    return out
