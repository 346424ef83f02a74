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

Chunks are consecutive, non-overlapping windows of ``n_ctx`` tokens (the
layout of the ``"llama.cpp"`` protocol in ``ppldelta.protocols``).  Each is
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

Two KLD routes.  :func:`kld_statistics` is llama-perplexity ``--kl-divergence``
itself: the base file plus the quantized model's *exact* logits (from
llama-cpp-python through :func:`chunk_logits`, or any float array), with
llama.cpp's float32 arithmetic, its ``-16`` cutoff and its percentile rule, so
:func:`format_kld_statistics` prints the same digits as the tool.
:func:`compare_logits_files` compares two stored files instead; the quantized
side is then decoded from uint16 too, so every quantized log-prob more than 16
nats below its row's maximum reads as that row's floor (PPL(Q) off by up to
about 4e-5 relative, the low KLD percentiles by 0.1-10 %).

GGUF models as reference producers: :func:`build_reference` scores a GGUF
(a llama-cpp-python ``Llama``, :func:`load_gguf`) under the ``"llama.cpp"``
protocol into a reference file, and :func:`evaluate_against_reference`
compares a GGUF quant with any reference; both run the window loops of
``ppldelta.hf._reference`` with the Llama's own (NumPy, no torch).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable, Iterator

import numpy as np

from .io import atomic_write
from .logits import token_log_probs as _kernel_log_probs
from .protocols import chunk_first_scored as _first_scored
from .protocols import chunk_rows as _rows_per_chunk
from .protocols import chunks as _chunks

__all__ = [
    "LogitsFile",
    "is_logits_file",
    "read_logits_file",
    "write_logits_file",
    "compare_logits_files",
    "convert_logits_file",
    "token_log_probs",
    "chunk_logits",
    "kld_statistics",
    "format_kld_statistics",
    "prompt_bytes",
    "is_gguf_file",
    "load_gguf",
    "vocab_sha256",
    "build_reference",
    "evaluate_against_reference",
    "evaluate_logits_file",
    "choice_flips",
    "choice_encoder",
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
        tokens = np.memmap(self.path, dtype="=i4", mode="r", offset=tokens_offset,
                           shape=(self.n_chunk, self.n_ctx))
        self._maps = (tokens, None)
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= self.n_vocab):
            chunk, pos = np.argwhere((self.tokens < 0) | (self.tokens >= self.n_vocab))[0]
            raise ValueError(
                f"{self.path}: token id {int(self.tokens[chunk, pos])} at chunk {chunk}, position "
                f"{pos} is outside [0, n_vocab={self.n_vocab})"
            )
        self._maps = (tokens, np.memmap(self.path, dtype="=u2", mode="r", offset=rows_offset,
                                        shape=(self.n_chunk, self.rows_per_chunk, self._nv)))
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        _OPEN.add(self)

    def close(self) -> None:
        """Drop this object's memory maps (arrays taken from it keep theirs); reading the
        closed file afterwards is a ValueError."""
        self._maps = None
        _OPEN.discard(self)

    def _open_maps(self):
        if self._maps is None:
            raise ValueError(f"{self.path}: this LogitsFile is closed (read_logits_file opens it again)")
        return self._maps

    @property
    def tokens(self) -> np.ndarray:
        return self._open_maps()[0]

    @property
    def _rows(self) -> np.ndarray:
        return self._open_maps()[1]

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
    if raw.dtype.kind not in "iu":  # floats were truncated (3.7 -> 3), NaN cast to garbage
        raise TypeError(f"tokens must be integer token ids, got {raw.dtype}")
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
            hi = chunk.max(axis=1)  # NaN anywhere in a row, +inf, or a row of -inf: no log-softmax
            bad = np.flatnonzero(~np.isfinite(hi))
            if bad.size:
                raise ValueError(f"chunk {written}: scored row {bad[0]} (position {first + bad[0]}) of the logits "
                                 f"is not finite (NaN, +inf, or every value -inf: max {hi[bad[0]]})")
            for block in _row_blocks(rows, n_vocab):
                f.write(_encode_rows(chunk[block]).tobytes())
            written += 1
        if written != n_chunk:
            raise ValueError(f"got logits for {written} chunks, tokens give {n_chunk}")


