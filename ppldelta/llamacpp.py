"""llama.cpp ``--kl-divergence-base`` logits files.

``llama-perplexity -f text --kl-divergence-base FILE`` (the ``perplexity()``
function of llama.cpp's ``tools/perplexity/perplexity.cpp``) stores the
base model's next-token distributions so that a quantized model can later be
compared with ``--kl-divergence``.  The file has no version field and is
written in the machine's native byte order (little-endian in practice)::

    char     magic[8]  = "_logits_"
    int32    n_ctx
    int32    n_vocab
    int32    n_chunk
    int32    tokens[n_chunk * n_ctx]      # the tokenized text, chunk after chunk
    uint16   rows[n_chunk][n_ctx - 1 - n_ctx/2][nv]   # nv = 2*((n_vocab+1)/2) + 4

Chunks are consecutive, non-overlapping windows of ``n_ctx`` tokens.  Each is
evaluated from an empty KV cache with its first token replaced by BOS when the
vocabulary adds one; the replacement is temporary, so ``tokens`` holds the
original text tokens.  Only the second half of a chunk is scored: row ``r``
holds the distribution at position ``j = n_ctx/2 + r`` (``j`` runs from
``n_ctx/2`` to ``n_ctx - 2``), which predicts ``tokens[chunk, j + 1]``.

A row starts with two float32 (four uint16 slots): ``scale = (max - min) /
65535`` and ``min_log_prob = min - max - logsumexp(logits - max)``, where
``min`` is the smallest logit clamped to ``>= max - 16``.  Then come
``n_vocab`` values ``q_i = round((logit_i - min) / scale)`` (``0`` for logits
at or below ``min``) and one zero pad slot when ``n_vocab`` is odd.  A log
probability decodes as ``scale * q_i + min_log_prob``; the decode error is at
most ``scale / 2`` above the floor, and everything at or below the floor
decodes to ``min_log_prob`` (``<= -16`` whenever the logits span 16 nats).

Every function here works chunk by chunk on a memory map, so files of tens of
gigabytes are never loaded whole.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator

import numpy as np

from .io import atomic_write

__all__ = [
    "LogitsFile",
    "is_logits_file",
    "read_logits_file",
    "write_logits_file",
    "compare_logits_files",
    "token_log_probs",
]

MAGIC = b"_logits_"
_HEADER = np.dtype([("magic", "S8"), ("n_ctx", "=i4"), ("n_vocab", "=i4"), ("n_chunk", "=i4")])
#: Base log-probabilities at or below this are left out of llama.cpp's KLD sum.
KLD_FLOOR = -16.0
#: Logits more than this below the maximum are clamped to the floor code 0.
LOGIT_RANGE = 16.0
# Work on at most this many float values at a time when decoding rows.
_BLOCK_VALUES = 1 << 22
# Open LogitsFile objects: their files are memory-mapped and must not be overwritten.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _row_width(n_vocab: int) -> int:
    """uint16 values per stored row (llama.cpp's ``nv``)."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _first_scored(n_ctx: int) -> int:
    return n_ctx // 2


def _rows_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - _first_scored(n_ctx)


def _decode_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Decode stored uint16 rows ``(r, nv)`` to float32 log-probs ``(r, n_vocab)``.

    In place in the result: no temporary as large as the result is ever allocated.
    """
    params = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    out = np.empty((rows.shape[0], n_vocab), dtype=np.float32)
    np.copyto(out, rows[:, 4 : 4 + n_vocab], casting="safe")
    out *= params[:, :1]
    out += params[:, 1:2]
    return out


def _encode_rows(logits: np.ndarray) -> np.ndarray:
    """Quantize float logits ``(r, n_vocab)`` exactly as llama.cpp's ``log_softmax``.

    The arithmetic is float32 like the C++ code, with the log-sum-exp
    accumulated in float64; rounding is to nearest even (``nearest_int``).
    """
    x = np.asarray(logits, dtype=np.float32)
    r, n_vocab = x.shape
    hi = x.max(axis=1)
    lo = np.maximum(x.min(axis=1), hi - np.float32(LOGIT_RANGE))
    sum_exp = np.exp(x - hi[:, None]).sum(axis=1, dtype=np.float64)
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    min_log_prob = (lo - hi) - log_sum_exp
    scale = (hi - lo) / np.float32(65535)
    out = np.zeros((r, _row_width(n_vocab)), dtype=np.uint16)
    out[:, :4] = np.stack([scale, min_log_prob], axis=1).view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint((x - lo[:, None]) * (np.float32(1) / scale)[:, None])
    q = np.where((x > lo[:, None]) & (scale[:, None] > 0), q, 0)
    out[:, 4 : 4 + n_vocab] = np.clip(q, 0, 65535)
    return out


def _row_blocks(n_rows: int, n_vocab: int) -> Iterator[slice]:
    step = max(1, _BLOCK_VALUES // max(n_vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class LogitsFile:
    """A memory-mapped llama.cpp logits file (see the module docstring).

    Attributes:
        path: the file.
        n_ctx, n_vocab, n_chunk: header values.
        tokens: int32 ``(n_chunk, n_ctx)`` memory map of the evaluated tokens
            (original text tokens: llama.cpp's BOS substitution is not stored).
        first_scored: ``n_ctx // 2``, the first scored position of a chunk.
        rows_per_chunk: ``n_ctx - 1 - n_ctx // 2`` scored positions per chunk.
        n_scored: ``n_chunk * rows_per_chunk``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        if size < _HEADER.itemsize:
            raise ValueError(
                f"{self.path}: truncated llama.cpp logits file: expected at least "
                f"{_HEADER.itemsize} header bytes, got {size}"
            )
        header = np.fromfile(self.path, dtype=_HEADER, count=1)[0]
        if header["magic"] != MAGIC:
            raise ValueError(
                f"{self.path}: not a llama.cpp logits file (magic {bytes(header['magic'])!r}, "
                f"expected {MAGIC!r})"
            )
        self.n_ctx, self.n_vocab, self.n_chunk = (
            int(header["n_ctx"]), int(header["n_vocab"]), int(header["n_chunk"]))
        if self.n_ctx < 2 or self.n_vocab < 1 or self.n_chunk < 0:
            raise ValueError(
                f"{self.path}: inconsistent header: n_ctx={self.n_ctx}, "
                f"n_vocab={self.n_vocab}, n_chunk={self.n_chunk}"
            )
        self.first_scored = _first_scored(self.n_ctx)
        self.rows_per_chunk = _rows_per_chunk(self.n_ctx)
        self.n_scored = self.n_chunk * self.rows_per_chunk
        self._nv = _row_width(self.n_vocab)
        tokens_offset = _HEADER.itemsize
        rows_offset = tokens_offset + 4 * self.n_chunk * self.n_ctx
        expected = rows_offset + 2 * self.n_scored * self._nv
        if size != expected:
            kind = "truncated" if size < expected else "inconsistent sizes in"
            raise ValueError(
                f"{self.path}: {kind} llama.cpp logits file: header n_ctx={self.n_ctx}, "
                f"n_vocab={self.n_vocab}, n_chunk={self.n_chunk} implies {expected} bytes, "
                f"the file has {size}"
            )
        self.tokens = np.memmap(self.path, dtype="=i4", mode="r", offset=tokens_offset,
                                shape=(self.n_chunk, self.n_ctx))
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= self.n_vocab):
            chunk, pos = np.argwhere((self.tokens < 0) | (self.tokens >= self.n_vocab))[0]
            raise ValueError(
                f"{self.path}: token id {int(self.tokens[chunk, pos])} at chunk {chunk}, position "
                f"{pos} is outside [0, n_vocab={self.n_vocab})"
            )
        self._rows = np.memmap(self.path, dtype="=u2", mode="r", offset=rows_offset,
                               shape=(self.n_chunk, self.rows_per_chunk, self._nv))
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        _OPEN.add(self)

    def close(self) -> None:
        """Drop this object's memory maps (arrays taken from it keep theirs)."""
        self.tokens = self._rows = None
        _OPEN.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"LogitsFile({self.path!r}, n_ctx={self.n_ctx}, n_vocab={self.n_vocab}, "
                f"n_chunk={self.n_chunk})")

    def chunk_log_probs(self, i: int) -> np.ndarray:
        """Decoded log-probs of chunk ``i``: float32 ``(rows_per_chunk, n_vocab)``.

        Row ``r`` is the distribution at position ``first_scored + r``, which
        predicts ``tokens[i, first_scored + r + 1]``.
        """
        if not -self.n_chunk <= i < self.n_chunk:
            raise IndexError(f"chunk {i} out of range for {self.n_chunk} chunks")
        return _decode_rows(self._rows[i], self.n_vocab)

    def iter_chunks(self) -> Iterator[np.ndarray]:
        """Yield :meth:`chunk_log_probs` for every chunk in order."""
        for i in range(self.n_chunk):
            yield self.chunk_log_probs(i)

    def scored_targets(self) -> np.ndarray:
        """int32 ``(n_scored,)``: the token each scored row predicts, chunk-major."""
        return np.ascontiguousarray(self.tokens[:, self.first_scored + 1 :]).reshape(-1)

    def target_log_probs(self) -> np.ndarray:
        """float64 ``(n_scored,)``: decoded log p(actual next token) per scored row.

        Only the two row parameters and the target's code are read from each
        row, so memory stays O(n_scored).  This is llama.cpp's ``-nll_base``.
        """
        out = np.empty(self.n_scored, dtype=np.float64)
        for i in range(self.n_chunk):
            rows = self._rows[i]
            targets = self.tokens[i, self.first_scored + 1 :]
            params = np.ascontiguousarray(rows[:, :4]).view(np.float32)
            q = rows[np.arange(self.rows_per_chunk), 4 + targets].astype(np.float32)
            part = q * params[:, 0] + params[:, 1]
            out[i * self.rows_per_chunk : (i + 1) * self.rows_per_chunk] = part
        return out


