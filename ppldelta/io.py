"""Read per-token log-probabilities (or labels) from the files evaluation pipelines write.

Supported: .npy, .npz, .pt/.pth (a tensor, or a dict of them), .safetensors, .json (a list,
or a dict with a ``log_probs`` list), .jsonl (one number, list or object per line), and plain
text (one number per line; blank lines and ``#`` comments skipped). In a file holding several
arrays, name one as ``file.npz:key`` (also ``.pt``, ``.pth``, ``.safetensors``); without a key
the only array is read, or the one array named like log-probs (``log_probs``, ``logprobs``,
``lp``, ...); anything else is ambiguous and refused.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import secrets
import stat
import warnings

import numpy as np

_KEYS = ("log_probs", "logprobs", "log_prob", "logprob", "lp", "token_logprobs", "values")
_ARCHIVES = (".npz", ".pt", ".pth", ".safetensors")
# deflate cannot expand data more than about 1032:1; a larger claimed ratio is a lie
_DEFLATE_MAX_RATIO = 1100


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), with the lines after it
    joined on where it ends in a colon (a message that goes on to say what it is about)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(exc).__name__
    for ln in lines[1:]:
        if not msg.endswith(":") or len(msg) > 300:
            break
        msg += " " + ln
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _split_key(path: str):
    base, sep, key = path.rpartition(":")
    if sep and os.path.splitext(base)[1].lower() in _ARCHIVES and not os.path.exists(path):
        return base, key
    return path, None


def _regular_size(path: str) -> int:
    """The size of ``path``, which must be a regular file: a device or pipe may never end."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a device, pipe or directory); "
                         "ppldelta reads only regular files, whose size bounds what is read")
    return st.st_size


def _read_bytes(path: str) -> bytes:
    size = _regular_size(path)
    with open(path, "rb") as f:
        data = f.read(size + 1)
    if len(data) > size:
        raise ValueError(f"{path}: the file grew while it was read")
    return data


def _choose(names, key, path):
    """The array to read: ``key`` if given, else the only one, else the one named like log-probs."""
    names = list(names)
    if key is not None:
        if key not in names:
            raise ValueError(f"{path}: no array {key!r} (have {sorted(names)[:10]})")
        return key
    if len(names) == 1:
        return names[0]
    if not names:
        raise ValueError(f"{path}: no arrays")
    hits = [k for k in _KEYS if k in names]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"{path}: {len(names)} arrays ({', '.join(sorted(names)[:10])}), which one? "
                     f"name it as {path}:KEY")


def _from_json_obj(obj, path):
    if isinstance(obj, dict):
        for k in _KEYS:
            if k in obj:
                return obj[k]
        raise ValueError(f"{path}: JSON object without one of {_KEYS}")
    return obj


def _read_npz(path, key):
    """One member of an .npz, its header checked against the member's size before allocating."""
    import zipfile

    fmt = np.lib.format
    _regular_size(path)
    with zipfile.ZipFile(path) as z:
        members = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
        name = _choose(members, key, path)
        info = z.getinfo(members[name])
        where = f"{path}:{name}"
        if info.compress_type == zipfile.ZIP_STORED:
            ok = info.file_size == info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            ok = info.file_size <= _DEFLATE_MAX_RATIO * info.compress_size + 1024
        else:
            raise ValueError(f"{where}: zip compression method {info.compress_type} is not read "
                             "(numpy writes stored or deflated members)")
        if not ok:
            raise ValueError(f"{where}: claims {info.file_size} bytes, more than its "
                             f"{info.compress_size} stored bytes can hold")
        with z.open(info) as f:
            version = fmt.read_magic(f)
            read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{where}: unsupported .npy format version {version}")
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{where}: object arrays are not read (they would need pickle)")
            nbytes = math.prod(shape) * dtype.itemsize
            have = info.file_size - f.tell()
            if nbytes != have:
                raise ValueError(f"{where}: the header claims {math.prod(shape)} values of {dtype} "
                                 f"({nbytes} bytes), the member holds {have} bytes")
            data = f.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{where}: truncated ({len(data)} of {nbytes} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read_pt(path, key):
    import torch

    _regular_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except pickle.UnpicklingError as exc:
        why = str(exc).partition("WeightsUnpickler error:")[2].strip() or str(exc)
        raise ValueError(f"{path}: not plain tensor data; torch.load(weights_only=True) refused it "
                         f"without running any pickled code: {_one_line(why).split('. ')[0]}") from None
    if isinstance(obj, dict):
        named = {str(k): v for k, v in obj.items()}
        obj = named[_choose(named, key, path)]
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float64, torch.float32, torch.float16):
            t = t.double()  # bfloat16, float8: exact in float64
        return t.numpy()  # float64 stays float64
    return np.asarray(obj)


def _read_safetensors(path, key):
    from safetensors import safe_open

    _regular_size(path)
    with safe_open(path, framework="numpy") as f:
        return f.get_tensor(_choose(f.keys(), key, path))


