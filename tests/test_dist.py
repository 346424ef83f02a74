"""Sharded evaluation on torch.distributed (gloo, CPU, tiny random GPT-2): 2 and 3 processes give
the single-process per-token arrays, reports and reference file bytes; a rank that raises ends
the job with its error on every rank; a killed build resumes to the same file.

The worker (tests/_dist_hf_worker.py) runs in every rank, launched either with torchrun's
environment variables (ppldelta initialises the group: the torchrun path), through torchrun
itself, or with a file:// group it initialises (the user-initialised path)."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _dist_hf_worker as worker  # noqa: E402

WORKER = worker.__file__
TIMEOUT = 120  # seconds for a whole launch: a hang fails the test instead of blocking CI

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _has_reference():
    try:
        from ppldelta import refstats  # noqa: F401
        from ppldelta.hf._reference import build_reference  # noqa: F401
    except ImportError:
        return False
    return True


needs_reference = pytest.mark.skipif(not _has_reference(), reason="the reference file code is not there")


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(WORKER), env.get("PYTHONPATH", "")]), "PPLDELTA_DIST_TIMEOUT": "60"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_env(mode, out, world):
    """``world`` processes with the variables torchrun sets (ppldelta initialises the group)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, WORKER, mode, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, LOCAL_WORLD_SIZE=world,
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def _start_file(mode, out, world, init):
    """``world`` processes that initialise a file:// gloo group themselves."""
    return [subprocess.Popen([sys.executable, WORKER, mode, str(out), "--init", str(init),
                              "--rank", str(r), "--world", str(world)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
            for r in range(world)]


def _finish(procs, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _torchrun(mode, out, world):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           WORKER, mode, str(out)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=_env(), timeout=TIMEOUT)
    return [(r.returncode, r.stdout)]


def _check_ok(outs):
    for rc, out in outs:
        assert rc == 0, out[-4000:]


def _normal(reports):
    return json.loads(json.dumps(reports, sort_keys=True, default=str))


@pytest.fixture(scope="module")
def single():
    """The single-process results (this process has no process group: the unsharded path)."""
    arrays, reports = worker.run_same()
    return arrays, _normal(reports)


def _check_same(out, world, single):
    arrays, reports = single
    for r in range(world):
        got = np.load(out / f"rank{r}.npz")
        assert sorted(got.files) == sorted(arrays)
        for key, want in arrays.items():  # bit for bit, on every rank
            assert got[key].dtype == want.dtype and got[key].tobytes() == want.tobytes(), (r, key)
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert rep["world"] == world
        assert rep["reports"] == reports  # score's Protocol and compare_models' full report


def test_no_group_asked_for_and_torch_never_imported():
    """A run that never imported torch (a GGUF model) outside torchrun: no context, rank 0, and
    torch still not imported (it costs seconds); under a torchrun world the check goes on."""
    code = ("import sys; from ppldelta.hf import _dist; "
            "assert 'torch' not in sys.modules; "
            "assert _dist.context() is None and _dist.rank() == 0; "
            "assert 'torch' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    env.update(RANK="0", WORLD_SIZE="1")  # a world of one: still no group, but torch may be asked
    out = subprocess.run([sys.executable, "-c", code.replace("assert 'torch' not in sys.modules; print", "print")],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_two_ranks_from_torchrun_environment(tmp_path, single):
    outs = _finish(_start_env("same", tmp_path, 2))
    _check_ok(outs)
    _check_same(tmp_path, 2, single)
    log0 = outs[0][1]
    assert "[ppldelta rank 0/2] windows" in log0 and "tok/s" in log0  # a line per rank, rank 0's bar
    assert "[ppldelta rank 1/2] done" in outs[1][1]


def test_three_ranks_under_torchrun(tmp_path, single):
    _check_ok(_torchrun("same", tmp_path, 3))
    _check_same(tmp_path, 3, single)


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    t0 = time.monotonic()
    outs = _finish(_start_file("fail", tmp_path, 2, tmp_path / "init"), timeout=90)
    assert time.monotonic() - t0 < 90
    (rc0, out0), (rc1, out1) = outs
    assert rc0 == 3 and rc1 == 3, (out0, out1)
    assert "RANK 1 RAISED RuntimeError: boom in rank 1" in out1  # the original exception
    assert "RANK 0 RAISED RankFailed: rank 1 failed: RuntimeError: boom in rank 1" in out0


@pytest.fixture
def fast_dir(tmp_path):
    """A RAM file system where there is one: the writer fsyncs every window, which on a disk
    shared by several ranks costs far more than the tiny models do."""
    import tempfile

    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    import shutil
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="ppldelta-test-dist-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_reference
def test_reference_files_identical_to_one_process_and_resumable(fast_dir):
    tmp_path = fast_dir
    one = tmp_path / "one"
    one.mkdir()
    _, want = worker.run_ref(str(one))
    want = _normal(want)
    names = sorted(worker.REF_CASES)

    # 2 ranks: the same bytes, the same report against the reference
    two = tmp_path / "two"
    two.mkdir()
    outs = _finish(_start_env("ref", two, 2))
    _check_ok(outs)
    for name in names:
        assert (two / f"{name}.ppldref").read_bytes() == (one / f"{name}.ppldref").read_bytes(), name
    for r in range(2):
        assert json.loads((two / f"rank{r}.json").read_text())["reports"] == want
    assert not glob.glob(str(two / "*shard*"))  # shards merged and removed

    # 3 ranks, killed part way through the first build, a window corrupted, then run again
    three = tmp_path / "three"
    three.mkdir()
    procs = _start_env("ref-slow", three, 3)
    journals = [f"{worker.ref_path(str(three), 'sliding')}.shard-{r:05d}-of-00003.part.journal" for r in range(3)]
    deadline = time.monotonic() + 100  # generous: CI machines may be loaded
    try:
        while time.monotonic() < deadline:
            lines = [len(open(j).read().splitlines()) if os.path.exists(j) else 0 for j in journals]
            if min(lines) >= 3:  # the journal's head and at least two windows on every rank
                break
            assert all(p.poll() is None for p in procs), "a rank ended before it was killed"
            time.sleep(0.05)
        else:
            pytest.fail("the build did not write two windows per rank in time")
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.communicate()
    assert not os.path.exists(worker.ref_path(str(three), "sliding"))
    part = journals[1][:-len(".journal")]
    with open(part, "r+b") as f:  # damage the last journalled window of rank 1: it is redone
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    _check_ok(_finish(_start_env("ref", three, 3)))
    for name in names:
        assert (three / f"{name}.ppldref").read_bytes() == (one / f"{name}.ppldref").read_bytes(), name
    assert json.loads((three / "rank2.json").read_text())["reports"] == want