def is_logits_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts with the ``_logits_`` magic."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_logits_file(path: str | os.PathLike) -> LogitsFile:
    """Open a llama.cpp ``--kl-divergence-base`` file (memory-mapped, validated).

    Raises ValueError for a wrong magic, a truncated file, a size that does
    not match the header (the message gives expected and actual bytes), or a
    token id outside ``[0, n_vocab)``.
    """
    return LogitsFile(path)


def write_logits_file(
    path: str | os.PathLike,
    tokens: np.ndarray,
    logits: np.ndarray | Iterable[np.ndarray],
    n_ctx: int,
) -> None:
    """Write float logits in llama.cpp's ``--kl-divergence-base`` format.

    ``tokens`` are the text tokens; like llama.cpp, ``n_chunk = len(tokens) //
    n_ctx`` and trailing tokens are dropped.  ``logits`` gives, for each chunk,
    either all ``n_ctx`` positions or only the ``n_ctx - 1 - n_ctx//2`` scored
    ones (positions ``n_ctx//2 .. n_ctx-2``), each ``(., n_vocab)``: an array
    ``(n_chunk, ., n_vocab)`` or an iterable yielding one chunk at a time (so a
    long run can be streamed to disk).  Quantization repeats the float32
    arithmetic of llama.cpp's ``log_softmax`` (round half to even), so the file
    can be used with ``llama-perplexity --kl-divergence`` as well as here.

    The file is written to a temporary file beside ``path`` and renamed over it
    when complete, so ``path`` never holds a partial file; overwriting a file
    that an open :class:`LogitsFile` maps is refused (ValueError).
    """
    raw = np.asarray(tokens).reshape(-1)
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
    n_chunk = raw.size // n_ctx
    if n_chunk == 0:
        raise ValueError(f"need at least n_ctx={n_ctx} tokens, got {raw.size}")
    raw = raw[: n_chunk * n_ctx]
    first, rows = _first_scored(n_ctx), _rows_per_chunk(n_ctx)
    path = os.fspath(path)
    if os.path.exists(path):
        st = os.stat(path)
        if any(f._inode == (st.st_dev, st.st_ino) for f in list(_OPEN)):
            raise ValueError(f"{path} is open as a LogitsFile (memory-mapped): close() it "
                             "before overwriting the file")
    n_vocab = None
    written = 0
    with atomic_write(path) as f:  # a failure or crash never leaves a partial file at path
        for chunk in logits:
            chunk = np.asarray(chunk, dtype=np.float32)
            if n_vocab is None:
                n_vocab = chunk.shape[-1]
                bad = np.flatnonzero((raw < 0) | (raw >= n_vocab))
                if bad.size:
                    raise ValueError(f"token {bad[0]} is {raw[bad[0]]}, outside [0, n_vocab={n_vocab})")
                header = np.array([(MAGIC, n_ctx, n_vocab, n_chunk)], dtype=_HEADER)
                f.write(header.tobytes())
                f.write(raw.astype(np.int32).tobytes())
            if written >= n_chunk:
                raise ValueError(f"more logit chunks than the {n_chunk} chunks in tokens")
            if chunk.ndim != 2 or chunk.shape[1] != n_vocab or chunk.shape[0] not in (n_ctx, rows):
                raise ValueError(
                    f"chunk {written}: logits shape {chunk.shape}, expected ({n_ctx} or "
                    f"{rows}, {n_vocab})"
                )
            if chunk.shape[0] == n_ctx:
                chunk = chunk[first : n_ctx - 1]
            for block in _row_blocks(rows, n_vocab):
                f.write(_encode_rows(chunk[block]).tobytes())
            written += 1
        if written != n_chunk:
            raise ValueError(f"got logits for {written} chunks, tokens give {n_chunk}")


