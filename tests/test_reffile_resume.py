"""ppldelta.reffile: a build killed by a signal and resumed, corrupted and torn windows, header
mismatches on resume, a finished file reused, shards merged; all against the bytes of one
uninterrupted build."""
import json
import os
import signal
import subprocess
import sys
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppldelta import reffile as R
from test_reffile import HEADER, build, records

SIZES = [7, 3, 0, 12, 5, 0, 9, 4, 1, 6]
K = 5

# Run in a subprocess: write the windows of SIZES (records as in test_reffile.records), saying
# "wrote i" after each, and wait for stdin after window STOP (so the test can kill it there), or
# never stop (STOP < 0: the kill lands wherever the writer is).
_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from ppldelta import reffile as R
from test_reffile import HEADER, records
from test_reffile_resume import SIZES, K
path, stop, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sizes = (SIZES * (n // len(SIZES) + 1))[:n]
w = R.ReferenceWriter(path, HEADER, K, n_windows=n)
print("start", min(w.done, default=-1), len(w.done), flush=True)
for i in range(n):
    if i in w.done:
        continue
    w.write_window(i, records(i, sizes[i], K))
    print("wrote", i, flush=True)
    if i == stop:
        sys.stdin.read()
sys.stdin.read()
"""


def _run_child(path, stop, n):
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, os.path.dirname(__file__), str(path), str(stop), str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    proc.stdout.close()
    proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL


def _finish(path, sizes, expect_done=None):
    with R.ReferenceWriter(path, HEADER, K, n_windows=len(sizes)) as w:
        if expect_done is not None:
            assert w.done == set(expect_done)
        for i in range(len(sizes)):
            if i not in w.done:
                w.write_window(i, records(i, sizes[i], K))
        return w.finalize()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The bytes of an uninterrupted build of SIZES."""
    return open(build(tmp_path_factory.mktemp("straight") / "s.ppldref", SIZES, K), "rb").read()


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("stop", [0, 4, 9])
def test_killed_build_resumes_to_identical_bytes(tmp_path, straight, stop):
    out = tmp_path / "a.ppldref"
    proc = _run_child(out, stop, len(SIZES))
    lines = []
    for line in proc.stdout:
        lines.append(line.split())
        if lines[-1] == ["wrote", str(stop)]:
            break
    assert lines[0][0] == "start" and lines[-1] == ["wrote", str(stop)]
    _kill(proc)
    assert not out.exists() and (tmp_path / "a.ppldref.part").exists()
    with pytest.raises(ValueError, match="unfinished"):
        R.read_reference(tmp_path / "a.ppldref.part")
    p = _finish(out, SIZES, expect_done=range(stop + 1))
    assert _bytes(p) == straight
    assert sorted(os.listdir(tmp_path)) == ["a.ppldref"]


def test_killed_anywhere_then_resumed_twice(tmp_path):
    """Killed wherever the writer happens to be (mid-window included), twice: same bytes."""
    n = 200
    sizes = (SIZES * (n // len(SIZES) + 1))[:n]
    want = _bytes(build(tmp_path / "straight.ppldref", sizes, K))
    out = tmp_path / "a.ppldref"
    for _ in range(2):
        proc = _run_child(out, -1, n)
        assert proc.stdout.readline().split()[0] == "start"
        proc.stdout.readline()  # at least one window written
        _kill(proc)
    with R.ReferenceWriter(out, HEADER, K, n_windows=n) as w:
        done = w.done
    assert done == set(range(len(done)))  # a prefix
    assert _bytes(_finish(out, sizes)) == want


def _partial(path, n_written, sizes=SIZES):
    w = R.ReferenceWriter(path, HEADER, K, n_windows=len(sizes))
    for i in range(n_written):
        w.write_window(i, records(i, sizes[i], K))
    w.close()
    return path.parent / (path.name + ".part"), path.parent / (path.name + ".part.journal")


def _window_offset(part, i):
    with open(part, "rb") as f:
        _, _, hlen = __import__("struct").unpack("<8sII", f.read(16))
    return -(-(16 + hlen) // 64) * 64 + sum(SIZES[:i]) * R.RECORD_DTYPE(K).itemsize


def test_corrupted_journalled_window_is_detected_and_rewritten(tmp_path, straight):
    out = tmp_path / "a.ppldref"
    part, journal = _partial(out, 6)
    off = _window_offset(part, 3)
    data = bytearray(_bytes(part))
    data[off + 17] ^= 0x40
    part.write_bytes(bytes(data))
    with R.ReferenceWriter(out, HEADER, K, n_windows=len(SIZES)) as w:
        assert w.done == {0, 1, 2}
        assert os.path.getsize(part) == off  # cut after the last good window
        assert len(_bytes(journal).splitlines()) == 1 + 3
    assert _bytes(_finish(out, SIZES, expect_done={0, 1, 2})) == straight


def test_torn_tail_and_torn_journal_line(tmp_path, straight):
    out = tmp_path / "a.ppldref"
    part, journal = _partial(out, 4)
    with open(part, "ab") as f:  # half of window 4's bytes
        f.write(records(4, SIZES[4], K).tobytes()[:100])
    with open(journal, "ab") as f:  # a torn line
        f.write(b'{"count":5,"sha')
    assert _bytes(_finish(out, SIZES, expect_done=range(4))) == straight


def test_journal_lines_that_do_not_verify_stop_the_resume(tmp_path, straight):
    out = tmp_path / "a.ppldref"
    part, journal = _partial(out, 5)
    lines = _bytes(journal).splitlines(keepends=True)
    bad = [
        lines[:3] + [b"not json\n"] + lines[4:],                      # garbage line
        lines[:3] + [lines[4]] + lines[4:],                           # a window out of order
        lines[:3] + [json.dumps({"window": 2, "count": 10**12, "sha256": "0" * 64},
                                separators=(",", ":")).encode() + b"\n"] + lines[4:],  # a lie
    ]
    for b in bad:
        part0 = _bytes(part)
        journal.write_bytes(b"".join(b))
        with R.ReferenceWriter(out, HEADER, K, n_windows=len(SIZES)) as w:
            assert w.done == {0, 1}
        part.write_bytes(part0)  # the bytes were cut: put them back for the next case
    journal.write_bytes(b"".join(lines[:4]))
    assert _bytes(_finish(out, SIZES, expect_done={0, 1, 2})) == straight


@pytest.mark.parametrize("damage", ["no journal", "other journal", "torn header", "empty part"])
def test_unusable_partial_state_starts_over(tmp_path, straight, damage):
    out = tmp_path / "a.ppldref"
    part, journal = _partial(out, 3)
    if damage == "no journal":
        os.remove(journal)
    elif damage == "other journal":
        head, *rest = _bytes(journal).splitlines(keepends=True)
        h = json.loads(head)
        h["header_sha256"] = "0" * 64
        journal.write_bytes(json.dumps(h).encode() + b"\n" + b"".join(rest))
    elif damage == "torn header":
        part.write_bytes(_bytes(part)[:30])
    else:
        part.write_bytes(b"")
    assert _bytes(_finish(out, SIZES, expect_done=set())) == straight


@pytest.mark.parametrize("field,change", [
    ("model", {"model": "tiny/other"}),
    ("tokens_sha256", {"tokens_sha256": "00" * 32}),
    ("tokenizer_sha256", {"tokenizer_sha256": "00" * 32}),
    ("protocol.stride", {"protocol": {"name": "sliding", "max_length": 64, "stride": 16}}),
    ("protocol.name", {"protocol": {"name": "gptq", "max_length": 64, "stride": 32}}),
    ("versions.numpy", {"versions": {"ppldelta": "0.1.0", "numpy": "1"}}),
    ("extra", {"extra": 1}),
])
def test_resume_with_another_header_is_refused(tmp_path, field, change):
    out = tmp_path / "a.ppldref"
    part, journal = _partial(out, 3)
    before = _bytes(part), _bytes(journal)
    with pytest.raises(ValueError, match=rf"different header: '{field}' is .* there and .* here"):
        R.ReferenceWriter(out, {**HEADER, **change}, K, n_windows=len(SIZES))
    assert (_bytes(part), _bytes(journal)) == before  # nothing touched
    # resume=False starts over with the new header
    with R.ReferenceWriter(out, {**HEADER, **change}, K, n_windows=len(SIZES), resume=False) as w:
        assert w.done == set()


def test_a_part_without_windows_gives_way_to_another_header(tmp_path):
    """A build that stopped before its first window (a bad setting found after the header was
    written) holds nothing to keep: the corrected command starts over instead of being refused;
    one window written, and it is refused again."""
    out = tmp_path / "a.ppldref"
    _partial(out, 0)
    other = {**HEADER, "model": "tiny/other"}
    with R.ReferenceWriter(out, other, K, n_windows=len(SIZES)) as w:
        assert w.done == set() and w.header["model"] == "tiny/other"
    out2 = tmp_path / "b.ppldref"
    _partial(out2, 1)
    with pytest.raises(ValueError, match="different header"):
        R.ReferenceWriter(out2, other, K, n_windows=len(SIZES))


def test_resume_with_another_k_or_plan_is_refused(tmp_path):
    out = tmp_path / "a.ppldref"
    _partial(out, 3)
    with pytest.raises(ValueError, match="'k' is 5 there and 6 here"):
        R.ReferenceWriter(out, HEADER, K + 1, n_windows=len(SIZES))
    with pytest.raises(ValueError, match="'n_windows' is 10 there and 11 here"):
        R.ReferenceWriter(out, HEADER, K, n_windows=len(SIZES) + 1)
    with pytest.raises(ValueError, match="'shard' is absent there"):
        R.ReferenceWriter(out, HEADER, K, n_windows=len(SIZES), windows=range(0, 10, 2))


def test_finished_file_is_reused_and_a_damaged_one_rebuilt(tmp_path, straight):
    out = tmp_path / "a.ppldref"
    out.write_bytes(straight)
    with R.ReferenceWriter(out, HEADER, K, n_windows=len(SIZES)) as w:
        assert w.complete and w.done == set(range(len(SIZES))) and w.next_window is None
        with pytest.raises(ValueError, match="already complete"):
            w.write_window(0, records(0, SIZES[0], K))
        assert w.finalize() == str(out)
    assert sorted(os.listdir(tmp_path)) == ["a.ppldref"]
    # another header: rebuilt (the old file stays until the new one is finalized)
    with R.ReferenceWriter(out, {**HEADER, "model": "x"}, K, n_windows=len(SIZES)) as w:
        assert not w.complete and w.done == set()
    os.remove(tmp_path / "a.ppldref.part")
    os.remove(tmp_path / "a.ppldref.part.journal")
    # damaged records: detected by the checksum, rebuilt
    data = bytearray(straight)
    data[len(data) // 2] ^= 1
    out.write_bytes(bytes(data))
    assert _bytes(_finish(out, SIZES, expect_done=set())) == straight


def test_killed_during_finalize_resumes(tmp_path, straight):
    """A footer written but not renamed: the footer is cut off and finalize runs again."""
    out = tmp_path / "a.ppldref"
    part, journal = _partial(out, len(SIZES))
    flen = len(straight) - _window_offset(part, len(SIZES))
    with open(part, "ab") as f:
        f.write(straight[-flen:][:-3])
    assert _bytes(_finish(out, SIZES, expect_done=range(len(SIZES)))) == straight


# ----------------------------------------------------------------------------- shards

def _shards(tmp_path, sizes, k, subsets, name="s"):
    paths = []
    for j, ws in enumerate(subsets):
        p = tmp_path / f"{name}.shard{j}"
        with R.ReferenceWriter(p, HEADER, k, n_windows=len(sizes), windows=ws) as w:
            for i in w.windows:
                if i not in w.done:
                    w.write_window(i, records(i, sizes[i], k))
            paths.append(w.finalize())
    return paths


@pytest.mark.parametrize("subsets", [
    [R.shard_windows(10, r, 2) for r in range(2)],
    [R.shard_windows(10, r, 3) for r in range(3)],
    [range(0, 4), range(4, 10)],
    [[0, 1, 5, 9], [2, 3, 4, 6, 7, 8]],
    [R.shard_windows(10, r, 16) for r in range(16)],  # more ranks than windows: empty shards
])
def test_merge_shards_equals_the_single_file(tmp_path, straight, subsets):
    paths = _shards(tmp_path, SIZES, K, subsets)
    for p, ws in zip(paths, subsets):
        with R.read_reference(p) as ref:
            ref.verify()
            assert ref.is_shard and ref.windows.tolist() == list(ws)
            for i in ws:
                assert ref.window(i).tobytes() == records(i, SIZES[i], K).tobytes()
            with pytest.raises(KeyError):
                ref.window(next(i for i in range(10) if i not in list(ws)))
    out = R.merge_shards(paths[::-1], tmp_path / "m.ppldref")
    assert _bytes(out) == straight


def test_shard_paths():
    assert R.shard_path("x.ppldref", 1, 4) == "x.ppldref.shard-00001-of-00004"
    assert list(R.shard_windows(7, 1, 3)) == [1, 4]
    with pytest.raises(ValueError):
        R.shard_path("x", 4, 4)


def test_a_full_range_is_not_a_shard(tmp_path, straight):
    p = tmp_path / "a.ppldref"
    with R.ReferenceWriter(p, HEADER, K, n_windows=len(SIZES), windows=range(len(SIZES))) as w:
        for i in w.windows:
            w.write_window(i, records(i, SIZES[i], K))
        w.finalize()
    assert _bytes(p) == straight
    assert _bytes(R.merge_shards([p], tmp_path / "m.ppldref")) == straight


def test_merge_refuses_bad_shard_sets(tmp_path):
    paths = _shards(tmp_path, SIZES, K, [range(0, 6), range(5, 10)])
    with pytest.raises(ValueError, match="window 5 is in both"):
        R.merge_shards(paths, tmp_path / "m")
    paths = _shards(tmp_path, SIZES, K, [range(0, 4), range(5, 10)])
    with pytest.raises(ValueError, match=r"1 window\(s\) in no shard \(first: \[4\]\)"):
        R.merge_shards(paths, tmp_path / "m")
    with pytest.raises(ValueError, match="no shards"):
        R.merge_shards([], tmp_path / "m")
    a = _shards(tmp_path, SIZES, K, [range(0, 5)], name="a")
    with R.ReferenceWriter(tmp_path / "b", {**HEADER, "model": "other"}, K, n_windows=10,
                           windows=range(5, 10)) as w:
        for i in w.windows:
            w.write_window(i, records(i, SIZES[i], K))
        b = w.finalize()
    with pytest.raises(ValueError, match="from another build.*'model' is 'other' there and 'tiny/original' here"):
        R.merge_shards(a + [b], tmp_path / "m")
    paths = _shards(tmp_path, SIZES, K, [range(0, 5), range(5, 10)])
    data = bytearray(_bytes(paths[1]))
    with R.read_reference(paths[1]) as ref:
        data[ref.data_offset + 5] ^= 1
    with open(paths[1], "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match="do not match the footer's sha256"):
        R.merge_shards(paths, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_killed_shard_resumes(tmp_path, straight):
    """A rank's shard interrupted and resumed, then merged: the single file's bytes."""
    subsets = [R.shard_windows(10, r, 2) for r in range(2)]
    p0 = tmp_path / "s.shard0"
    w = R.ReferenceWriter(p0, HEADER, K, n_windows=10, windows=subsets[0])
    for i in list(w.windows)[:2]:
        w.write_window(i, records(i, SIZES[i], K))
    w.close()
    with R.ReferenceWriter(p0, HEADER, K, n_windows=10, windows=subsets[0]) as w:
        assert w.done == {0, 2} and w.next_window == 4
        for i in w.windows:
            if i not in w.done:
                w.write_window(i, records(i, SIZES[i], K))
        w.finalize()
    p1 = _shards(tmp_path, SIZES, K, [subsets[1]], name="t")[0]
    assert _bytes(R.merge_shards([p0, p1], tmp_path / "m.ppldref")) == straight


# ----------------------------------------------------------------------------- property

@settings(max_examples=40)
@given(sizes=st.lists(st.integers(0, 6), max_size=7), k=st.integers(1, 40),
       cut=st.integers(0, 7), junk=st.binary(max_size=50), world=st.integers(1, 4),
       data=st.data())
def test_any_plan_resumed_or_sharded_gives_one_file(tmp_path_factory, sizes, k, cut, junk, world, data):
    with mock.patch.object(R, "_fsync", lambda fd: None):  # the bytes, not the disk waits
        _any_plan(tmp_path_factory, sizes, k, cut, junk, world, data)


def _any_plan(tmp_path_factory, sizes, k, cut, junk, world, data):
    d = tmp_path_factory.mktemp("prop")
    want = _bytes(build(d / "one.ppldref", sizes, k))
    with R.read_reference(d / "one.ppldref") as ref:
        ref.verify()
        assert ref.window_counts.tolist() == sizes
        for i, n in enumerate(sizes):
            assert ref.window(i).tobytes() == records(i, n, k).tobytes()
    # interrupted after `cut` windows, with junk after the last one, then resumed
    cut = min(cut, len(sizes))
    w = R.ReferenceWriter(d / "two.ppldref", HEADER, k, n_windows=len(sizes))
    for i in range(cut):
        w.write_window(i, records(i, sizes[i], k))
    w.close()
    with open(d / "two.ppldref.part", "ab") as f:
        f.write(junk)
    with R.ReferenceWriter(d / "two.ppldref", HEADER, k, n_windows=len(sizes)) as w:
        assert w.done == set(range(cut))
        for i in range(cut, len(sizes)):
            w.write_window(i, records(i, sizes[i], k))
        assert _bytes(w.finalize()) == want
    # sharded over `world` ranks (strided or an arbitrary partition), merged
    if data.draw(st.booleans()):
        subsets = [R.shard_windows(len(sizes), r, world) for r in range(world)]
    else:
        owner = data.draw(st.lists(st.integers(0, world - 1), min_size=len(sizes), max_size=len(sizes)))
        subsets = [[i for i, o in enumerate(owner) if o == r] for r in range(world)]
    paths = _shards(d, sizes, k, subsets)
    assert _bytes(R.merge_shards(paths, d / "merged.ppldref")) == want