def _json_numbers(vals, path, dtype):
    """JSON values as an array of dtype: numbers only (strings such as "-1.5" and nulls were cast,
    where every other entry point refuses them)."""
    if np.dtype(dtype).kind not in "iuf":  # labels (object): as they are
        return np.asarray(vals, dtype=dtype)
    try:
        a = np.asarray(vals)
    except ValueError as exc:  # ragged nesting
        raise ValueError(f"{path}: not an array of numbers ({exc})") from None
    if a.dtype.kind not in "biuf" and a.size:
        bad = next((v for v in a.reshape(-1).tolist() if not isinstance(v, (int, float)) or isinstance(v, bool)),
                   a.reshape(-1)[0])
        raise ValueError(f"{path}: holds {'null' if bad is None else type(bad).__name__} values such as "
                         f"{bad!r}, not numbers")
    return a.astype(dtype)


def _read_json(path, data, dtype):
    try:
        obj = json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    return _json_numbers(_from_json_obj(obj, path), path, dtype)


def _read_jsonl(path, data, dtype):
    vals = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            v = _from_json_obj(json.loads(line), f"{path}:{i}")
        except RecursionError:
            raise ValueError(f"{path}:{i}: JSON nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON ({exc})") from None
        vals.extend(v if isinstance(v, list) else [v])
    return _json_numbers(vals, path, dtype)


def _read_text(path, data, dtype):
    vals = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                vals.append(float(line))
            except ValueError:
                raise ValueError(f"{path}:{i}: not a number: {line[:40]!r}") from None
    return np.asarray(vals, dtype=dtype)


def read_values(path: str, dtype=np.float64) -> np.ndarray:
    """Read a 1-D array of values from any supported file (see the module docstring).

    Only regular files are read (never devices or pipes), and never more than their size.
    Anything wrong with the file raises ValueError (OSError when it cannot be opened) with
    one line naming the file; .pt files are loaded with ``weights_only=True``, so no pickled
    code ever runs.
    """
    path, key = _split_key(os.fspath(path))
    ext = os.path.splitext(path)[1].lower()
    kind = ext.lstrip(".") or "text"
    try:
        if ext == ".npy":
            _regular_size(path)
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif ext == ".npz":
            arr = _read_npz(path, key)
        elif ext in (".pt", ".pth"):
            arr = _read_pt(path, key)
        elif ext == ".safetensors":
            arr = _read_safetensors(path, key)
        else:
            reader = {".json": _read_json, ".jsonl": _read_jsonl}.get(ext, _read_text)
            arr = reader(path, _read_bytes(path), dtype)
        return np.asarray(arr).reshape(-1)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise ValueError(f"{path}: cannot read as {kind}: {_one_line(exc)}") from None
    except ValueError as exc:
        if str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: cannot read as {kind}: {_one_line(exc)}") from None
    except Exception as exc:  # pickle, zip, torch, safetensors, overflow errors: all bad input
        raise ValueError(f"{path}: cannot read as {kind}: {type(exc).__name__}: {_one_line(exc)}") from None


@contextlib.contextmanager
def atomic_write(path):
    """Open ``path`` for writing ("wb") so that it only ever holds a complete file.

    The data go to a new temporary file beside ``path`` (created with the usual permissions),
    are fsync'ed, and the temporary file is renamed over ``path``; on any exception it is
    removed and ``path`` is left as it was. A reader that has the old file memory-mapped keeps
    reading the old contents.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable too (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _finite_json(obj, path, nonfinite):
    if isinstance(obj, dict):
        return {str(k): _finite_json(v, f"{path}.{k}" if path else str(k), nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        items = obj.tolist() if isinstance(obj, np.ndarray) else obj
        return [_finite_json(v, f"{path}.{i}" if path else str(i), nonfinite) for i, v in enumerate(items)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        nonfinite[path] = repr(obj)
        return None
    return obj


def to_json(obj, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259) for reports: every JSON writer of the package goes through here.

    NaN and infinities, which strict parsers reject, become ``null``; when ``obj`` is a dict,
    a top-level ``"nonfinite"`` object maps the dotted path of each such value to its
    ``repr`` (``"inf"``, ``"-inf"``, ``"nan"``), e.g. ``{"reference.quantized_perplexity":
    "inf"}``; it is present only when something was non-finite. NumPy scalars and arrays are
    converted to plain numbers and lists.
    """
    nonfinite: dict = {}
    out = _finite_json(obj, "", nonfinite)
    if nonfinite and isinstance(out, dict):
        if "nonfinite" in out:
            raise ValueError("to_json: the object already has a 'nonfinite' key")
        out["nonfinite"] = nonfinite
    return json.dumps(out, indent=indent, allow_nan=False)


def read_labels(path: str) -> np.ndarray:
    """Group labels, one per token: any format above, or text with one label per line."""
    p, _ = _split_key(os.fspath(path))
    ext = os.path.splitext(p)[1].lower()
    if ext in (".npy", ".npz", ".pt", ".pth", ".safetensors", ".json", ".jsonl"):
        return read_values(path, dtype=object)
    try:
        text = _read_bytes(p).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: cannot read as text: {_one_line(exc)}") from None
    return np.asarray([ln.strip() for ln in text.splitlines() if ln.strip()])