def compare_logits_files(base_path: str | os.PathLike, quant_path: str | os.PathLike) -> dict:
    """Per-token comparison of two llama.cpp logits files of the same text.

    Both files must come from the same tokens, ``n_ctx`` and ``n_vocab``
    (ValueError naming both files otherwise).  Returns float64 arrays of length
    ``n_scored`` (bool for ``same_top1``), chunk-major like
    :meth:`LogitsFile.target_log_probs`:

    ``base_log_probs``, ``quant_log_probs``
        decoded log p(target); llama.cpp's ``-nll_base`` and ``-nll``.
    ``p_base``, ``p_quant``, ``delta_p``
        the target probabilities and ``p_quant - p_base`` (llama.cpp's Δp).
    ``kld``
        KL(base || quant) in nats, following llama.cpp's ``kl_divergence``:
        ``sum_i p_i (log p_i - log q_i)`` over vocabulary entries whose decoded
        base log-prob is ``> -16``.  Entries with code 0 decode to the row's
        floor ``min_log_prob``, which is ``<= -16`` whenever the logits span 16
        nats, so they are skipped; in the rare row spanning less, code 0 marks
        the true minimum and is kept if above -16.  llama.cpp uses the quantized
        model's exact logits for ``log q``; here both sides are decoded from
        their files, so quant entries below their own floor read as the floor
        (a slight underestimate, only in terms weighted by base p > e^-16).
    ``same_top1``
        argmax of the base row equals argmax of the quant row (first index on
        ties, like llama.cpp; decoding can tie logits within ``scale/2`` of the
        top); llama.cpp's "Same top p" is the mean.
    """
    base, quant = read_logits_file(base_path), read_logits_file(quant_path)
    for name in ("n_ctx", "n_vocab", "n_chunk"):
        b, q = getattr(base, name), getattr(quant, name)
        if b != q:
            raise ValueError(f"{name} differs: {base.path} has {b}, {quant.path} has {q}")
    if not np.array_equal(base.tokens, quant.tokens):
        chunk, pos = np.argwhere(base.tokens != quant.tokens)[0]
        raise ValueError(
            f"tokens differ between {base.path} and {quant.path} (first at chunk {chunk}, "
            f"position {pos}): both runs must evaluate the same tokenized text"
        )
    n = base.n_scored
    out = {k: np.empty(n, dtype=np.float64)
           for k in ("base_log_probs", "quant_log_probs", "kld")}
    out["same_top1"] = np.empty(n, dtype=bool)
    targets = base.scored_targets()
    for i in range(base.n_chunk):
        for block in _row_blocks(base.rows_per_chunk, base.n_vocab):
            lb = _decode_rows(base._rows[i][block], base.n_vocab)
            lq = _decode_rows(quant._rows[i][block], quant.n_vocab)
            idx = np.arange(block.start, block.stop) + i * base.rows_per_chunk
            rows = np.arange(len(idx))
            out["base_log_probs"][idx] = lb[rows, targets[idx]]
            out["quant_log_probs"][idx] = lq[rows, targets[idx]]
            out["same_top1"][idx] = lb.argmax(axis=1) == lq.argmax(axis=1)
            lb64 = lb.astype(np.float64)
            terms = np.exp(lb64) * (lb64 - lq)
            out["kld"][idx] = np.where(lb > np.float32(KLD_FLOOR), terms, 0.0).sum(axis=1)
    out["p_base"] = np.exp(out["base_log_probs"])
    out["p_quant"] = np.exp(out["quant_log_probs"])
    out["delta_p"] = out["p_quant"] - out["p_base"]
    return out


