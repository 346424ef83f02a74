"""ppldelta.reffile: the reference file format, its reader's validation, the hashes and the
compatibility check (resume, kill and shards: test_reffile_resume.py)."""
import hashlib
import json
import os
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppldelta import reffile as R

HEADER = {"model": "tiny/original", "model_sha256": "ab" * 32, "tokenizer": "tiny",
          "tokenizer_sha256": "cd" * 32, "tokens_sha256": "ef" * 32, "n_tokens": 1000,
          "protocol": {"name": "sliding", "max_length": 64, "stride": 32},
          "versions": {"ppldelta": "0.1.0", "numpy": "2"}}


def records(i, n, k, salt=0):
    """Deterministic records of window i (every field filled, -inf tails included)."""
    rng = np.random.default_rng([salt, i, n, k])
    r = np.zeros(n, dtype=R.RECORD_DTYPE(k))
    r["token"] = rng.integers(0, 50000, n)
    r["lp"] = -rng.exponential(2.0, n)
    r["entropy"] = rng.exponential(2.0, n)
    r["tail"] = np.where(rng.random(n) < 0.2, -np.inf, -rng.exponential(3.0, n))
    r["lp_min"] = -30 - rng.exponential(5.0, n)
    r["ids"] = rng.integers(0, 50000, (n, k))
    r["lps"] = -np.sort(rng.exponential(3.0, (n, k)), axis=1).astype(np.float32)
    return r


def build(path, sizes, k, header=HEADER, **kw):
    with R.ReferenceWriter(path, header, k, n_windows=len(sizes), **kw) as w:
        for i in w.windows:
            w.write_window(i, records(i, sizes[i], k))
        return w.finalize()


def test_record_dtype_is_the_designed_one():
    k = 32
    want = np.dtype([("token", "<i4"), ("lp", "<f8"), ("entropy", "<f8"), ("tail", "<f8"),
                     ("lp_min", "<f8"), ("ids", "<i4", (k,)), ("lps", "<f4", (k,))], align=False)
    assert R.RECORD_DTYPE(k) == want and want.itemsize == 36 + 8 * k == 292


def test_round_trip(tmp_path):
    sizes, k = [5, 0, 3, 7, 0], 6
    p = build(tmp_path / "a.ppldref", sizes, k)
    assert p == str(tmp_path / "a.ppldref")
    assert sorted(os.listdir(tmp_path)) == ["a.ppldref"]  # no .part, no journal left
    with R.read_reference(p) as ref:
        ref.verify()
        assert ref.k == k and ref.n_records == sum(sizes) == len(ref) and ref.n_windows == 5
        assert ref.windows.tolist() == list(range(5)) and not ref.is_shard
        assert ref.window_counts.tolist() == sizes
        assert ref.window_offsets.tolist() == [0, 5, 5, 8, 15, 15]
        want = np.concatenate([records(i, n, k) for i, n in enumerate(sizes)])
        assert ref.records.dtype == R.RECORD_DTYPE(k)
        assert ref.records.tobytes() == want.tobytes()
        for i, n in enumerate(sizes):
            assert ref.window(i).tobytes() == records(i, n, k).tobytes()
        assert not ref.records.flags.writeable
        with pytest.raises(ValueError):
            ref.records["lp"][0] = 0.0
        for key, v in HEADER.items():
            assert ref.header[key] == v
        assert ref.header["k"] == k and ref.header["record_size"] == 36 + 8 * k
        assert "created" not in json.dumps(ref.header)


