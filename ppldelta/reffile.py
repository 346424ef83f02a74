"""The reference file (``.ppldref``): the on-disk format, its streaming writer and its reader.

One job: store per-token records (:func:`ppldelta.refstats.RECORD_DTYPE`) of an original model
with their provenance, so that a quantized model can later be compared against them.  The byte
layout is documented in ``docs/reference-format.md``; in short::

    b"PPLDREF\\0" | u32 version | u32 H | header (H bytes of JSON) | zeros to a 64-byte boundary
    | records (n_records * record_size bytes) | footer (F bytes of JSON) | u64 F | b"PPLDEND\\0"

- :class:`ReferenceWriter` streams windows of records to ``OUT.part`` with an fsynced journal
  ``OUT.part.journal`` (one line per finished window: index, record count, sha256); after a kill,
  the same call resumes: every journalled window is verified by its checksum, a torn tail is cut
  off, and :attr:`ReferenceWriter.done` says which windows to skip.  ``finalize()`` writes the
  footer, fsyncs and renames to ``OUT``.  The bytes are deterministic (canonical JSON, no
  timestamps), so a resumed build equals an uninterrupted one byte for byte.  ``windows=`` writes
  a shard (the windows one rank owns); :func:`merge_shards` joins shards into the single file.
- :func:`read_reference` opens a finished file as a :class:`ReferenceFile` (validated, sizes
  checked against the file before anything is mapped or allocated; ``.records`` is a read-only
  memory map).
- :func:`check_compatible`, :func:`tokens_sha256`, :func:`vocab_sha256`: the one definition of
  the hashes in the header and the check that a comparison is against the right reference.

No pickle anywhere; every JSON part is strict (no NaN or infinities).
"""
from __future__ import annotations

import bisect
import contextlib
import datetime
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbcSet

import numpy as np

from .io import _regular_size, atomic_write

from .refstats import RECORD_DTYPE

__all__ = ["MAGIC", "END_MAGIC", "FORMAT_VERSION", "SUFFIX", "ReferenceWriter", "ReferenceFile",
           "read_reference", "merge_shards", "check_compatible", "tokens_sha256", "vocab_sha256",
           "file_sha256", "shard_path", "shard_windows", "text_labels", "groups_entry", "scored_groups"]

MAGIC = b"PPLDREF\x00"
END_MAGIC = b"PPLDEND\x00"
FORMAT_VERSION = 2
#: The versions this module reads: 1 (records without tail probes) and 2.
READ_VERSIONS = (1, 2)
SUFFIX = ".ppldref"
ALIGN = 64
MAX_K = 1 << 16
MAX_JSON = 32 << 20  # the footer: at most 32 MiB (millions of windows)
# the header: at most 1 GiB; it holds the token stream (base64 int32, 5.3 bytes a token), so this
# is about 200 M tokens (32 MiB had refused texts beyond 6.3 M tokens); a reader also checks it
# against the file's size, so a damaged length never allocates more than the file holds
MAX_HEADER = 1 << 30
_PREFIX = struct.Struct("<8sII")   # magic, version, header length
_TRAILER = struct.Struct("<Q8s")   # footer length, end magic
_RESERVED = ("k", "probes", "n_windows", "record_dtype", "record_size", "shard")
_CHUNK = 8 << 20
_JOURNAL_VERSION = 1
_fsync = os.fsync  # one indirection (the property tests run without the disk waits)


# ----------------------------------------------------------------------------- JSON

def _clean(obj, where: str):
    """``obj`` as plain JSON values (NumPy scalars and arrays converted), or a TypeError /
    ValueError naming the offending key: only str keys, finite floats."""
    if isinstance(obj, Mapping):
        out = {}
        for key, v in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"header key {key!r} at {where or 'top level'} is not a string")
            out[key] = _clean(v, f"{where}.{key}" if where else key)
        return out
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"header value {where} = {obj!r} is not finite (the header is strict JSON)")
        return float(obj)
    raise TypeError(f"header value {where} has type {type(obj).__name__}, not a JSON type")


def _canonical(obj) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8, strict (no NaN / infinities)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _no_constant(name):
    raise ValueError(f"non-finite number {name} (strict JSON)")


def _no_duplicates(pairs):
    out = {}
    for key, v in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = v
    return out