def _logits_all(llama) -> bool | None:
    """The flag: ``Llama._logits_all`` in current llama-cpp-python, ``context_params.logits_all`` before."""
    flag = getattr(llama, "_logits_all", None)
    if flag is None:
        flag = getattr(getattr(llama, "context_params", None), "logits_all", None)
    return None if flag is None else bool(flag)


def token_log_probs(
    llama,
    tokens: np.ndarray,
    *,
    n_ctx: int = 512,
    protocol: str = "llama.cpp",
    add_bos: bool | None = None,
) -> np.ndarray:
    """log p(next token) from a llama-cpp-python ``Llama`` with llama.cpp's protocol.

    Mirrors ``llama-perplexity``: ``tokens`` (the whole text tokenized once,
    e.g. ``llama.tokenize(text.encode(), add_bos=True)``) is cut into
    ``len(tokens) // n_ctx`` non-overlapping chunks; each chunk is evaluated
    from an empty cache with its first token replaced by BOS (when ``add_bos``;
    ``None`` asks the model's vocabulary, like llama.cpp, defaulting to True),
    and positions ``n_ctx//2 .. n_ctx-2`` are scored.  Returns float64
    ``(n_chunk * (n_ctx - 1 - n_ctx//2),)`` in the order of
    :meth:`LogitsFile.target_log_probs`.  (llama.cpp itself refuses texts of
    fewer than ``2 * n_ctx`` tokens; here one chunk is enough.)

    The model must be created with ``Llama(..., logits_all=True)`` and a
    context of at least ``n_ctx``: ``Llama.eval`` only keeps the logits of
    every position (``Llama.scores``) in that mode.
    """
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "token_log_probs needs llama-cpp-python: pip install llama-cpp-python"
        ) from exc
    if protocol != "llama.cpp":
        raise ValueError(f"unknown protocol {protocol!r}; only 'llama.cpp' is implemented")
    if _logits_all(llama) is False:
        raise ValueError("the Llama object must be created with logits_all=True "
                         "(Llama.scores only holds every position's logits then)")
    if llama.n_ctx() < n_ctx:
        raise ValueError(f"the Llama context ({llama.n_ctx()}) is smaller than n_ctx={n_ctx}")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n_chunk = tokens.size // n_ctx
    if n_chunk == 0:
        raise ValueError(f"need at least n_ctx={n_ctx} tokens, got {tokens.size}")
    if add_bos is None:
        add_bos = bool(getattr(getattr(llama, "_model", None), "add_bos_token", lambda: True)())
    first, rows = _first_scored(n_ctx), _rows_per_chunk(n_ctx)
    out = np.empty(n_chunk * rows, dtype=np.float64)
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx].tolist()
        if add_bos:
            chunk[0] = llama.token_bos()
        llama.reset()
        llama.eval(chunk)
        logits = np.asarray(llama.scores[first : n_ctx - 1], dtype=np.float64)
        hi = logits.max(axis=1, keepdims=True)
        log_z = hi[:, 0] + np.log(np.exp(logits - hi).sum(axis=1))
        targets = tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx]
        out[i * rows : (i + 1) * rows] = logits[np.arange(rows), targets] - log_z
    return out