def test_layout_matches_the_documented_bytes(tmp_path):
    sizes, k = [2, 3], 4
    p = build(tmp_path / "a.ppldref", sizes, k)
    data = open(p, "rb").read()
    magic, version, hlen = struct.unpack_from("<8sII", data, 0)
    assert magic == b"PPLDREF\0" and version == 2
    header = json.loads(data[16:16 + hlen])
    assert data[16:16 + hlen] == json.dumps(header, sort_keys=True, separators=(",", ":"),
                                             ensure_ascii=False).encode()
    off = -(-(16 + hlen) // 64) * 64
    assert data[16 + hlen:off] == bytes(off - 16 - hlen)
    flen, end = struct.unpack_from("<Q8s", data, len(data) - 16)
    assert end == b"PPLDEND\0"
    footer = json.loads(data[len(data) - 16 - flen:len(data) - 16])
    rec = data[off:len(data) - 16 - flen]
    assert len(rec) == 5 * (36 + 8 * k) and footer == {
        "n_records": 5, "window_counts": sizes, "records_sha256": hashlib.sha256(rec).hexdigest()}
    assert R.file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_documented_numpy_reader(tmp_path):
    """The pure-NumPy reader in docs/reference-format.md reads what the writer writes."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "reference-format.md")).read()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    sizes, k = [4, 0, 2], 3
    p = build(tmp_path / "a.ppldref", sizes, k)
    ns = {}
    exec(code, ns)  # noqa: S102 - our own documentation
    header, rec, counts = ns["read_ppldref"](p)
    with R.read_reference(p) as ref:
        assert header == ref.header and counts == sizes
        assert rec.dtype == ref.records.dtype and rec.tobytes() == ref.records.tobytes()


def test_empty_build_and_empty_windows(tmp_path):
    p = build(tmp_path / "none.ppldref", [], 1)
    with R.read_reference(p) as ref:
        ref.verify()
        assert ref.n_records == 0 and ref.records.shape == (0,) and ref.window_offsets.tolist() == [0]
    p = build(tmp_path / "zeros.ppldref", [0, 0, 0], 2)
    with R.read_reference(p) as ref:
        ref.verify()
        assert ref.n_records == 0 and ref.window_offsets.tolist() == [0, 0, 0, 0]
        assert ref.window(1).shape == (0,)


def test_deterministic_bytes(tmp_path):
    a = build(tmp_path / "a.ppldref", [3, 1], 5)
    b = build(tmp_path / "b.ppldref", [3, 1], 5, header=dict(reversed(list(HEADER.items()))))
    assert open(a, "rb").read() == open(b, "rb").read()


# ----------------------------------------------------------------------------- writer checks

def test_writer_refuses_misuse(tmp_path):
    k = 3
    with R.ReferenceWriter(tmp_path / "a.ppldref", HEADER, k, n_windows=3) as w:
        assert w.next_window == 0 and w.done == set()
        with pytest.raises(ValueError, match="out of order: the next window is 0"):
            w.write_window(1, records(1, 2, k))
        with pytest.raises(TypeError, match="RECORD_DTYPE"):
            w.write_window(0, records(0, 2, k + 1))
        with pytest.raises(TypeError, match="RECORD_DTYPE"):
            w.write_window(0, np.zeros(2))
        with pytest.raises(ValueError, match="1-D"):
            w.write_window(0, records(0, 4, k).reshape(2, 2))
        w.write_window(0, records(0, 2, k))
        with pytest.raises(ValueError, match="already written"):
            w.write_window(0, records(0, 2, k))
        with pytest.raises(ValueError, match="2 window.*not written"):
            w.finalize()
        w.write_window(np.int64(1), records(1, 0, k))
        assert 1 in w.done and np.int64(0) in w.done and 2 not in w.done and "0" not in w.done
        assert len(w.done) == 2 and list(w.done) == [0, 1] and w.done == {0, 1} and w.n_records == 2
        w.write_window(2, records(2, 1, k))
        assert w.next_window is None
        with pytest.raises(ValueError, match="every window is already written"):
            w.write_window(3, records(3, 1, k))
        w.finalize()
        with pytest.raises(ValueError, match="finalized"):
            w.write_window(2, records(2, 1, k))


def test_writer_accepts_byte_swapped_records(tmp_path):
    k = 4
    a = build(tmp_path / "a.ppldref", [3], k)
    swapped = records(0, 3, k).astype(R.RECORD_DTYPE(k).newbyteorder(">"))
    with R.ReferenceWriter(tmp_path / "b.ppldref", HEADER, k, n_windows=1) as w:
        w.write_window(0, swapped)
        b = w.finalize()
    assert open(a, "rb").read() == open(b, "rb").read()


def test_header_validation(tmp_path):
    p = tmp_path / "a.ppldref"
    with pytest.raises(ValueError, match=r"protocol\.stride = nan is not finite"):
        R.ReferenceWriter(p, {"protocol": {"stride": float("nan")}}, 2, n_windows=1)
    with pytest.raises(ValueError, match=r"x\[1\] = inf"):
        R.ReferenceWriter(p, {"x": [1.0, np.float32("inf")]}, 2, n_windows=1)
    with pytest.raises(TypeError, match="not a string"):
        R.ReferenceWriter(p, {1: "a"}, 2, n_windows=1)
    with pytest.raises(TypeError, match="not a JSON type"):
        R.ReferenceWriter(p, {"a": object()}, 2, n_windows=1)
    with pytest.raises(ValueError, match="'k' = 3 disagrees"):
        R.ReferenceWriter(p, {"k": 3}, 2, n_windows=1)
    with pytest.raises(ValueError, match="'shard' is set by the writer"):
        R.ReferenceWriter(p, {"shard": {}}, 2, n_windows=1)
    with pytest.raises(ValueError, match="k = 0"):
        R.ReferenceWriter(p, {}, 0, n_windows=1)
    with pytest.raises(ValueError, match="n_windows"):
        R.ReferenceWriter(p, {}, 2, n_windows=-1)
    with pytest.raises(ValueError, match="window_records"):
        R.ReferenceWriter(p, {"window_records": [1, 2]}, 2, n_windows=3)
    with pytest.raises(ValueError, match="listed twice"):
        R.ReferenceWriter(p, {}, 2, n_windows=3, windows=[0, 0])
    with pytest.raises(ValueError, match="outside"):
        R.ReferenceWriter(p, {}, 2, n_windows=3, windows=[3])
    for runs in ([[5, 0]], [[0, 0], [0, 1]], [[0, 2]]):  # not from token 0, not ascending, no such group
        with pytest.raises(ValueError, match="groups entry is malformed"):  # was checked only when used
            R.ReferenceWriter(p, {"groups": {"names": ["a", "b"], "runs": runs}}, 2, n_windows=1)
    assert not os.listdir(tmp_path)
    # NumPy values become plain JSON; the reserved keys may be passed if they agree
    h = {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(2), "t": (1, 2), "k": 2}
    with R.ReferenceWriter(p, h, 2, n_windows=1) as w:
        w.write_window(0, records(0, 1, 2))
        w.finalize()
    with R.read_reference(p) as ref:
        assert {key: ref.header[key] for key in h} == {"n": 3, "x": 0.5, "a": [0, 1], "t": [1, 2], "k": 2}


def test_window_records_enforced(tmp_path):
    k, sizes = 2, [2, 0, 1]
    h = dict(HEADER, window_records=sizes)
    with R.ReferenceWriter(tmp_path / "a.ppldref", h, k, n_windows=3) as w:
        with pytest.raises(ValueError, match="window_records says 2"):
            w.write_window(0, records(0, 3, k))
        for i, n in enumerate(sizes):
            w.write_window(i, records(i, n, k))
        w.finalize()
    with R.read_reference(tmp_path / "a.ppldref") as ref:
        assert ref.header["window_records"] == sizes


def test_second_writer_on_the_same_path_is_refused(tmp_path):
    p = tmp_path / "a.ppldref"
    with R.ReferenceWriter(p, HEADER, 2, n_windows=2) as w:
        w.write_window(0, records(0, 1, 2))
        with pytest.raises(RuntimeError, match="another process is writing"):
            R.ReferenceWriter(p, HEADER, 2, n_windows=2)


# ----------------------------------------------------------------------------- hostile files

def craft(path, header=None, records_bytes=b"", footer=None, *, hbytes=None, fbytes=None,
          version=1, pad=b"\0", trailer=b"PPLDEND\0", k=2):
    """A file in the reference layout with any part replaced."""
    if header is None:
        header = {"k": k, "n_windows": 1, "record_dtype": R._dtype_json(k),
                  "record_size": R.RECORD_DTYPE(k).itemsize}
    hb = hbytes if hbytes is not None else json.dumps(header).encode()
    n = len(records_bytes) // R.RECORD_DTYPE(k).itemsize
    if footer is None:
        footer = {"n_records": n, "window_counts": [n],
                  "records_sha256": hashlib.sha256(records_bytes).hexdigest()}
    fb = fbytes if fbytes is not None else json.dumps(footer).encode()
    head = struct.pack("<8sII", b"PPLDREF\0", version, len(hb)) + hb
    head += pad * (-len(head) % 64)
    with open(path, "wb") as f:
        f.write(head + records_bytes + fb + struct.pack("<Q", len(fb)) + trailer)
    return str(path)


def refused(path, match=None):
    with pytest.raises(ValueError, match=match) as e:
        R.read_reference(path).verify()
    assert str(e.value).startswith(str(path))
    return str(e.value)


def test_crafted_file_is_readable(tmp_path):
    rec = records(0, 3, 2).tobytes()
    with R.read_reference(craft(tmp_path / "ok", records_bytes=rec)) as ref:
        ref.verify()
        assert ref.records.tobytes() == rec


def test_every_truncation_is_refused(tmp_path):
    data = open(build(tmp_path / "a.ppldref", [3, 0, 2], 3), "rb").read()
    p = tmp_path / "cut"
    for n in range(len(data)):
        p.write_bytes(data[:n])
        refused(p)


def test_garbage_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "g"
    for n in (0, 1, 15, 16, 17, 100, 5000):
        p.write_bytes(rng.bytes(n))
        refused(p)
        p.write_bytes(b"PPLDREF\0" + rng.bytes(n))
        refused(p)
    p.write_bytes(b"GGUF" + bytes(100))
    refused(p, "not a ppldelta reference file")


def test_unfinished_file_says_resume(tmp_path):
    k = 2
    w = R.ReferenceWriter(tmp_path / "a.ppldref", HEADER, k, n_windows=3)
    w.write_window(0, records(0, 4, k))
    w.close()
    msg = refused(tmp_path / "a.ppldref.part", "unfinished")
    assert "resume" in msg and "journal" in msg
    with pytest.raises(FileNotFoundError):
        R.read_reference(tmp_path / "a.ppldref")


def test_huge_header_lengths_are_refused_without_reading(tmp_path):
    p = tmp_path / "h"
    with open(p, "wb") as f:
        f.write(struct.pack("<8sII", b"PPLDREF\0", 1, 0xFFFFFFFF) + bytes(100))
    refused(p, "header length 4294967295")
    # a sparse file big enough for the claimed header: refused by the limit, nothing read
    with open(p, "wb") as f:
        f.write(struct.pack("<8sII", b"PPLDREF\0", 1, 0xFFFFFFF0))
        f.truncate(1 << 34)
    refused(p, "header length")
    # a huge footer length claim
    data = bytearray(open(build(tmp_path / "a.ppldref", [2], 2), "rb").read())
    data[-16:-8] = struct.pack("<Q", 1 << 62)
    p.write_bytes(bytes(data))
    refused(p, "footer length")


def test_sparse_file_with_consistent_sizes_is_mapped_not_read(tmp_path):
    """A (sparse) file whose sizes agree is memory-mapped lazily: nothing is allocated."""
    k = 2
    size = R.RECORD_DTYPE(k).itemsize
    n = (1 << 33) // size
    footer = json.dumps({"n_records": n, "window_counts": [n], "records_sha256": "0" * 64}).encode()
    hb = json.dumps({"k": k, "n_windows": 1, "record_dtype": R._dtype_json(k), "record_size": size}).encode()
    head = struct.pack("<8sII", b"PPLDREF\0", 1, len(hb)) + hb
    head += b"\0" * (-len(head) % 64)
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.write(head)
        f.seek(len(head) + n * size)
        f.write(footer + struct.pack("<Q", len(footer)) + b"PPLDEND\0")
    with R.read_reference(p) as ref:
        assert ref.n_records == n and ref.records.shape == (n,)
        assert ref.records[n // 2]["token"] == 0
    # the same file claiming one more record than it holds
    bad = json.dumps({"n_records": n + 1, "window_counts": [n + 1], "records_sha256": "0" * 64}).encode()
    with open(p, "r+b") as f:
        f.seek(len(head) + n * size)
        f.write(bad + struct.pack("<Q", len(bad)) + b"PPLDEND\0")
    refused(p, "does not fill")


def test_bad_headers_are_refused(tmp_path):
    k = 2
    good = {"k": k, "n_windows": 1, "record_dtype": R._dtype_json(k), "record_size": R.RECORD_DTYPE(k).itemsize}
    rec = records(0, 1, k).tobytes()
    p = tmp_path / "f"
    cases = [
        (dict(good, k=3), "record layout"),
        (dict(good, k=0), "'k' = 0"),
        (dict(good, k=True), "'k' = true"),
        (dict(good, k=1 << 20), "'k'"),
        (dict(good, record_dtype=R._dtype_json(k)[:-1]), "record layout"),
        (dict(good, record_dtype=[["token", ">i4"]] + R._dtype_json(k)[1:]), "record layout"),
        (dict(good, record_size=1), "record layout"),
        (dict(good, n_windows=-1), "n_windows"),
        (dict(good, n_windows=2), "window_counts"),
        (dict(good, n_windows=1.0), "n_windows"),
        (dict(good, shard={"start": 0, "stop": 5, "step": 1}), "shard range"),
        (dict(good, shard={"start": 0, "stop": 1, "step": 0}), "shard range"),
        (dict(good, n_windows=3, shard={"windows": [2, 1]}), "increasing"),
        (dict(good, shard={"what": 1}), "shard description"),
        (dict(good, window_records=[5]), "window_records"),
        (dict(good, window_records="x"), "window_records"),
        ([good], "not a JSON object"),
    ]
    for header, match in cases:
        refused(craft(p, header, rec, k=k), match)
    for hb, match in [(b'{"k": NaN}', "strict JSON"), (b'{"k": Infinity}', "strict JSON"),
                      (b'{"k": 2, "k": 2}', "duplicate"), (b"\xff\xfe", "strict JSON"),
                      (b"[" * 100000 + b"]" * 100000, "nested too deeply|strict JSON"),
                      (b'{"k": 1' + b"0" * 5000 + b"}", "strict JSON|'k'"), (b"", "strict JSON")]:
        refused(craft(p, hbytes=hb, records_bytes=rec, k=k), match)
    refused(craft(p, good, rec, version=3, k=k), "format version 3")
    refused(craft(p, good, rec, pad=b"\1", k=k), "padding")


def test_bad_footers_are_refused(tmp_path):
    k = 2
    rec = records(0, 2, k).tobytes()
    sha = hashlib.sha256(rec).hexdigest()
    p = tmp_path / "f"
    cases = [
        ({"n_records": 2, "window_counts": [2]}, "exactly"),
        ({"n_records": 2, "window_counts": [2], "records_sha256": sha, "x": 1}, "exactly"),
        ({"n_records": 3, "window_counts": [3], "records_sha256": sha}, "does not fill"),
        ({"n_records": -2, "window_counts": [2], "records_sha256": sha}, "does not fill"),
        ({"n_records": 2, "window_counts": [1], "records_sha256": sha}, "window_counts"),
        ({"n_records": 2, "window_counts": [1, 1], "records_sha256": sha}, "window_counts"),
        ({"n_records": 2, "window_counts": [2.0], "records_sha256": sha}, "window_counts"),
        ({"n_records": 2, "window_counts": [2], "records_sha256": sha.upper()}, "sha256"),
        ({"n_records": 2, "window_counts": [2], "records_sha256": "0" * 64}, "do not match"),
        ([], "exactly"),
    ]
    for footer, match in cases:
        refused(craft(p, records_bytes=rec, footer=footer, k=k), match)
    refused(craft(p, records_bytes=rec, fbytes=b'{"n_records": NaN}', k=k), "strict JSON")
    refused(craft(p, records_bytes=rec, trailer=b"PPLDEND\1", k=k), "unfinished")


def test_only_regular_files(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        R.read_reference(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(ValueError, match="not a regular file"):
            R.read_reference(tmp_path / "fifo")


_FUZZ_BASE = {}


@settings(max_examples=300)
@given(st.data())
def test_mutated_files_give_value_errors_only(tmp_path_factory, data):
    """Any flip, cut or insertion: read_reference + verify either succeed or raise ValueError."""
    if not _FUZZ_BASE:
        d = tmp_path_factory.mktemp("fuzz")
        _FUZZ_BASE["bytes"] = open(build(d / "a.ppldref", [2, 0, 1], 2), "rb").read()
        _FUZZ_BASE["dir"] = d
    base = bytearray(_FUZZ_BASE["bytes"])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        i = data.draw(st.integers(0, max(len(base) - 1, 0)))
        if op == "flip" and base:
            base[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del base[i:i + data.draw(st.integers(1, 40))]
        elif op == "insert":
            base[i:i] = data.draw(st.binary(min_size=1, max_size=20))
        elif base:
            base[i] = data.draw(st.integers(0, 255))
    p = _FUZZ_BASE["dir"] / "m"
    p.write_bytes(bytes(base))
    try:  # anything accepted passed its checksum (e.g. a changed letter in a header string)
        with R.read_reference(p) as ref:
            ref.verify()
    except ValueError:
        pass


# ----------------------------------------------------------------------------- hashes

def test_tokens_sha256():
    ids = [5, 0, 70000, 2**31 - 1, 12]
    want = hashlib.sha256(np.array(ids, dtype="<i4").tobytes()).hexdigest()
    assert R.tokens_sha256(ids) == want
    assert R.tokens_sha256(np.array(ids, dtype=">i8")) == want
    assert R.tokens_sha256(np.array([ids], dtype=np.uint32)) == want
    assert R.tokens_sha256({"input_ids": [ids]}) == want
    assert R.tokens_sha256([]) == hashlib.sha256(b"").hexdigest()
    torch = pytest.importorskip("torch")
    assert R.tokens_sha256(torch.tensor([ids])) == want
    with pytest.raises(ValueError, match="got -1 at index 1"):
        R.tokens_sha256([1, -1])
    with pytest.raises(ValueError, match="outside"):
        R.tokens_sha256([2**31])
    with pytest.raises(TypeError):
        R.tokens_sha256([1.0, 2.0])


def test_vocab_sha256():
    vocab = {"a": 0, "b": 1, "Ġthe": 2, "é": 3, "<s>": 4}
    want = hashlib.sha256(json.dumps(sorted([t, i] for t, i in vocab.items()), separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")).hexdigest()

    class Tok:
        def get_vocab(self):
            return dict(reversed(list(vocab.items())))

    assert R.vocab_sha256(vocab) == R.vocab_sha256(Tok()) == want
    assert R.vocab_sha256(sorted(vocab, key=vocab.get)) == want
    assert R.vocab_sha256({**vocab, "c": 5}) != want
    assert R.vocab_sha256({**vocab, "a": 5}) != want
    assert R.vocab_sha256([b"\x00", b"ab"]) == R.vocab_sha256({"bytes:00": 0, "bytes:6162": 1})
    with pytest.raises(TypeError):
        R.vocab_sha256(3)
    with pytest.raises(TypeError):
        R.vocab_sha256({"a": 1.5})


def test_check_compatible(tmp_path):
    ok = dict(tokenizer_sha256=HEADER["tokenizer_sha256"], tokens_sha256=HEADER["tokens_sha256"])
    R.check_compatible(HEADER, **ok, protocol="sliding")
    R.check_compatible(HEADER, protocol={"name": "sliding", "max_length": 64, "stride": 32})
    R.check_compatible(HEADER)
    with R.read_reference(build(tmp_path / "a.ppldref", [1], 2)) as ref:
        R.check_compatible(ref, **ok, protocol="sliding")
        with pytest.raises(ValueError, match="tokenizer"):
            R.check_compatible(ref, tokenizer_sha256="00" * 32)
    with pytest.raises(ValueError, match=r"tokenizer's vocabulary.*tiny.*share the reference's tokenizer"):
        R.check_compatible(HEADER, tokenizer_sha256="00" * 32)
    with pytest.raises(ValueError, match="evaluated tokens differ"):
        R.check_compatible(HEADER, tokens_sha256="00" * 32)
    with pytest.raises(ValueError, match="protocol 'gptq' here, 'sliding'"):
        R.check_compatible(HEADER, protocol="gptq")
    with pytest.raises(ValueError, match=r"'protocol\.stride' is 32 there and 16 here"):
        R.check_compatible(HEADER, protocol={"name": "sliding", "max_length": 64, "stride": 16})
    with pytest.raises(ValueError, match=r"protocol\.bos' is absent there"):
        R.check_compatible(HEADER, protocol={**HEADER["protocol"], "bos": 1})
    with pytest.raises(ValueError, match="records no tokens_sha256"):
        R.check_compatible({"k": 2}, tokens_sha256="00" * 32)
    with pytest.raises(ValueError, match="records no protocol"):
        R.check_compatible({"k": 2}, protocol="hf")
    with pytest.raises(ValueError) as e:  # every mismatch named at once
        R.check_compatible(HEADER, tokenizer_sha256="0" * 64, tokens_sha256="0" * 64, protocol="hf")
    assert all(w in str(e.value) for w in ("tokenizer's vocabulary differs", "protocol"))
    assert "evaluated tokens" not in str(e.value)  # another tokenizer's tokens differ anyway: said once
    with pytest.raises(ValueError) as e:
        R.check_compatible(HEADER, tokenizer_sha256=HEADER["tokenizer_sha256"], tokens_sha256="0" * 64,
                           protocol="hf")
    assert all(w in str(e.value) for w in ("evaluated tokens differ", "protocol"))


def test_a_text_of_millions_of_tokens_fits_the_header(tmp_path):
    """The header holds the token stream (base64 int32): a 32 MiB cap refused any text beyond
    6.3 M tokens, before scoring.  6.4 M tokens now make a writer, and its .part is taken up
    again by a resumed build (the reader's side of the limit)."""
    from ppldelta.hf._reference import encode_ids

    n = 6_400_000
    header = {"tokens": encode_ids(np.zeros(n, np.int32)), "window_records": [255] * (n // 512)}
    out = tmp_path / "big.ppldref"
    with R.ReferenceWriter(out, header, 24, n_windows=n // 512, resume=False):
        pass  # left unfinished: a .part to resume
    part = tmp_path / "big.ppldref.part"
    assert part.stat().st_size > R.MAX_JSON  # a header beyond the footer's limit
    with R.ReferenceWriter(out, header, 24, n_windows=n // 512, resume=True) as w:
        assert w.done == set()