def _floored_kld(lb: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """llama.cpp's KLD of decoded rows: ``sum p_i (lb_i - lq_i)`` over the entries with
    ``lb_i > KLD_FLOOR``, float64.

    This is llama.cpp's statistic, not the C kernel's KL (``ppldelta.kl_divergence``): it is
    neither renormalized (decoded rows sum to 1 only to within the decode error) nor clamped at
    0, and it drops the floor entries.  The kernel's KL of the same rows differs by up to the
    decode error and the floor mass (about 1e-2 relative on small vocabularies), and its clamp
    makes the difference unrecoverable for rows whose KL is below that error.
    """
    lb64 = lb.astype(np.float64)
    terms = np.exp(lb64) * (lb64 - lq)
    return np.where(lb > np.float32(KLD_FLOOR), terms, 0.0).sum(axis=1)


#: What ``compare_logits_files``' KLD measures (a report's ``kld_definition``).
KLD_DEFINITION = "llama.cpp logits files (both rows decoded from uint16; base log-probs <= -16 skipped)"


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
    ``kld_definition``
        ``KLD_DEFINITION``, for the report (not a full-vocabulary KLD).
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
            out["kld"][idx] = _floored_kld(lb, lq)
    out["p_base"] = np.exp(out["base_log_probs"])
    out["p_quant"] = np.exp(out["quant_log_probs"])
    out["delta_p"] = out["p_quant"] - out["p_base"]
    out["kld_definition"] = KLD_DEFINITION
    return out


def _logits_all(llama) -> bool | None:
    """The flag: ``Llama._logits_all`` in current llama-cpp-python, ``context_params.logits_all`` before."""
    flag = getattr(llama, "_logits_all", None)
    if flag is None:
        flag = getattr(getattr(llama, "context_params", None), "logits_all", None)
    return None if flag is None else bool(flag)


def _bos_of(llama, add_bos):
    if add_bos is None:  # ask the vocabulary, as llama.cpp does (llama_vocab_get_add_bos)
        add_bos = bool(getattr(getattr(llama, "_model", None), "add_bos_token", lambda: True)())
    return llama.token_bos() if add_bos else None


def _check_llama(llama, n_ctx: int) -> None:
    """A Llama that can give every position's logits of windows of ``n_ctx`` tokens."""
    if _logits_all(llama) is False:
        raise ValueError("the Llama object must be created with logits_all=True "
                         "(Llama.scores only holds every position's logits then)")
    if _context(llama) < n_ctx:
        raise ValueError(f"the Llama context ({_context(llama)}) is smaller than n_ctx={n_ctx}")


def _context(llama) -> int:
    """The longest window a Llama evaluates: its context, and no more than its token buffer
    (llama.cpp pads a context of 128 to 256; llama-cpp-python's buffers keep the 128 asked for)."""
    buf = getattr(llama, "input_ids", None)
    return min(int(llama.n_ctx()), len(buf)) if buf is not None else int(llama.n_ctx())


def _eval_chunks(llama, tokens: np.ndarray, n_ctx: int, add_bos: bool | None):
    """Yield ``(window, scores of its scored positions)`` per llama.cpp chunk (see token_log_probs)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "token_log_probs needs llama-cpp-python: pip install llama-cpp-python"
        ) from exc
    _check_llama(llama, n_ctx)
    if tokens.size // n_ctx == 0:
        raise ValueError(f"need at least n_ctx={n_ctx} tokens, got {tokens.size}")
    for w in _chunks(tokens.size, n_ctx, _first_scored(n_ctx), _bos_of(llama, add_bos)):
        yield w, _eval_window(llama, tokens, w)


def _eval_window(llama, tokens: np.ndarray, w):
    """The logits of window ``w`` (a ``protocols.Window``) evaluated from an empty cache, its first
    token replaced by ``w.bos`` when set: rows ``w.a .. w.b-1`` (float32, read in place: valid
    until the next evaluation).  The one place a Llama is run.

    A ``llama_cpp.Llama`` whose ``eval`` is the library's own is decoded here, through libllama, as
    llama-perplexity does: only the rows scored ask for logits (the last layer and ``lm_head`` run
    for them alone: about half of a llama.cpp chunk) and they are read where llama.cpp wrote them
    (``Llama.eval`` computes every position's logits and copies them all into ``Llama.scores``).
    The rows' bits are those of ``Llama.eval`` (tests/test_gguf_speed_paths.py).  Anything else
    (another ``eval``, a wrapper) runs through its ``eval`` and ``scores``."""
    chunk = np.asarray(tokens[w.start : w.end])
    if _decodes_directly(llama):
        return _decode_rows_of(llama, chunk, w.bos, w.a - w.start, w.b - w.start)
    chunk = chunk.tolist()
    if w.bos is not None:
        chunk[0] = w.bos
    llama.reset()
    llama.eval(chunk)
    return llama.scores[w.a - w.start : w.b - w.start]


def _decodes_directly(llama) -> bool:
    """Whether ``llama`` is a ``llama_cpp.Llama`` run by ``Llama.eval`` itself (not a subclass's or
    a wrapper's ``eval``) on a libllama without GPU offload, so that :func:`_decode_rows_of` gives
    the bits that ``eval`` gives: checked on llama.cpp's CPU backend for every weight type
    (tests/test_gguf_speed_paths.py); a GPU backend may pick other kernels for fewer rows."""
    import sys

    llama_cpp = sys.modules.get("llama_cpp")  # a Llama was made: it is imported
    Llama = getattr(llama_cpp, "Llama", None)
    if Llama is None or not isinstance(llama, Llama) or type(llama).eval is not Llama.eval:
        return False
    gpu = getattr(llama_cpp, "llama_supports_gpu_offload", None)
    ctx = getattr(llama, "_ctx", None)
    # every internal that _decode_rows_of uses (a llama-cpp-python that renamed one: Llama.eval)
    return (gpu is not None and not gpu() and hasattr(llama_cpp, "llama_get_logits")
            and all(hasattr(ctx, a) for a in ("ctx", "kv_cache_seq_rm", "decode"))
            and hasattr(getattr(llama, "_batch", None), "batch") and hasattr(llama, "n_batch"))


def _decode_rows_of(llama, chunk: np.ndarray, bos, r0: int, r1: int) -> np.ndarray:
    """Positions ``r0 .. r1-1``'s float32 logits of ``chunk`` (its first token replaced by ``bos``
    when set) decoded from an empty cache in ``Llama.eval``'s batches of ``n_batch`` tokens, with
    its cache clearing, positions and sequence 0, the other positions asking for no logits.  A view
    of llama.cpp's output buffer when one batch holds all the rows, else a copy."""
    import llama_cpp

    n, V, step = len(chunk), int(llama.n_vocab()), int(llama.n_batch)
    ctx, b = llama._ctx, llama._batch.batch
    llama.reset()  # n_tokens 0: Llama.eval after this clears the cache again; scores is not filled
    ctx.kv_cache_seq_rm(-1, 0, -1)  # what Llama.eval does first
    out, got = None, 0
    for s in range(0, n, step):
        m = min(step, n - s)
        ids = np.array(chunk[s : s + m], dtype=np.int64)
        if s == 0 and bos is not None:
            ids[0] = bos
        pos = np.arange(s, s + m)
        np.ctypeslib.as_array(b.token, shape=(m,))[:] = ids
        np.ctypeslib.as_array(b.pos, shape=(m,))[:] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(m,))[:] = 1
        for i in range(m):
            b.seq_id[i][0] = 0
        want = (pos >= r0) & (pos < r1)
        np.ctypeslib.as_array(b.logits, shape=(m,))[:] = want
        b.n_tokens = m
        ctx.decode(llama._batch)
        k = int(want.sum())
        if k:
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx.ctx), shape=(k, V))
            if k == r1 - r0:
                return rows
            if out is None:
                out = np.empty((r1 - r0, V), dtype=np.float32)
            out[got : got + k] = rows
            got += k
            if got == r1 - r0:  # later positions cannot change these rows (causal): not decoded
                return out
    return np.empty((0, V), dtype=np.float32)


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
    e.g. ``llama.tokenize(prompt_bytes(data), add_bos=True)``) is cut into
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
    from .refstats import ROW_BUDGET

    if protocol != "llama.cpp":
        raise ValueError(f"unknown protocol {protocol!r}; only 'llama.cpp' is implemented")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    rows = _rows_per_chunk(n_ctx)
    out = np.empty((tokens.size // n_ctx) * rows, dtype=np.float64)
    step = max(1, ROW_BUDGET // max(1, int(llama.n_vocab())))  # float64 copies of a few rows, in cache
    for i, (w, scores) in enumerate(_eval_chunks(llama, tokens, n_ctx, add_bos)):
        for r0 in range(0, rows, step):  # the kernel is per row: blocks give the bits of the whole
            r1 = min(r0 + step, rows)
            out[i * rows + r0 : i * rows + r1] = _kernel_log_probs(
                np.asarray(scores[r0:r1], dtype=np.float64), tokens[w.a + 1 + r0 : w.a + 1 + r1])
    return out


def chunk_logits(llama, tokens: np.ndarray, *, n_ctx: int = 512,
                 add_bos: bool | None = None) -> Iterator[np.ndarray]:
    """The exact float32 logits llama-perplexity scores, one chunk at a time.

    Same chunks, BOS rule and requirements as :func:`token_log_probs`
    (``Llama(..., logits_all=True)``); yields a float32 copy ``(n_ctx - 1 -
    n_ctx//2, n_vocab)`` per chunk: the logits at positions ``n_ctx//2 ..
    n_ctx-2``.  Pass ``tokens=base.tokens`` of a :class:`LogitsFile` to feed
    :func:`kld_statistics`, as ``llama-perplexity --kl-divergence`` does.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    for _, scores in _eval_chunks(llama, tokens, n_ctx, add_bos):
        yield np.array(scores, dtype=np.float32)


# ---------------------------------------------------------------------------- llama.cpp's KLD
_F32 = np.float32


def _expf(x: np.ndarray) -> np.ndarray:
    """C's ``expf`` of float32 values: exp in float64, rounded once to float32."""
    return np.exp(x.astype(np.float64)).astype(_F32)


def _percentile_f32(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's ``percentile`` lambda: float32 position and interpolation."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = _F32(fraction) * _F32(values.size - 1)
    ip = int(p)
    p = _F32(p - _F32(ip))
    nxt = values[min(ip + 1, values.size - 1)]
    return float((_F32(1) - p) * values[ip] + p * nxt)


def _median_f32(values: np.ndarray) -> float:
    n = values.size
    if n % 2 == 0:
        return float(_F32(0.5) * (values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


def _mean_and_uncertainty(s: float, s2: float, n: int) -> tuple[float, float]:
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (np.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


#: The percentiles llama-perplexity prints (KLD; Δp adds 75 % and 25 %).
KLD_PERCENTILES = (0.999, 0.990, 0.950, 0.900, 0.100, 0.050, 0.010, 0.001)
DELTA_P_PERCENTILES = (0.999, 0.990, 0.950, 0.900, 0.750, 0.250, 0.100, 0.050, 0.010, 0.001)


def _nll_f32(x: np.ndarray, tok: np.ndarray):
    """llama.cpp's per-token NLL of float32 logit rows ``x`` (perplexity.cpp ``log_softmax``):
    ``max + float(log(sum_i expf(x_i - max))) - x[tok]`` in float32 (the sum in double).
    Returns ``(nll, max, log_sum_exp)``, float32."""
    mx = x.max(axis=1)
    sum_exp = _expf(x - mx[:, None]).sum(axis=1, dtype=np.float64)
    lse = np.log(sum_exp).astype(_F32)
    return (mx + lse) - x[np.arange(x.shape[0]), tok], mx, lse


def kld_statistics(base, quant_logits) -> dict:
    """llama-perplexity ``--kl-divergence``, reproduced: the base file plus exact logits.

    ``base``: a :class:`LogitsFile` or its path (``--kl-divergence-base``).
    ``quant_logits``: the quantized model's float logits of the same chunks,
    an iterable yielding one ``(rows_per_chunk or n_ctx, n_vocab)`` array per
    chunk (:func:`chunk_logits` of a llama-cpp-python model over
    ``base.tokens``, or any model's logits), or one ``(n_chunk, ., n_vocab)``
    array.  Everything is computed as ``perplexity.cpp`` computes it
    (``kl_divergence``, ``log_softmax`` with the base row): float32 logits,
    log-sum-exp and per-token NLL, the base log-probs decoded in float32, KLD
    ``sum_i p_i (log p_i - log q_i)`` accumulated in double over the entries
    whose decoded base log-prob is ``> -16`` only (this is llama.cpp's KLD
    definition; ``ppldelta.kl_divergence`` sums the whole vocabulary), top
    token agreement between the logits' argmax and the decoded base argmax,
    percentiles at float32 fractions (``0.999f``) interpolated in float32,
    and the ± of each mean from the sums of squares (products of float32
    values rounded to float32, as in the C++ code).

    Returns a dict: ``per_token`` (``nll``, ``nll_base``, ``kld``,
    ``delta_p``: float32 arrays, chunk-major; ``same_top``: bool) and the
    values of llama.cpp's final printout under the names of
    :func:`format_kld_statistics`: ``ppl`` / ``ppl_base`` / ``ln_ratio`` /
    ``ratio`` / ``diff`` / ``kld`` / ``delta_p`` / ``rms_delta_p`` /
    ``same_top`` as ``(value, ±)``, ``cor``, ``kld_percentiles`` and
    ``delta_p_percentiles`` (``{"max", 0.999, ..., "median", ..., "min"}``),
    plus ``n`` (scored tokens) and ``definition`` (``"llama.cpp"``).
    """
    own = not isinstance(base, LogitsFile)
    lf = read_logits_file(base) if own else base
    try:
        return _kld_statistics(lf, quant_logits)
    finally:
        if own:
            lf.close()


def _kld_statistics(lf: LogitsFile, quant_logits) -> dict:
    rows, n_vocab, first = lf.rows_per_chunk, lf.n_vocab, lf.first_scored
    n = lf.n_scored
    nll = np.empty(n, _F32)
    nll_base = np.empty(n, _F32)
    kld = np.empty(n, np.float64)
    same = np.empty(n, bool)
    got = 0
    for i, chunk in enumerate(quant_logits):
        if i >= lf.n_chunk:
            raise ValueError(f"more logit chunks than the {lf.n_chunk} chunks of {lf.path}")
        x_all = np.asarray(chunk)
        if x_all.ndim != 2 or x_all.shape[1] != n_vocab or x_all.shape[0] not in (rows, lf.n_ctx):
            raise ValueError(f"chunk {i}: logits shape {x_all.shape}, expected ({rows} or "
                             f"{lf.n_ctx}, n_vocab={n_vocab})")
        if x_all.shape[0] == lf.n_ctx:
            x_all = x_all[first : lf.n_ctx - 1]
        targets = np.asarray(lf.tokens[i, first + 1 :], dtype=np.intp)
        for block in _row_blocks(rows, n_vocab):
            x = np.asarray(x_all[block], dtype=_F32)
            stored = lf._rows[i][block]
            tok = targets[block]
            r = np.arange(x.shape[0])
            o = i * rows + block.start
            nll[o : o + r.size], mx, lse = _nll_f32(x, tok)
            params = np.ascontiguousarray(stored[:, :4]).view(_F32)
            scale, min_lp = params[:, :1], params[:, 1:2]
            lpb = stored[:, 4 : 4 + n_vocab].astype(_F32)
            lpb *= scale
            lpb += min_lp
            nll_base[o : o + r.size] = -lpb[r, tok]
            same[o : o + r.size] = x.argmax(axis=1) == lpb.argmax(axis=1)
            # sum over lpb > -16 of float(p_base * float(lpb - x + (max + lse))), in double
            diff = lpb - x
            diff += (mx + lse)[:, None]
            terms = _expf(lpb)
            terms *= diff
            terms[lpb <= _F32(KLD_FLOOR)] = 0
            kld[o : o + r.size] = terms.sum(axis=1, dtype=np.float64)
        got += 1
    if got != lf.n_chunk:
        raise ValueError(f"got logits for {got} chunks, {lf.path} has {lf.n_chunk}")
    return _summarize(nll, nll_base, kld, same)


def _summarize(nll, nll_base, kld, same) -> dict:
    """The final block of llama.cpp's ``kl_divergence`` from per-token float32 values."""
    n = nll.size
    f64 = np.float64
    s_nll, s_nll2 = nll.sum(dtype=f64), (nll * nll).sum(dtype=f64)
    s_b, s_b2 = nll_base.sum(dtype=f64), (nll_base * nll_base).sum(dtype=f64)
    s_nb = (nll * nll_base).sum(dtype=f64)
    p_diff = _expf(-nll) - _expf(-nll_base)
    p_diff2 = p_diff * p_diff  # float32 product, then double sums
    s_pd, s_pd2 = p_diff.sum(dtype=f64), p_diff2.sum(dtype=f64)
    s_pd4 = (p_diff2.astype(f64) ** 2).sum()
    s_k, s_k2 = kld.sum(), (kld * kld).sum()

    log_ppl, log_ppl_unc = _mean_and_uncertainty(s_nll, s_nll2, n)
    log_base, log_base_unc = _mean_and_uncertainty(s_b, s_b2, n)
    cov = 0.0 if n < 10 else (s_nb / n - (s_nll / n) * (s_b / n)) / (n - 1)
    ppl, ppl_base = float(np.exp(log_ppl)), float(np.exp(log_base))
    ppl_unc, ppl_base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
    with np.errstate(divide="ignore", invalid="ignore"):
        cor = float(np.float64(cov) / (log_ppl_unc * log_base_unc))
    ln_ratio = log_ppl - log_base
    ln_ratio_unc = float(np.sqrt(log_ppl_unc ** 2 + log_base_unc ** 2 - 2.0 * cov))
    ratio = float(np.exp(ln_ratio))
    diff_unc = float(np.sqrt(ppl_unc ** 2 + ppl_base_unc ** 2 - 2.0 * ppl * ppl_base * cov))
    mse, mse_unc = _mean_and_uncertainty(s_pd2, s_pd4, n)
    rms = float(np.sqrt(mse))
    top = float(same.sum()) / n
    k_sorted = np.sort(kld.astype(_F32))
    p_sorted = np.sort(p_diff)
    kp = {"max": float(k_sorted[-1])}
    kp.update({f: _percentile_f32(k_sorted, f) for f in KLD_PERCENTILES[:4]})
    kp["median"] = _median_f32(k_sorted)
    kp.update({f: _percentile_f32(k_sorted, f) for f in KLD_PERCENTILES[4:]})
    kp["min"] = float(k_sorted[0])
    pp = {"max": float(p_sorted[-1])}
    pp.update({f: _percentile_f32(p_sorted, f) for f in DELTA_P_PERCENTILES[:5]})
    pp["median"] = _median_f32(p_sorted)
    pp.update({f: _percentile_f32(p_sorted, f) for f in DELTA_P_PERCENTILES[5:]})
    pp["min"] = float(p_sorted[0])
    return {
        "definition": "llama.cpp",
        "n": n,
        "ppl": (ppl, ppl_unc),
        "ppl_base": (ppl_base, ppl_base_unc),
        "cor": cor,
        "ln_ratio": (float(ln_ratio), ln_ratio_unc),
        "ratio": (ratio, ratio * ln_ratio_unc),
        "diff": (ppl - ppl_base, diff_unc),
        "kld": tuple(float(v) for v in _mean_and_uncertainty(s_k, s_k2, n)),
        "kld_percentiles": kp,
        "delta_p": tuple(float(v) for v in _mean_and_uncertainty(s_pd, s_pd2, n)),
        "delta_p_percentiles": pp,
        "rms_delta_p": (rms, float(0.5 / rms * mse_unc) if rms > 0 else float("nan")),
        "same_top": (top, float(np.sqrt(top * (1 - top) / (n - 1)))),
        "per_token": {"nll": nll, "nll_base": nll_base, "kld": kld.astype(_F32),
                      "delta_p": p_diff, "same_top": same},
    }


def _pct_label(f: float) -> str:
    return f"{100 * f:4.1f}%"


def format_kld_statistics(stats: dict) -> str:
    """The final block of ``llama-perplexity --kl-divergence``, line for line and digit for digit.

    ``stats`` is :func:`kld_statistics`'s result.  llama.cpp prints this block
    only for at least 100 scored tokens.
    """
    v = stats
    kp, pp = v["kld_percentiles"], v["delta_p_percentiles"]
    lines = [
        "====== Perplexity statistics ======",
        "Mean PPL(Q)                   : %10.6f ± %10.6f" % v["ppl"],
        "Mean PPL(base)                : %10.6f ± %10.6f" % v["ppl_base"],
        "Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%" % (100.0 * v["cor"]),
        "Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f" % v["ln_ratio"],
        "Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f" % v["ratio"],
        "Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f" % v["diff"],
        "",
        "====== KL divergence statistics ======",
        "Mean    KLD: %10.6f ± %10.6f" % v["kld"],
        "Maximum KLD: %10.6f" % kp["max"],
    ]
    lines += ["%s   KLD: %10.6f" % (_pct_label(f), kp[f]) for f in KLD_PERCENTILES[:4]]
    lines.append("Median  KLD: %10.6f" % kp["median"])
    lines += ["%s   KLD: %10.6f" % (_pct_label(f), kp[f]) for f in KLD_PERCENTILES[4:]]
    lines += [
        "Minimum KLD: %10.6f" % kp["min"],
        "",
        "====== Token probability statistics ======",
        "Mean    Δp: %6.3f ± %5.3f %%" % (100.0 * v["delta_p"][0], 100.0 * v["delta_p"][1]),
        "Maximum Δp: %6.3f%%" % (100.0 * pp["max"]),
    ]
    lines += ["%s   Δp: %6.3f%%" % (_pct_label(f), 100.0 * pp[f]) for f in DELTA_P_PERCENTILES[:5]]
    lines.append("Median  Δp: %6.3f%%" % (100.0 * pp["median"]))
    lines += ["%s   Δp: %6.3f%%" % (_pct_label(f), 100.0 * pp[f]) for f in DELTA_P_PERCENTILES[5:]]
    lines += [
        "Minimum Δp: %6.3f%%" % (100.0 * pp["min"]),
        "RMS Δp    : %6.3f ± %5.3f %%" % (100.0 * v["rms_delta_p"][0], 100.0 * v["rms_delta_p"][1]),
        "Same top p: %6.3f ± %5.3f %%" % (100.0 * v["same_top"][0], 100.0 * v["same_top"][1]),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- -f text
_SPACE = b" \t\n\v\f\r"
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"',
            ord("\\"): b"\\"}


def _strtol16(two: bytes) -> int | None:
    """C's ``strtol(two, &end, 16)`` when it consumes both bytes, else None."""
    hexd = b"0123456789abcdefABCDEF"
    if two[1] in hexd and two[0] in hexd:
        return int(two, 16)
    if two[1] in hexd and two[0] in _SPACE + b"+":
        return int(two[1:], 16)
    if two[1] in hexd and two[0] == ord("-"):
        return -int(two[1:], 16)
    return None


def prompt_bytes(data: bytes, *, escape: bool = True, strip_newline: bool = True) -> bytes:
    """The text llama.cpp's tools see when given ``-f FILE`` holding ``data``.

    ``llama-perplexity``'s ``-f`` (``common_params_parse``) reads the file,
    drops ONE trailing newline, and, unless ``--no-escape`` is passed,
    processes backslash escapes (``\\n``, ``\\r``, ``\\t``, ``\\'``,
    ``\\"``, ``\\\\``, ``\\xHH``; any other backslash stays) before it
    tokenizes the text (``common_tokenize`` with add_special = the
    vocabulary's add-BOS flag, parse_special = false).  ``llama-tokenize -f``
    processes the same escapes but keeps the trailing newline
    (``strip_newline=False``).  Tokenize the result with
    ``Llama.tokenize(prompt_bytes(data), add_bos=True)`` to get their tokens.
    """
    data = bytes(data)
    if strip_newline and data.endswith(b"\n"):
        data = data[:-1]
    if not escape or b"\\" not in data:
        return data
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x5C and i + 1 < n:
            i += 1
            e = data[i]
            if e in _ESCAPES:
                out += _ESCAPES[e]
            elif e == ord("x") and i + 2 < n and (val := _strtol16(data[i + 1 : i + 3])) is not None:
                out.append(val & 0xFF)
                i += 2
            else:
                out += bytes((0x5C, e))
        else:
            out.append(c)
        i += 1
    return bytes(out)


def convert_logits_file(base_kld_path: str | os.PathLike, out_path: str | os.PathLike, *,
                        k: int | None = None, resume: bool = True, probes: int | None = None) -> str:
    """Convert a llama.cpp ``--kl-divergence-base`` file into a ppldelta reference file.

    Every chunk's rows are decoded block by block (:func:`_decode_rows`, O(block) memory),
    summarized (``ppldelta.refstats.summarize``: the target's log-prob, the top-``k`` ids and
    log-probs, the tail mass, the entropy; ``k`` defaults to ``refstats.DEFAULT_K``) and written
    as one window per chunk (``ppldelta.reffile.ReferenceWriter``: an interrupted conversion
    resumes).  The reference holds the file's tokens and the ``"llama.cpp"`` protocol with
    ``n_ctx``; whether BOS was written over each chunk's first token is not stored in the
    source, so it is decided at evaluation as llama-perplexity does (the vocabulary's add-BOS
    flag).  The header notes that the source was uint16-quantized: log-probs carry up to half a
    quantization step of error and everything at or below ``max - 16`` nats reads as the row's
    floor, so the summaries describe the decoded (renormalized) distribution, not the model's
    exact one.  Returns ``out_path``.
    """
    from . import protocols, refstats, reffile
    from .hf._reference import reference_header

    lf = read_logits_file(base_kld_path)
    k = refstats.DEFAULT_K if k is None else int(k)
    probes = refstats.DEFAULT_PROBES if probes is None else int(probes)
    if k < 1 or probes < 0:
        raise ValueError(f"k must be >= 1 and probes >= 0, got k={k}, probes={probes}")
    ids = np.asarray(lf.tokens, dtype=np.int64).reshape(-1)
    windows = _chunks(ids.size, lf.n_ctx, lf.first_scored)
    proto = {"name": "llama.cpp", "max_length": lf.n_ctx, "stride": None, "bos": None,
             "bos_from": "unknown", "writes_bos": True, "n_tokens": int(ids.size),
             "n_scored": lf.n_scored,
             "notes": protocols.notes("llama.cpp", windows, lf.n_ctx, None, ids.size, "unknown")}
    source = {"kind": "llama.cpp --kl-divergence-base", "file": os.path.basename(lf.path),
              "bytes": os.path.getsize(lf.path), "n_ctx": lf.n_ctx, "n_vocab": lf.n_vocab,
              "n_chunk": lf.n_chunk,
              "quantization": (f"uint16 per logit (scale = (max - min) / 65535), log-probs floored at "
                               f"max - {LOGIT_RANGE:g} nats (entries below read as the row's floor, "
                               f"about {KLD_FLOOR:g}); summaries are of the decoded, renormalized rows")}
    header = reference_header(model={"name": None, "class": None, "dtype": "uint16 (llama.cpp logits file)",
                                     "config_sha256": None, "weights_sha256": None},
                              tokenizer=None, ids=ids, protocol=proto, windows=windows, k=k,
                              text=None, source=source, probes=probes)
    targets = lf.scored_targets().reshape(lf.n_chunk, lf.rows_per_chunk)
    out_path = os.fspath(out_path)
    with reffile.ReferenceWriter(out_path, header, k, n_windows=lf.n_chunk, resume=resume) as w:
        for i in range(lf.n_chunk):
            if i in w.done:
                continue
            pos = np.arange(windows[i].a + 1, windows[i].b + 1)  # the targets' stream positions
            parts = [refstats.summarize(_decode_rows(lf._rows[i][block], lf.n_vocab),
                                        np.asarray(targets[i, block], dtype=np.int64), k, probes=probes,
                                        positions=pos[block])
                     for block in _row_blocks(lf.rows_per_chunk, lf.n_vocab)]
            w.write_window(i, np.concatenate(parts) if parts else np.zeros(0, w.dtype))
        w.finalize()
    lf.close()
    return out_path


class _LogitsFileModel:
    """A quantized model's llama.cpp logits file as the reference loops take a model: its stored
    rows, decoded (``_decode_rows``) chunk by chunk, in place of a forward."""

    def __init__(self, lf):
        self.lf = lf
        self.name_or_path = f"{os.path.basename(lf.path)} (llama.cpp logits file, uint16-decoded)"
        self.ppldelta_n_weights = None

    def __call__(self, *args, **kwargs):
        raise TypeError("a llama.cpp logits file runs only through ppldelta_run_windows")

    def ppldelta_run_windows(self, models, ids, windows, *, on_rows, index0=0, on_batch=None, **_):
        lf = self.lf
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        for j, w in enumerate(windows):
            c, off = divmod(w.start, lf.n_ctx)
            if off or c >= lf.n_chunk or w.a != w.start + lf.first_scored or w.b - w.a != lf.rows_per_chunk:
                raise ValueError(f"{lf.path}: the reference's window {index0 + j} is not one of the file's "
                                 f"chunks of n_ctx = {lf.n_ctx}")
            for block in _row_blocks(lf.rows_per_chunk, lf.n_vocab):
                r0, r1 = w.a + block.start, w.a + block.stop
                on_rows(index0 + j, r0, r1, [_decode_rows(lf._rows[c][block], lf.n_vocab)], ids[r0 + 1:r1 + 1])
            if on_batch is not None:
                on_batch(w.b - w.a)


def evaluate_logits_file(path, reference, *, verify: bool = True, progress: bool = True, **analyze_kwargs):
    """A quantized model's llama.cpp ``--kl-divergence-base`` file (llama-perplexity run on the
    quant, the same text and ``-c``) against a reference file of the original; returns the
    report of ``ppldelta.hf.evaluate_against_reference``.

    The file's tokens must be the reference's and its chunks the reference's windows (the
    ``"llama.cpp"`` protocol with the same ``n_ctx``): anything else is a ValueError.  The
    quantized side is what the file stores: uint16-decoded log-probs, each within half a
    quantization step, everything below ``max - 16`` nats at the row's floor (PPL(Q) then off by
    up to about 4e-5 relative, as :func:`compare_logits_files`); prefer the GGUF itself
    (:func:`evaluate_against_reference`) where it is at hand."""
    from .hf import _reference as _ref
    from .reffile import tokens_sha256

    ref = _ref._open(reference)
    lf = read_logits_file(path)
    try:
        p = ref.header.get("protocol") or {}
        if p.get("name") != "llama.cpp" or p.get("max_length") != lf.n_ctx:
            raise ValueError(f"not comparable with this reference: {lf.path} holds llama.cpp chunks of "
                             f"n_ctx = {lf.n_ctx}, the reference is protocol {p.get('name')!r} with "
                             f"max_length {p.get('max_length')}")
        ids = _ref.decode_ids(ref.header["tokens"])
        mine = np.asarray(lf.tokens, dtype=np.int64).reshape(-1)
        if ids.size < mine.size or tokens_sha256(ids[:mine.size].astype("<i4")) != tokens_sha256(mine.astype("<i4")):
            raise ValueError(f"not comparable with this reference: the tokens of {lf.path} differ from the "
                             "reference's (use the text, tokenizer and -c the reference was built with)")
        n = (ref.header.get("source") or {}).get("n_vocab")
        if n is not None and int(n) != lf.n_vocab:
            raise ValueError(f"not comparable with this reference: its logits have n_vocab={n}, "
                             f"{lf.path} {lf.n_vocab}")
        return _ref.evaluate_against_reference(_LogitsFileModel(lf), ref, verify=verify, progress=progress,
                                               bos_token_id=False, **analyze_kwargs)  # logits stored: BOS moot
    finally:
        lf.close()


# ---------------------------------------------------------------------------- GGUF models: references
#: A GGUF file of up to this many bytes is hashed whole into a reference's header; a larger one by
#: its first GGUF_HASH_HEAD bytes and its size (``model.gguf_hashed`` says which).
GGUF_HASH_MAX_BYTES = 1 << 32
GGUF_HASH_HEAD = 1 << 26
GGUF_MAGIC = b"GGUF"


def is_gguf_file(path) -> bool:
    """Whether ``path`` is a regular file that starts with the ``GGUF`` magic."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except (OSError, TypeError, ValueError):
        return False


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError("GGUF models run through llama-cpp-python: pip install llama-cpp-python") from exc
    return llama_cpp


def load_gguf(path, *, n_ctx: int = 512, **kwargs):
    """A llama-cpp-python ``Llama`` of the GGUF file ``path``, set up as llama-perplexity runs it:
    a context of ``n_ctx`` with one chunk per batch (``n_batch = n_ubatch = n_ctx``), flash
    attention on (what llama-perplexity's default ``-fa auto`` picks), every position's logits kept
    (``logits_all=True``), as many threads as the CPUs this process may run on (``-t N`` sets both
    of llama.cpp's counts to N; llama-cpp-python's default counts every CPU of the machine, a
    container's limit aside, and half of them for ``n_threads``; the thread count never changes a
    logit).  ``kwargs`` go to ``Llama`` and override these (``n_threads``, ``n_gpu_layers``, ...).
    ImportError naming ``pip install llama-cpp-python`` without it."""
    llama_cpp = _llama_cpp()
    path = os.fspath(path)
    if not is_gguf_file(path):
        raise ValueError(f"{path}: " + ("not a GGUF file (no GGUF magic)" if os.path.isfile(path)
                                         else "no such file"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    opts = {"model_path": path, "n_ctx": int(n_ctx), "n_batch": int(n_ctx), "n_ubatch": int(n_ctx),
            "logits_all": True, "flash_attn": True, "n_threads": cpus, "n_threads_batch": cpus,
            "verbose": False, **kwargs}
    return llama_cpp.Llama(**opts)


def _vocab_tokens(llama) -> list:
    """Token ``i``'s text for every ``i`` (``llama_vocab_get_text``): str when UTF-8, else bytes."""
    llama_cpp = _llama_cpp()
    vocab = llama._model.vocab
    out = []
    for i in range(llama.n_vocab()):
        raw = llama_cpp.llama_vocab_get_text(vocab, i)
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(raw)
    return out


def vocab_sha256(llama) -> str:
    """The header's ``tokenizer_sha256`` of a GGUF model: ``reffile.vocab_sha256`` of its vocabulary
    as llama-cpp-python exposes it (token ``i``'s text with id ``i``).  The vocabulary is copied, not
    quantized, so every quantization of a model has the same hash; a Hugging Face tokenizer whose
    ``get_vocab()`` lists the same strings under the same ids (byte-level BPE vocabularies such as
    SmolLM2's) has it too."""
    from .reffile import vocab_sha256 as _sha

    return _sha(_vocab_tokens(llama))


def _gguf_hash(path) -> dict:
    size = os.path.getsize(path)
    whole = size <= GGUF_HASH_MAX_BYTES
    h, left = hashlib.sha256(), size if whole else GGUF_HASH_HEAD
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(min(left, 1 << 24))):
            h.update(block)
            left -= len(block)
    return {"gguf_sha256": h.hexdigest(), "gguf_bytes": size,
            "gguf_hashed": "the whole file" if whole else f"its first {GGUF_HASH_HEAD} bytes (and gguf_bytes)"}


def _model_entry(llama) -> dict:
    path = os.fspath(llama.model_path)
    desc = getattr(getattr(llama, "_model", None), "desc", None)
    return {"name": os.path.basename(path), "path": os.path.abspath(path), "class": "llama_cpp.Llama",
            "dtype": desc() if callable(desc) else None, "config_sha256": None, "weights_sha256": None,
            **_gguf_hash(path)}


def _text_tokens(llama, texts, groups=None):
    """(token ids, the header's text entry, its groups entry or None) of ``texts`` as
    llama-perplexity tokenizes its prompt
    (``llama.tokenize(data, add_bos=True, special=False)``: add_special on, which adds BOS only
    when the vocabulary does; special tokens not parsed).  A file is read as ``-f FILE`` reads it
    (raw bytes, one trailing newline dropped, backslash escapes processed: :func:`prompt_bytes`);
    a string or a list of strings (joined with the protocol's join) is tokenized as it is.
    ``groups``: one label per text of the list; each token goes to the text its first byte is in
    (the vocabulary's pieces give the byte offsets; BOS, no bytes, to the first text)."""
    from .hf._load import load_texts
    from .protocols import get
    from .reffile import groups_entry, text_labels

    if groups is not None and (texts is None or isinstance(texts, (str, os.PathLike))):
        raise ValueError("groups needs texts as a list (one label per text), not a file, a string or tokens")
    items, source, joinable = load_texts(texts)
    if groups is not None:
        names, per_text = text_labels(groups, len(items))
    join = get("llama.cpp").join
    joined = join.join(items) if joinable else items[0]
    if source.startswith("file:"):
        with open(source[len("file:"):], "rb") as f:
            data, read_as = prompt_bytes(f.read()), "llama-perplexity -f (one trailing newline dropped, escapes processed)"
    else:
        data, read_as = joined.encode("utf-8"), "verbatim"
    ids = np.asarray(llama.tokenize(data, add_bos=True, special=False), dtype=np.int64)
    group = None
    if groups is not None:
        ends = np.cumsum([len(llama.detokenize([int(t)], special=False)) for t in ids])
        if ends.size and int(ends[-1]) != len(data):
            raise ValueError("groups: this vocabulary's token pieces do not add up to the text's bytes "
                             f"({int(ends[-1])} vs {len(data)}), so tokens cannot be assigned to texts")
        sizes = [len(t.encode("utf-8")) + len(join.encode("utf-8")) for t in items]
        starts = np.cumsum([0] + sizes[:-1])
        first = np.r_[0, ends[:-1]] if ends.size else np.zeros(0, np.int64)
        text = np.clip(np.searchsorted(starts, first, side="right") - 1, 0, len(items) - 1)
        group = groups_entry(names, np.asarray(per_text, dtype=np.int64)[text])
    return ids, {"text_source": source, "text_sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest(),
                 "n_texts": len(items), "join": join if joinable else None, "add_special_tokens": True,
                 "read_as": read_as}, group


def _tokens(llama, texts, tokens, groups=None):
    from ._adapt import as_ids

    if (texts is None) == (tokens is None):
        raise ValueError("pass exactly one of texts= and tokens=")
    if texts is not None:
        return _text_tokens(llama, texts, groups)
    if groups is not None:
        raise ValueError("groups needs texts as a list (one label per text), not tokens")
    ids = as_ids(tokens)
    n_vocab = llama.n_vocab()
    bad = np.flatnonzero((ids < 0) | (ids >= n_vocab))
    if bad.size:
        raise ValueError(f"tokens[{bad[0]}] is {ids[bad[0]]}, outside the model's vocabulary [0, {n_vocab})")
    return ids, None, None


def n_weights(llama) -> int | None:
    """The parameter count llama.cpp reports for the model (``llama_model_n_params``: the weights'
    elements), or None where this llama-cpp-python does not say (``Llama.n_params`` in some
    versions, ``Llama._model.n_params`` in others)."""
    for owner in (llama, getattr(llama, "_model", None)):
        f = getattr(owner, "n_params", None)
        if callable(f):
            return int(f())
    return None


def expected_format(llama) -> str | None:
    """The format name of the GGUF's type (``general.file_type`` in its metadata:
    ``ppldelta.bands.gguf_format``), for the expected band; None when the file does not say or
    the type has no band."""
    from .bands import gguf_format

    return gguf_format((getattr(llama, "metadata", None) or {}).get("general.file_type"))


class _Model:
    """A ``Llama`` as ``ppldelta.hf``'s reference loops take it: a name, the parameter count
    (``ppldelta_n_weights``: llama.cpp's, of the unquantized tensors) and its own window loop
    (``ppldelta_run_windows``: NumPy ids and logits, no torch)."""

    def __init__(self, llama):
        self.llama = llama
        self.name_or_path = os.path.basename(os.fspath(getattr(llama, "model_path", "") or "")) or "Llama"
        self.ppldelta_n_weights = n_weights(llama)  # for bits per weight

    def __call__(self, *args, **kwargs):
        raise TypeError("a llama.cpp model runs only through ppldelta_run_windows")

    def ppldelta_run_windows(self, models, ids, windows, *, on_rows, index0=0, on_batch=None, **_):
        """``ppldelta.hf._run.run_windows`` for one Llama: each window from an empty cache."""
        from .refstats import ROW_BUDGET

        _check_llama(self.llama, max((w.end - w.start for w in windows), default=0))
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        step = max(1, ROW_BUDGET // max(1, self.llama.n_vocab()))
        for j, w in enumerate(windows):
            rows = _eval_window(self.llama, ids, w)
            for r0 in range(w.a, w.b, step):
                r1 = min(r0 + step, w.b)
                try:
                    # float64 rows: the kernels' log-probs are then exact float64 (token_log_probs's)
                    on_rows(index0 + j, r0, r1, [np.asarray(rows[r0 - w.a : r1 - w.a], dtype=np.float64)],
                            ids[r0 + 1 : r1 + 1])
                except ValueError as e:  # say where the rows are
                    raise ValueError(f"{e} (row k of this chunk predicts tokens[{r0 + 1} + k], window "
                                     f"{index0 + j} = tokens[{w.start}:{w.end}])") from e
            if on_batch is not None:
                on_batch(w.b - w.a)


def build_reference(llama, out, *, texts=None, tokens=None, k: int | None = None, n_ctx: int | None = None,
                    resume: bool = True, progress: bool = True, probes: int | None = None,
                    groups=None, choices=None) -> str:
    """The reference file of a GGUF model under the ``"llama.cpp"`` protocol (llama-perplexity's
    chunks: the same windows and record order as ``ppldelta.hf.build_reference(protocol=
    "llama.cpp")`` and as :func:`convert_logits_file` of a ``--kl-divergence-base`` file).

    ``llama``: a llama-cpp-python ``Llama`` made with ``logits_all=True`` (:func:`load_gguf`).
    The tokens: ``texts`` (a text file, read as ``llama-perplexity -f`` reads it; a string or a list
    of strings, tokenized as they are: see :func:`prompt_bytes`) or ``tokens`` (token ids).
    ``n_ctx``: the chunk length (default the Llama's context, 512 in llama-perplexity).  BOS is
    written over each chunk's first token when the vocabulary adds one, as llama-perplexity does.
    ``k``: top-K log-probs per scored token (default ``refstats.DEFAULT_K``); ``probes``: tail
    probes per scored token (default ``refstats.DEFAULT_PROBES``), as ``hf.build_reference``;
    ``groups``: one label per text (``texts`` a list), stored for per-group deltas, and
    ``choices``: multiple-choice items whose scores are stored for flips (:func:`choice_encoder`),
    as there.

    Each chunk's logits (llama.cpp's float32, ``Llama.scores``) are summarized in float64
    (``refstats.summarize``) and streamed through ``reffile.ReferenceWriter``: an interrupted
    build resumes after its last verified chunk (``resume=True``), and a finished ``out`` of the
    same header is returned as it is.  The header records the GGUF (its path and sha256: of the
    whole file up to ``GGUF_HASH_MAX_BYTES``, else of its first ``GGUF_HASH_HEAD`` bytes plus its
    size), :func:`vocab_sha256`, the tokens and the protocol.  Returns ``out``.
    """
    from . import protocols, refstats, reffile
    from .hf import _reference as _ref

    k = refstats.DEFAULT_K if k is None else int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_ctx is None:
        n_ctx = _context(llama) if hasattr(llama, "n_ctx") else 512
    ids, text_entry, group_entry = _tokens(llama, texts, tokens, groups)
    spec, L, _ = protocols.resolve("llama.cpp", n_ctx)
    bos = _bos_of(llama, None)
    windows = protocols.plan(spec, ids.size, L, None, False if bos is None else bos)
    version = getattr(_llama_cpp(), "__version__", "?")
    header = _ref.reference_header(
        model=_model_entry(llama),
        tokenizer={"name": os.path.basename(os.fspath(llama.model_path)), "class": "llama.cpp vocabulary",
                   "vocab_sha256": vocab_sha256(llama), "vocab_size": int(llama.n_vocab())},
        ids=ids, protocol=_ref._protocol_entry(spec, windows, L, None, ids.size, bos, "vocabulary"),
        windows=windows, k=k, text=text_entry, probes=probes, groups=group_entry,
        source={"kind": "model", "backend": f"llama.cpp (llama-cpp-python {version})",
                "logits": "llama.cpp's float32 logits (Llama.scores); log-sum-exp and log-probs in float64"})
    out = os.fspath(out)
    if choices is not None:
        from .hf._choices import original_entry

        enc, prefix = choice_encoder(llama)
        header["choices"] = original_entry(_Model(llama), out, header, choices, enc, prefix, L, progress=progress)
    if resume and _ref._finished(out, header):
        return out
    with reffile.ReferenceWriter(out, header, k, n_windows=len(windows), resume=resume) as w:
        todo = [i for i in range(len(windows)) if i not in w.done]
        _ref.build_windows(_Model(llama), ids, windows, todo, w, k, progress=progress,
                           desc=f"reference (llama.cpp, K={k})")
        w.finalize()
    return out


def choice_encoder(llama):
    """(encode, prefix token) of a GGUF vocabulary for multiple-choice items (``ppldelta.choices``):
    ``Llama.tokenize`` without BOS or special tokens; an empty context is BOS, else EOS."""
    def encode(s):
        return llama.tokenize(s.encode("utf-8"), add_bos=False, special=False)

    bos = llama.token_bos() if hasattr(llama, "token_bos") else -1
    eos = llama.token_eos() if hasattr(llama, "token_eos") else -1
    return encode, (int(bos) if bos is not None and bos >= 0 else int(eos) if eos is not None and eos >= 0 else None)


def choice_flips(llama, reference, choices, *, progress: bool = True, alpha: float = 0.05):
    """``ppldelta.choice_flips`` of a GGUF model against the original's choice scores stored in
    ``reference`` (built with ``choices=``): the same items, checked by their sha256."""
    from .hf._choices import flips_against_reference

    enc, _ = choice_encoder(llama)
    return flips_against_reference(_Model(llama), reference, choices, encode=enc, progress=progress, alpha=alpha)


def _check_reference(llama, header, texts) -> None:
    """Refuse a GGUF whose vocabulary differs from the reference's, and a ``texts`` that is not the
    reference's text (ValueError naming the mismatch)."""
    from .reffile import check_compatible

    if header.get("tokenizer_sha256") is not None:
        check_compatible(header, tokenizer_sha256=vocab_sha256(llama))
    else:  # a converted llama.cpp file records its vocabulary size only
        n = (header.get("source") or {}).get("n_vocab")
        if n is not None and int(n) != llama.n_vocab():
            raise ValueError(f"not comparable with this reference: its logits have n_vocab={n}, the "
                             f"model's vocabulary {llama.n_vocab()} tokens")
    if texts is None:
        return
    ids, entry, _ = _text_tokens(llama, texts)
    stored = (header.get("text") or {}).get("text_sha256")
    if stored is not None:
        if stored != entry["text_sha256"]:
            raise ValueError(f"not comparable with this reference: the text differs from the one it was "
                             f"built from (text_sha256 {stored[:16]}... there, {entry['text_sha256'][:16]}... here)")
    else:
        from .reffile import tokens_sha256

        check_compatible(header, tokens_sha256=tokens_sha256(np.asarray(ids, dtype="<i4")))


def evaluate_against_reference(llama, reference, *, texts=None, verify: bool = True, progress: bool = True,
                               **analyze_kwargs):
    """A GGUF model (a quantized variant, through llama-cpp-python) against a reference file; returns
    the report of ``ppldelta.hf.evaluate_against_reference`` (the same comparison and analysis).

    ``llama``: a ``Llama`` made with ``logits_all=True`` and a context of at least the reference's
    window (:func:`load_gguf` with ``n_ctx`` = the reference's ``max_length``).  The tokens and
    windows are the reference's (any per-token protocol: a reference built from a Hugging Face
    model too); a vocabulary that differs from the reference's (:func:`vocab_sha256`) is a
    ValueError, and ``texts``, when given, must be the reference's text.  BOS follows the
    reference (for a converted llama.cpp file, which does not record it: the vocabulary's add-BOS
    flag, as llama-perplexity).  ``analyze_kwargs``: ``groups``, ``expected``, ``confidence``, ...
    """
    from .hf import _reference as _ref

    ref = _ref._open(reference)
    _check_reference(llama, ref.header, texts)
    bos = _bos_of(llama, None)
    return _ref.evaluate_against_reference(_Model(llama), ref, verify=verify, progress=progress,
                                           bos_token_id=False if bos is None else bos, **analyze_kwargs)