def _parse_json(data: bytes, where: str):
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant,
                          object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(f"{where}: not valid strict JSON ({msg})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


_MISSING = object()


def _first_diff(a, b, where: str = ""):
    """The dotted path of the first difference between two JSON values (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{where}.{key}" if where else key
            va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
            if va is _MISSING or vb is _MISSING:
                return sub, va, vb
            d = _first_diff(va, vb, sub)
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (va, vb) in enumerate(zip(a, b)):
            d = _first_diff(va, vb, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    if _canonical(a) == _canonical(b):
        return None
    return where or "(header)", a, b


def _describe_diff(d) -> str:
    field, va, vb = d
    sa = "absent" if va is _MISSING else _short(va)
    sb = "absent" if vb is _MISSING else _short(vb)
    return f"'{field}' is {sa} there and {sb} here"


# ----------------------------------------------------------------------------- hashes

def tokens_sha256(ids) -> str:
    """sha256 (hex) of a token sequence as int32 little-endian bytes: the one definition of the
    header's ``tokens_sha256``.  ``ids``: one sequence (list, array, tensor, BatchEncoding, shape
    (n,) or (1, n)) of integer ids in [0, 2**31)."""
    from ._adapt import as_ids

    a = np.empty(0, np.int64) if isinstance(ids, (list, tuple)) and not len(ids) else as_ids(ids)
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
        bad = int(a[(a < 0) | (a > np.iinfo(np.int32).max)][0])
        raise ValueError(f"token id {bad} is outside [0, 2**31): not a token id")
    return hashlib.sha256(a.astype("<i4").tobytes()).hexdigest()


def vocab_sha256(tokenizer) -> str:
    """sha256 (hex) of a vocabulary: the one definition of the header's ``tokenizer_sha256``.

    ``tokenizer``: an object with ``get_vocab()`` (Hugging Face tokenizers), a mapping token ->
    id, or a sequence of tokens (the id is the position).  Hashed: the UTF-8 bytes of the
    canonical JSON (no spaces, non-ASCII kept) of the sorted list of ``[token, id]`` pairs; a
    token given as bytes is written as the string ``"bytes:" + hex``.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer
    if isinstance(vocab, Mapping):
        items = list(vocab.items())
    elif isinstance(vocab, Iterable) and not isinstance(vocab, (str, bytes)):
        items = [(tok, i) for i, tok in enumerate(vocab)]
    else:
        raise TypeError(f"vocab_sha256: need a tokenizer with get_vocab(), a mapping or a sequence "
                        f"of tokens, got {type(tokenizer).__name__}")
    pairs = []
    for tok, i in items:
        if isinstance(tok, (bytes, bytearray)):
            tok = "bytes:" + bytes(tok).hex()
        elif not isinstance(tok, str):
            raise TypeError(f"vocab_sha256: token {tok!r} is neither str nor bytes")
        if isinstance(i, np.integer):
            i = int(i)
        if not _is_int(i):
            raise TypeError(f"vocab_sha256: id {i!r} of token {tok!r} is not an integer")
        pairs.append([tok, i])
    pairs.sort()
    return hashlib.sha256(_canonical(pairs)).hexdigest()


def file_sha256(path) -> str:
    """sha256 (hex) of a whole regular file, read in chunks."""
    path = os.fspath(path)
    _regular_size(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- layout helpers

def _dtype_json(k: int, probes: int = 0) -> list:
    """The record layout as JSON: ``[[name, format], ..., [name, format, [k]]]`` (NumPy descr)."""
    return [[name, fmt, list(rest[0])] if rest else [name, fmt]
            for name, fmt, *rest in RECORD_DTYPE(k, probes).descr]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _windows_spec(windows, n_windows: int):
    """(sorted window list, header spec or None): None when the subset is every window."""
    if windows is None:
        return list(range(n_windows)), None
    if isinstance(windows, range):
        ws = list(windows)
    else:
        ws = []
        for w in windows:
            if isinstance(w, np.integer):
                w = int(w)
            if not _is_int(w):
                raise TypeError(f"windows: {w!r} is not a window index")
            ws.append(w)
    ws.sort()
    for a, b in zip(ws, ws[1:]):
        if a == b:
            raise ValueError(f"windows: window {a} is listed twice")
    if ws and (ws[0] < 0 or ws[-1] >= n_windows):
        raise ValueError(f"windows: {ws[0] if ws[0] < 0 else ws[-1]} is outside [0, n_windows={n_windows})")
    if ws == list(range(n_windows)):
        return ws, None
    if not ws:
        return ws, {"start": 0, "stop": 0, "step": 1}
    step = ws[1] - ws[0] if len(ws) > 1 else 1
    if all(b - a == step for a, b in zip(ws, ws[1:])):
        return ws, {"start": ws[0], "stop": ws[-1] + 1, "step": step}
    return ws, {"windows": ws}


def _spec_windows(spec, n_windows: int, where: str) -> range | list:
    """The windows a shard spec names (validated; no list built for a range)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: 'shard' is not an object")
    if set(spec) == {"start", "stop", "step"}:
        a, b, s = spec["start"], spec["stop"], spec["step"]
        if not (_is_int(a) and _is_int(b) and _is_int(s) and s >= 1 and 0 <= a <= b <= n_windows):
            raise ValueError(f"{where}: bad shard range {_short(spec)} for n_windows={n_windows}")
        return range(a, b, s)
    if set(spec) == {"windows"} and isinstance(spec["windows"], list):
        ws = spec["windows"]
        ok = all(_is_int(w) for w in ws) and all(a < b for a, b in zip(ws, ws[1:]))
        if not ok or (ws and (ws[0] < 0 or ws[-1] >= n_windows)):
            raise ValueError(f"{where}: shard windows are not increasing indices in [0, {n_windows})")
        return ws
    raise ValueError(f"{where}: bad shard description {_short(spec)}")


def _check_header(h, where: str):
    """Validate the writer-owned fields of a parsed header: (k, dtype, n_windows, windows)."""
    if not isinstance(h, dict):
        raise ValueError(f"{where}: the header is not a JSON object")
    k = h.get("k")
    if not _is_int(k) or not 1 <= k <= MAX_K:
        raise ValueError(f"{where}: header 'k' = {_short(k)} is not an integer in [1, {MAX_K}]")
    m = h.get("probes", 0)
    if not _is_int(m) or not 0 <= m <= MAX_K:
        raise ValueError(f"{where}: header 'probes' = {_short(m)} is not an integer in [0, {MAX_K}]")
    dtype = RECORD_DTYPE(k, m)
    if h.get("record_dtype") != _dtype_json(k, m) or h.get("record_size") != dtype.itemsize:
        raise ValueError(f"{where}: record layout {_short(h.get('record_dtype'), 200)} "
                         f"(size {_short(h.get('record_size'))}) is not the one this version reads "
                         f"for K={k}, probes={m}: {_short(_dtype_json(k, m), 200)} (size {dtype.itemsize})")
    n = h.get("n_windows")
    if not _is_int(n) or n < 0:
        raise ValueError(f"{where}: header 'n_windows' = {_short(n)} is not a count")
    windows = _spec_windows(h["shard"], n, where) if "shard" in h else range(n)
    wr = h.get("window_records")
    if wr is not None and not (isinstance(wr, list) and len(wr) == n
                               and all(_is_int(c) and c >= 0 for c in wr)):
        raise ValueError(f"{where}: header 'window_records' is not a list of n_windows={n} counts")
    if h.get("groups"):  # checked on reading too, not only when a report uses them
        try:
            scored_groups(h, ())
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return k, dtype, n, windows


def shard_path(out, rank: int, world_size: int) -> str:
    """The conventional path of rank ``rank``'s shard of ``out`` (``OUT.shard-00001-of-00004``)."""
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    return f"{os.fspath(out)}.shard-{rank:05d}-of-{world_size:05d}"


def shard_windows(n_windows: int, rank: int, world_size: int) -> range:
    """The default deterministic split: rank ``r`` owns windows ``r, r + W, r + 2W, ...``."""
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    return range(rank, n_windows, world_size)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # POSIX: make creations and renames durable
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
        try:
            _fsync(fd)
        finally:
            os.close(fd)


def _lock(fd: int, path: str) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"{path}: another process is writing this reference") from None
    except OSError:  # pragma: no cover - a file system without locks
        pass


if hasattr(os, "pread"):
    _pread, _pwrite = os.pread, os.pwrite
else:  # pragma: no cover - Windows: one writer per file (locked), so seek + read is safe
    def _pread(fd: int, n: int, offset: int) -> bytes:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)

    def _pwrite(fd: int, data, offset: int) -> int:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def _read_exact(fd: int, offset: int, n: int, hashers) -> bool:
    """Feed ``n`` bytes at ``offset`` of ``fd`` to ``hashers`` in chunks; False if the file ends."""
    while n > 0:
        chunk = _pread(fd, min(n, _CHUNK), offset)
        if not chunk:
            return False
        for h in hashers:
            h.update(chunk)
        offset += len(chunk)
        n -= len(chunk)
    return True


# ----------------------------------------------------------------------------- writer

class _Done(AbcSet):
    """The set of a writer's finished windows, without copying (``i in w.done`` is O(log n))."""

    def __init__(self, writer):
        self._w = writer

    def _n(self) -> int:
        return len(self._w.windows) if self._w.complete else len(self._w._counts)

    def __contains__(self, i) -> bool:
        ws, n = self._w.windows, self._n()
        j = bisect.bisect_left(ws, i, 0, n) if isinstance(i, (int, np.integer)) else n
        return j < n and ws[j] == i

    def __iter__(self):
        return iter(self._w.windows[: self._n()])

    def __len__(self) -> int:
        return self._n()

    def __repr__(self) -> str:
        return repr(set(self))


class ReferenceWriter:
    """Stream the records of a reference to ``path``, window by window, resumably.

    ``ReferenceWriter(path, header, k, *, n_windows, windows=None, resume=True)``:
    ``header`` is the provenance (a dict of JSON values; see docs/reference-format.md for the
    recommended keys; ``window_records``, if given, is the list of every window's record count
    and is enforced); ``k`` the top-K width; ``probes`` the tail probes per record (default the
    header's ``probes``, else 0); ``n_windows`` the number of windows of the whole
    build; ``windows`` the subset this writer owns (a shard, for one rank of a sharded build;
    default all).  With ``resume=True`` an unfinished ``path + ".part"`` of the same build is
    continued (its journalled windows verified by checksum, anything after the last good one cut
    off) and a finished ``path`` with the same header is reused (``complete``); a ``.part`` of a
    different build is a ValueError naming the first differing header field.  ``resume=False``
    starts over.

    Write with ``write_window(i, records)`` for every window of the subset not in :attr:`done`,
    in increasing order (a window may have 0 records), then ``finalize()``.  Memory is O(one
    window).  Use as a context manager: leaving it without ``finalize()`` (an exception, a
    kill) keeps the ``.part`` and journal for a later resume.
    """

    def __init__(self, path, header: Mapping, k: int, *, n_windows: int, windows=None,
                 resume: bool = True, probes: int | None = None):
        self.path = os.fspath(path)
        self.part_path = self.path + ".part"
        self.journal_path = self.part_path + ".journal"
        if not _is_int(k) or not 1 <= k <= MAX_K:
            raise ValueError(f"k = {k!r} is not an integer in [1, {MAX_K}]")
        if not _is_int(n_windows) or n_windows < 0:
            raise ValueError(f"n_windows = {n_windows!r} is not a count")
        if probes is None:  # the header's, else none
            probes = header.get("probes", 0) if isinstance(header, Mapping) else 0
        if not _is_int(probes) or not 0 <= probes <= MAX_K:
            raise ValueError(f"probes = {probes!r} is not an integer in [0, {MAX_K}]")
        self.k, self.probes = k, probes
        self.dtype = RECORD_DTYPE(k, probes)
        self.n_windows = n_windows
        self.windows, spec = _windows_spec(windows, n_windows)
        if not isinstance(header, Mapping):
            raise TypeError(f"header must be a dict, got {type(header).__name__}")
        h = _clean(header, "")
        if "shard" in h:
            raise ValueError("header: 'shard' is set by the writer (pass windows=)")
        own = {"k": k, "probes": probes, "n_windows": n_windows, "record_dtype": _dtype_json(k, probes),
               "record_size": self.dtype.itemsize}
        for key, v in own.items():
            if key in h and _canonical(h[key]) != _canonical(v):
                raise ValueError(f"header: '{key}' = {_short(h[key])} disagrees with the writer's {_short(v)}")
        h.update(own)
        if spec is not None:
            h["shard"] = spec
        _check_header(h, "header")
        self._expected = h.get("window_records")
        self.header = h
        hb = _canonical(h)
        if len(hb) > MAX_HEADER:
            raise ValueError(f"header: {len(hb)} bytes of JSON, more than the {MAX_HEADER} a reader accepts")
        self.data_offset = _aligned(_PREFIX.size + len(hb))
        self._prefix = (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hb)) + hb).ljust(self.data_offset, b"\0")
        self._header_sha = hashlib.sha256(self._prefix).hexdigest()
        self._fd = None
        self._journal = None
        self._counts: list[int] = []
        self._total = hashlib.sha256()
        self._end = self.data_offset
        self.complete = False
        self.finalized = False
        try:
            if resume and os.path.exists(self.part_path):
                self._resume()
            elif resume and self._finished_copy_ok():
                self.complete = True
                with contextlib.suppress(OSError):
                    os.remove(self.journal_path)
            else:
                self._fresh()
        except BaseException:
            self.close()
            raise

    # -- state
    @property
    def done(self) -> "_Done":
        """The windows already written and verified (skip them): a read-only set, live."""
        return _Done(self)

    @property
    def next_window(self):
        """The index the next ``write_window`` must have (None when every window is written)."""
        if self.complete or len(self._counts) >= len(self.windows):
            return None
        return self.windows[len(self._counts)]

    @property
    def n_records(self) -> int:
        return sum(self._counts)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self._counts)}/{len(self.windows)} windows"
        return f"ReferenceWriter({self.path!r}, k={self.k}, {state})"

    # -- opening
    def _finished_copy_ok(self) -> bool:
        """Whether ``path`` already holds this build, finished and intact."""
        try:
            with open(self.path, "rb") as f:
                if f.read(len(self._prefix)) != self._prefix:
                    return False
            with read_reference(self.path) as ref:
                ref.verify()
                return len(ref.windows) == len(self.windows)
        except (OSError, ValueError):
            return False

    def _open_part(self, flags: int) -> None:
        fd = os.open(self.part_path, flags | getattr(os, "O_BINARY", 0), 0o666)
        try:
            _lock(fd, self.part_path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _fresh(self) -> None:
        if self._fd is None:
            self._open_part(os.O_RDWR | os.O_CREAT)
        os.ftruncate(self._fd, 0)
        self._write_all(self._prefix, 0)
        _fsync(self._fd)
        self._counts, self._total, self._end = [], hashlib.sha256(), self.data_offset
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._write_journal([], created)
        _fsync_dir(self.path)

    def _journal_head(self, created: str) -> bytes:
        return _canonical({"journal": _JOURNAL_VERSION, "header_sha256": self._header_sha,
                           "created": created}) + b"\n"

    def _write_journal(self, lines: list, created: str) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        with atomic_write(self.journal_path) as f:
            f.write(self._journal_head(created))
            for line in lines:
                f.write(line)
        self._journal = open(self.journal_path, "ab")

    def _journal_entries(self) -> int:
        """How many windows the journal beside the .part lists (whatever its header): 0 when it has
        none or cannot be read."""
        try:
            with open(self.journal_path, "rb") as f:
                lines = f.read(1 << 20).split(b"\n")
        except OSError:
            return 0
        return sum(1 for line in lines[1:] if line.strip())

    def _read_journal(self):
        """(created, [(parsed entry, raw line)]) of the journal's complete, well-formed lines."""
        try:
            size = _regular_size(self.journal_path)
            with open(self.journal_path, "rb") as f:
                data = f.read(min(size, 1 << 30))
        except (OSError, ValueError):
            return None, []
        lines = data.split(b"\n")
        lines.pop()  # the text after the last newline: empty, or a torn line
        if not lines:
            return None, []
        try:
            head = _parse_json(lines[0], "journal")
        except ValueError:
            return None, []
        if not (isinstance(head, dict) and head.get("journal") == _JOURNAL_VERSION
                and head.get("header_sha256") == self._header_sha and isinstance(head.get("created"), str)):
            return None, []
        entries = []
        for raw in lines[1:]:
            try:
                e = _parse_json(raw, "journal")
            except ValueError:
                break
            if not (isinstance(e, dict) and set(e) == {"window", "count", "sha256"}
                    and _is_int(e["window"]) and _is_int(e["count"]) and e["count"] >= 0
                    and isinstance(e["sha256"], str)):
                break
            entries.append((e, raw + b"\n"))
        return head["created"], entries

    def _resume(self) -> None:
        self._open_part(os.O_RDWR)
        if _pread(self._fd, len(self._prefix), 0) != self._prefix:
            theirs = None
            with contextlib.suppress(ValueError, struct.error):
                magic, _, hlen = _PREFIX.unpack(_pread(self._fd, _PREFIX.size, 0))
                if magic == MAGIC and hlen <= MAX_HEADER:
                    raw = _pread(self._fd, hlen, _PREFIX.size)
                    if len(raw) == hlen:
                        theirs = _parse_json(raw, self.part_path)
            d = _first_diff(theirs, self.header) if isinstance(theirs, dict) else None
            if d is not None and self._journal_entries() == 0:
                d = None  # a build that stopped before its first window (e.g. on a bad setting): nothing to keep
            if d is not None:
                self.close()
                raise ValueError(
                    f"{self.part_path}: this unfinished build was started with a different header: "
                    f"{_describe_diff(d)}; pass resume=False (or delete {self.part_path} and its "
                    f"journal) to start over")
            self._fresh()  # a torn header (killed while creating the file): nothing to keep
            return
        created, entries = self._read_journal()
        if created is None:  # no usable journal: nothing is verified, start over
            self._fresh()
            return
        R = self.dtype.itemsize
        good: list = []
        for e, raw in entries:
            j = len(good)
            if j >= len(self.windows) or e["window"] != self.windows[j]:
                break
            if self._expected is not None and e["count"] != self._expected[e["window"]]:
                break
            wh, total = hashlib.sha256(), self._total.copy()
            if not _read_exact(self._fd, self._end, e["count"] * R, (wh, total)):
                break
            if wh.hexdigest() != e["sha256"]:
                break
            good.append(raw)
            self._counts.append(e["count"])
            self._total = total
            self._end += e["count"] * R
        os.ftruncate(self._fd, self._end)  # cut off a torn or unverified tail
        _fsync(self._fd)
        self._write_journal(good, created)

    # -- writing
    def write_window(self, i: int, records) -> None:
        """Append window ``i``'s records (a 1-D RECORD_DTYPE(k) array, possibly empty).

        ``i`` must be the next window of this writer's subset (``next_window``)."""
        if self.complete:
            raise ValueError(f"{self.path}: already complete; window {i} is in .done")
        if self.finalized or self._fd is None:
            raise ValueError(f"{self.path}: the writer is {'finalized' if self.finalized else 'closed'}")
        if isinstance(i, np.integer):
            i = int(i)
        nxt = self.next_window
        if i != nxt:
            if i in self.done:
                raise ValueError(f"window {i} is already written (see .done)")
            raise ValueError(f"window {i} written out of order: the next window is {nxt}"
                             if nxt is not None else f"window {i}: every window is already written")
        a = np.asarray(records)
        if a.dtype != self.dtype:
            if a.dtype.names != self.dtype.names or not np.can_cast(a.dtype, self.dtype, "equiv"):
                raise TypeError(f"window {i}: records must have dtype RECORD_DTYPE({self.k}), got {a.dtype}")
            a = a.astype(self.dtype)
        if a.ndim != 1:
            raise ValueError(f"window {i}: records must be 1-D, got shape {a.shape}")
        n = int(a.shape[0])
        if self._expected is not None and n != self._expected[i]:
            raise ValueError(f"window {i}: {n} records, the header's window_records says {self._expected[i]}")
        data = np.ascontiguousarray(a).view(np.uint8).reshape(-1) if n else b""
        wh = hashlib.sha256(data)
        self._write_all(data, self._end)
        _fsync(self._fd)
        line = _canonical({"window": i, "count": n, "sha256": wh.hexdigest()}) + b"\n"
        self._journal.write(line)
        self._journal.flush()
        _fsync(self._journal.fileno())
        self._total.update(data)
        self._counts.append(n)
        self._end += len(data)

    def _write_all(self, data, offset: int) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += _pwrite(self._fd, mv[done:], offset + done)

    def finalize(self) -> str:
        """Write the footer, fsync, rename ``.part`` to the final path, remove the journal."""
        if self.complete or self.finalized:
            return self.path
        if self._fd is None:
            raise ValueError(f"{self.path}: the writer is closed")
        missing = len(self.windows) - len(self._counts)
        if missing:
            raise ValueError(f"{self.path}: {missing} window(s) not written yet (next: window "
                             f"{self.next_window}); write them before finalize()")
        footer = _canonical({"n_records": sum(self._counts), "records_sha256": self._total.hexdigest(),
                             "window_counts": self._counts})
        tail = footer + _TRAILER.pack(len(footer), END_MAGIC)
        os.ftruncate(self._fd, self._end)
        self._write_all(tail, self._end)
        _fsync(self._fd)
        os.replace(self.part_path, self.path)
        _fsync_dir(self.path)
        self.close()
        with contextlib.suppress(OSError):
            os.remove(self.journal_path)
        self.finalized = True
        return self.path

    def close(self) -> None:
        """Release the files (an unfinished build stays resumable)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- reader

class ReferenceFile:
    """A finished reference file, validated and memory-mapped (see :func:`read_reference`).

    Attributes: ``path``; ``header`` (the JSON header: provenance plus ``k``, ``n_windows``,
    ``record_dtype``, ``record_size``, and ``shard`` for a shard); ``k``; ``dtype``
    (``RECORD_DTYPE(k)``); ``n_records``; ``n_windows`` (windows of the whole build);
    ``windows`` (int64 indices of the windows this file holds: all of them unless a shard);
    ``window_counts``; ``window_offsets`` (int64, ``len(windows) + 1``: window ``windows[j]``
    is ``records[window_offsets[j]:window_offsets[j+1]]``); ``records`` (read-only memory map
    of the structured array); ``records_sha256``; ``data_offset``.
    """

    def __init__(self, path):
        self.path = p = os.fspath(path)
        size = _regular_size(p)
        if size < _PREFIX.size:
            raise ValueError(f"{p}: {size} bytes, too short to be a ppldelta reference file")
        with open(p, "rb") as f:
            magic, version, hlen = _PREFIX.unpack(_read_n(f, _PREFIX.size, p))
            if magic != MAGIC:
                raise ValueError(f"{p}: not a ppldelta reference file (magic {magic!r}, expected {MAGIC!r})")
            if version not in READ_VERSIONS:
                raise ValueError(f"{p}: reference format version {version}; this version of ppldelta "
                                 f"reads versions {', '.join(map(str, READ_VERSIONS))}")
            data_offset = _aligned(_PREFIX.size + hlen)
            if hlen > MAX_HEADER or data_offset > size:
                raise ValueError(f"{p}: header length {hlen} is more than the file's {size} bytes "
                                 f"(or the {MAX_HEADER}-byte limit) allow: truncated or damaged")
            hb = f.read(hlen)
            header = _parse_json(hb, f"{p}: header")
            k, dtype, n_windows, windows = _check_header(header, f"{p}: header")
            if (version == 1) != ("probes" not in header):
                raise ValueError(f"{p}: a version {version} file "
                                 + ("with" if version == 1 else "without") + " a 'probes' field: damaged")
            if f.read(data_offset - _PREFIX.size - hlen).strip(b"\0"):
                raise ValueError(f"{p}: nonzero bytes in the header's padding: damaged")
            if size < data_offset + _TRAILER.size:
                raise ValueError(self._unfinished(p, "no footer"))
            f.seek(size - _TRAILER.size)
            flen, end = _TRAILER.unpack(_read_n(f, _TRAILER.size, p))
            if end != END_MAGIC:
                raise ValueError(self._unfinished(p, "no footer"))
            if flen > MAX_JSON or data_offset + flen + _TRAILER.size > size:
                raise ValueError(f"{p}: footer length {flen} is more than the file holds: damaged")
            region = size - _TRAILER.size - flen - data_offset
            f.seek(data_offset + region)
            footer = _parse_json(f.read(flen), f"{p}: footer")
        R = dtype.itemsize
        if not (isinstance(footer, dict) and set(footer) == {"n_records", "records_sha256", "window_counts"}):
            raise ValueError(f"{p}: the footer does not have exactly n_records, records_sha256, window_counts")
        n, counts, sha = footer["n_records"], footer["window_counts"], footer["records_sha256"]
        if not _is_int(n) or n < 0 or n * R != region:
            raise ValueError(f"{p}: the footer's n_records = {_short(n)} x {R} bytes does not fill the "
                             f"{region}-byte records region: damaged or truncated")
        if not (isinstance(counts, list) and len(counts) == len(windows)
                and all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == n):
            raise ValueError(f"{p}: the footer's window_counts are not {len(windows)} counts summing to "
                             f"n_records = {n}")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"{p}: the footer's records_sha256 is not a sha256 hex digest")
        wr = header.get("window_records")
        if wr is not None and any(wr[w] != c for w, c in zip(windows, counts)):
            raise ValueError(f"{p}: the footer's window_counts disagree with the header's window_records")
        self.header = header
        self.k, self.dtype, self.n_windows = k, dtype, n_windows
        self.probes, self.version = header.get("probes", 0), version
        self.windows = np.asarray(windows, dtype=np.int64).reshape(-1)
        self.window_counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        self.window_offsets = np.concatenate([[0], np.cumsum(self.window_counts, dtype=np.int64)])
        self.n_records, self.records_sha256, self.data_offset = n, sha, data_offset
        if n:
            self.records = np.memmap(p, dtype=dtype, mode="r", offset=data_offset, shape=(n,))
        else:
            self.records = np.empty(0, dtype=dtype)
            self.records.flags.writeable = False

    @staticmethod
    def _unfinished(p: str, why: str) -> str:
        hint = (" (a build journal is beside it)" if os.path.exists(p + ".journal")
                or os.path.exists(p + ".part.journal") else "")
        return (f"{p}: unfinished reference file ({why}){hint}: an interrupted build; run the same "
                f"build again (the same command or call) to resume it, or the file is damaged")

    @property
    def is_shard(self) -> bool:
        return "shard" in self.header

    def window(self, i: int) -> np.ndarray:
        """The records of window ``i`` (a global window index held by this file)."""
        j = int(np.searchsorted(self.windows, i))
        if j >= self.windows.size or self.windows[j] != i:
            raise KeyError(f"window {i} is not in {self.path}")
        return self.records[self.window_offsets[j]: self.window_offsets[j + 1]]

    def verify(self) -> None:
        """Check the records against the footer's sha256; ValueError if they differ."""
        if self.records is None:
            raise ValueError(f"{self.path}: closed")
        h = hashlib.sha256()
        flat = self.records.view(np.uint8).reshape(-1) if self.n_records else np.empty(0, np.uint8)
        for s in range(0, flat.size, _CHUNK):
            h.update(flat[s: s + _CHUNK])
        if h.hexdigest() != self.records_sha256:
            raise ValueError(f"{self.path}: the records do not match the footer's sha256: the file is "
                             f"damaged; rebuild it")

    def close(self) -> None:
        """Drop this object's memory map (arrays taken from it keep theirs)."""
        self.records = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.n_records

    def __repr__(self) -> str:
        shard = f", shard of {self.windows.size} windows" if self.is_shard else ""
        return (f"ReferenceFile({self.path!r}, k={self.k}, n_records={self.n_records}, "
                f"n_windows={self.n_windows}{shard})")


def _read_n(f, n: int, p: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{p}: the file shrank while it was read")
    return data


def read_reference(path) -> ReferenceFile:
    """Open a finished reference file (validated; records memory-mapped read-only).

    Every problem is a ValueError naming the file: wrong magic or version, a header or footer
    that is not strict JSON or disagrees with the sizes (checked against the file size before
    anything is read into memory or mapped), a record layout other than ``RECORD_DTYPE(k)``, or
    an unfinished file (no footer: resume the build).  The checksum is checked by ``.verify()``.
    """
    return ReferenceFile(path)


# ----------------------------------------------------------------------------- shards

def merge_shards(paths, out) -> str:
    """Join the shards of one build (each verified) into the single file a one-process build
    writes, byte for byte; ValueError if they are of different builds, overlap or leave a
    window out.  Memory is O(one window)."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("merge_shards: no shards given")
    refs = []
    try:
        for p in paths:
            r = read_reference(p)
            refs.append(r)
            r.verify()
        base = {key: v for key, v in refs[0].header.items() if key != "shard"}
        for p, r in zip(paths[1:], refs[1:]):
            d = _first_diff({key: v for key, v in r.header.items() if key != "shard"}, base)
            if d is not None:
                raise ValueError(f"merge_shards: {p} is from another build than {paths[0]}: "
                                 f"{_describe_diff(d)}")
        n = refs[0].n_windows
        owner = np.full(n, -1, dtype=np.int64)
        for j, r in enumerate(refs):
            taken = owner[r.windows] >= 0
            if taken.any():
                w = int(r.windows[taken][0])
                raise ValueError(f"merge_shards: window {w} is in both {paths[owner[w]]} and {paths[j]}")
            owner[r.windows] = j
        if (owner < 0).any():
            miss = np.flatnonzero(owner < 0)
            raise ValueError(f"merge_shards: {miss.size} window(s) in no shard (first: {miss[:5].tolist()})")
        provenance = {key: v for key, v in base.items() if key not in _RESERVED}
        with ReferenceWriter(out, provenance, refs[0].k, n_windows=n, resume=False,
                             probes=refs[0].probes) as w:
            for i in range(n):
                w.write_window(i, refs[owner[i]].window(i))
            return w.finalize()
    finally:
        for r in refs:
            r.close()


# ----------------------------------------------------------------------------- compatibility

def check_compatible(header, *, tokenizer_sha256=None, tokens_sha256=None, protocol=None) -> None:
    """Refuse (ValueError naming each mismatch) to compare against a reference built from another
    tokenizer, other tokens or another protocol.  ``header``: a reference's header dict or a
    :class:`ReferenceFile`.  ``protocol``: a name (compared with the header's protocol name) or a
    dict (compared field by field with the header's ``protocol``).  Arguments left None are not
    checked; a requested check the header cannot answer is a mismatch too."""
    if hasattr(header, "header"):
        header = header.header
    problems = []

    def _hash(key, mine, what, verb, fix, built=""):
        theirs = header.get(key)
        if theirs is None:
            problems.append(f"the reference records no {key}, so {what} cannot be checked")
        elif theirs != mine:
            h = lambda v: v[:12] + "..." if isinstance(v, str) else _short(v, 16)  # noqa: E731
            problems.append(f"{what} {verb} from the reference's{built} ({key} {h(theirs)} there, "
                            f"{h(mine)} here): {fix}")

    if tokenizer_sha256 is not None:
        name = header.get("tokenizer")
        _hash("tokenizer_sha256", tokenizer_sha256, "the tokenizer's vocabulary", "differs",
              "compare only models that share the reference's tokenizer",
              f" (built with {_short(name, 40)})" if name else "")
    if tokens_sha256 is not None and not problems:  # another tokenizer's tokens differ anyway
        _hash("tokens_sha256", tokens_sha256, "the evaluated tokens", "differ",
              "use the text, tokenizer settings and protocol the reference was built with")
    if protocol is not None:
        theirs = header.get("protocol")
        if theirs is None:
            problems.append("the reference records no protocol, so the protocol cannot be checked")
        elif isinstance(protocol, str):
            name = theirs.get("name") if isinstance(theirs, dict) else theirs
            if name != protocol:
                problems.append(f"protocol {protocol!r} here, {_short(name)} in the reference")
        else:
            mine = _clean(protocol, "protocol")
            if not isinstance(theirs, dict):
                theirs = {"name": theirs}
            d = _first_diff(theirs, mine, "protocol")
            if d is not None:
                problems.append(f"protocol mismatch: {_describe_diff(d)} (there = the reference)")
    if problems:
        raise ValueError("not comparable with this reference: " + "; ".join(problems))


def text_labels(groups, n_texts: int) -> tuple[list, list]:
    """(group names in order of first appearance, each text's index into them) of ``groups``: one
    label per text (str() of each; texts may share a label).  A count that differs is a ValueError."""
    labels = [str(g) for g in groups]
    if len(labels) != n_texts:
        raise ValueError(f"groups has {len(labels)} labels for {n_texts} texts (one label per text)")
    names = list(dict.fromkeys(labels))
    return names, [names.index(g) for g in labels]


def groups_entry(names, token_groups) -> dict:
    """The header's ``groups`` entry: the group names and, over the token stream, the runs of
    tokens of one group as [first token index, index into names] (token_groups: one index per
    token, e.g. the group of the text each token comes from)."""
    g = np.asarray(token_groups, dtype=np.int64).reshape(-1)
    if g.size and (g.min() < 0 or g.max() >= len(names)):
        raise ValueError(f"token group indices must be in [0, {len(names)})")
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if g.size else np.zeros(0, np.int64)
    return {"names": [str(x) for x in names], "runs": [[int(s), int(g[s])] for s in starts]}


def scored_groups(header, positions):
    """The group name of each scored token (the group of the token at each of ``positions``, the
    targets' indices in the token stream) from the header's ``groups`` entry, as a NumPy array of
    str; None when the reference records no groups.  A malformed entry is a ValueError."""
    if hasattr(header, "header"):
        header = header.header
    entry = header.get("groups")
    if not entry:
        return None
    try:
        names = [str(x) for x in entry["names"]]
        runs = np.asarray(entry["runs"], dtype=np.int64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError):
        raise ValueError("the reference's groups entry is malformed (it needs names and runs)") from None
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    if (not runs.size or runs[0, 0] != 0 or np.any(np.diff(runs[:, 0]) <= 0)
            or runs[:, 1].min() < 0 or runs[:, 1].max() >= len(names)):
        raise ValueError("the reference's groups entry is malformed (runs must start at token 0, "
                         "ascend, and name a group)")
    return np.asarray(names)[runs[np.searchsorted(runs[:, 0], pos, side="right") - 1, 1]]


def read_header(path):
    """The header of the reference ``path``, finished or still ``path.part``; None when there is
    neither or it cannot be read (a producer's way to reuse what a killed build computed)."""
    for p in (os.fspath(path), os.fspath(path) + ".part"):
        try:
            with open(p, "rb") as f:
                magic, version, hlen = _PREFIX.unpack(f.read(_PREFIX.size))
                if magic != MAGIC or version not in READ_VERSIONS or hlen > MAX_HEADER:
                    continue
                return _parse_json(f.read(hlen), f"{p}: header")
        except (OSError, struct.error, ValueError):
            continue
    return None
