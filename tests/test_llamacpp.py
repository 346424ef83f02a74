"""Tests for ppldelta.llamacpp (llama.cpp --kl-divergence-base files).

The expected layout and arithmetic follow llama.cpp tools/perplexity/perplexity.cpp
(``perplexity()`` writer, ``log_softmax`` with the uint16 output,
``kl_divergence`` reader); see the module docstring.
"""

import os
import struct
import sys
import tempfile
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppldelta import llamacpp

SCALE_16 = float(np.float32(16) / np.float32(65535))  # a plain float: pytest >= 9.2 rejects NumPy scalars as tolerances


def log_softmax64(logits):
    x = np.asarray(logits, dtype=np.float64)
    hi = x.max(axis=-1, keepdims=True)
    return x - hi - np.log(np.exp(x - hi).sum(axis=-1, keepdims=True))


def make_logits(rng, n_chunk, n_ctx, n_vocab, spread=6.0):
    logits = rng.normal(0.0, spread, size=(n_chunk, n_ctx, n_vocab)).astype(np.float32)
    logits[..., 0] -= 40.0  # always far below the 16-nat floor
    return logits


def write(tmp_path, name, tokens, logits, n_ctx):
    path = tmp_path / name
    llamacpp.write_logits_file(path, tokens, logits, n_ctx)
    return path


# --------------------------------------------------------------------- layout


def test_layout_matches_llama_cpp_byte_for_byte(tmp_path):
    n_ctx, n_vocab, n_chunk = 7, 5, 2  # odd n_vocab: one pad slot per row
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, n_vocab, size=n_chunk * n_ctx + 3).astype(np.int32)  # 3 dropped
    logits = make_logits(rng, n_chunk, n_ctx, n_vocab)
    path = write(tmp_path, "base.kld", tokens, logits, n_ctx)
    raw = path.read_bytes()
    first, rows, nv = n_ctx // 2, n_ctx - 1 - n_ctx // 2, 2 * ((n_vocab + 1) // 2) + 4
    assert (first, rows, nv) == (3, 3, 10)
    assert len(raw) == 8 + 3 * 4 + 4 * n_chunk * n_ctx + 2 * n_chunk * rows * nv
    assert raw[:8] == b"_logits_"
    assert struct.unpack("=3i", raw[8:20]) == (n_ctx, n_vocab, n_chunk)
    stored = np.frombuffer(raw, dtype="=i4", count=n_chunk * n_ctx, offset=20)
    np.testing.assert_array_equal(stored, tokens[: n_chunk * n_ctx])
    body = np.frombuffer(raw, dtype="=u2", offset=20 + 4 * n_chunk * n_ctx).reshape(n_chunk, rows, nv)
    assert np.all(body[..., -1] == 0)  # pad slot
    # row r of chunk c is position first + r: compare with a direct encoding of that position
    for c in range(n_chunk):
        for r in range(rows):
            scale, min_log_prob = body[c, r, :4].copy().view(np.float32)
            x = logits[c, first + r]
            hi, lo = x.max(), max(x.min(), x.max() - np.float32(16))
            assert scale == np.float32((hi - lo) / np.float32(65535))
            assert min_log_prob == pytest.approx(lo - hi - np.log(np.exp(x - hi).sum()), abs=1e-5)
            assert body[c, r, 4] == 0  # the -40 logit sits below the floor
            assert body[c, r, 4 + int(np.argmax(x))] == 65535


def test_hand_encoded_row(tmp_path):
    # logits [0, -1, -20, 2]: max 2, min clamped to 2 - 16 = -14, scale 16/65535
    n_ctx = 3  # one scored row: position 1 predicts token 2
    logits = np.zeros((1, n_ctx, 4), dtype=np.float32)
    logits[0, 1] = [0.0, -1.0, -20.0, 2.0]
    path = write(tmp_path, "hand.kld", [2, 1, 3], logits, n_ctx)
    f = llamacpp.read_logits_file(path)
    row = f._rows[0, 0]
    scale, min_log_prob = row[:4].copy().view(np.float32)
    assert scale == SCALE_16
    lse = np.log(np.exp(np.float32([-2.0, -3.0, -22.0, 0.0])).sum())
    assert min_log_prob == pytest.approx(-16.0 - lse, abs=1e-6)
    # round((logit + 14) * 65535 / 16), nearest-even; -20 < -14 -> 0
    assert row[4:8].tolist() == [57343, 53247, 0, 65535]
    assert f.scored_targets().tolist() == [3]
    decoded = f.chunk_log_probs(0)[0]
    np.testing.assert_allclose(decoded[[0, 1, 3]], log_softmax64(logits[0, 1])[[0, 1, 3]], atol=SCALE_16)
    assert decoded[2] == min_log_prob and decoded[2] <= -16
    assert f.target_log_probs()[0] == pytest.approx(log_softmax64(logits[0, 1])[3], abs=SCALE_16)


@pytest.mark.parametrize("n_ctx, first, rows", [(2, 1, 0), (3, 1, 1), (8, 4, 3), (9, 4, 4), (512, 256, 255)])
def test_scored_positions(n_ctx, first, rows):
    assert llamacpp._first_scored(n_ctx) == first
    assert llamacpp._rows_per_chunk(n_ctx) == rows


def test_chunk_rows_are_positions_half_to_end(tmp_path):
    n_ctx, n_chunk = 10, 3
    n_vocab = n_ctx * n_chunk
    tokens = np.arange(n_vocab, dtype=np.int32)[::-1].copy()
    logits = np.zeros((n_chunk, n_ctx, n_vocab), dtype=np.float32)
    for c in range(n_chunk):
        for j in range(n_ctx):
            logits[c, j, c * n_ctx + j] = 10.0  # each position marks itself
    path = write(tmp_path, "pos.kld", tokens, logits, n_ctx)
    f = llamacpp.read_logits_file(path)
    assert (f.first_scored, f.rows_per_chunk, f.n_scored) == (5, 4, 12)
    for c, chunk in enumerate(f.iter_chunks()):
        np.testing.assert_array_equal(chunk.argmax(axis=1), c * n_ctx + np.arange(5, 9))
    # position j predicts token j + 1: targets are tokens[c, 6:10]
    np.testing.assert_array_equal(f.scored_targets(), tokens.reshape(n_chunk, n_ctx)[:, 6:].ravel())
    np.testing.assert_array_equal(f.tokens, tokens.reshape(n_chunk, n_ctx))


# ----------------------------------------------------------------- round trip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_ctx=st.integers(2, 12),
    n_vocab=st.integers(1, 33),
    n_chunk=st.integers(1, 3),
    spread=st.sampled_from([0.0, 0.3, 3.0, 12.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(n_ctx, n_vocab, n_chunk, spread, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, n_vocab, size=n_chunk * n_ctx).astype(np.int32)
    logits = rng.normal(0.0, spread, size=(n_chunk, n_ctx, n_vocab)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rt.kld")
        llamacpp.write_logits_file(path, tokens, logits, n_ctx)
        f = llamacpp.read_logits_file(path)
        assert (f.n_ctx, f.n_vocab, f.n_chunk) == (n_ctx, n_vocab, n_chunk)
        first = n_ctx // 2
        exact = log_softmax64(logits[:, first : n_ctx - 1])
        decoded = np.stack([f.chunk_log_probs(i) for i in range(n_chunk)])
        assert decoded.dtype == np.float32 and decoded.shape == exact.shape
        x = logits[:, first : n_ctx - 1].astype(np.float64)
        hi = x.max(axis=-1, keepdims=True)
        scale = np.minimum(hi - x.min(axis=-1, keepdims=True), 16) / 65535
        above = x > hi - 16
        err = np.abs(decoded - exact)
        assert np.all(err[above] <= np.broadcast_to(scale, x.shape)[above] / 2 + 2e-5)
        # everything under the floor decodes to the floor, which is <= -16 up to float32 rounding
        # of the row parameters (a value a hair below hi - 16 in float64 may sit on it in float32)
        assert np.all(decoded[~above] <= -16 + 2e-5)
        floor = decoded.min(axis=-1, keepdims=True)
        assert np.all(np.broadcast_to(floor, x.shape)[~above] == decoded[~above])
        tlp = f.target_log_probs()
        assert tlp.dtype == np.float64 and tlp.shape == (f.n_scored,)
        rows = np.arange(f.n_scored)
        np.testing.assert_array_equal(tlp, decoded.reshape(-1, n_vocab)[rows, f.scored_targets()])
        del f


def test_writer_accepts_chunk_iterable_and_scored_rows_only(tmp_path):
    n_ctx, n_vocab, n_chunk = 8, 6, 3
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, n_vocab, size=n_chunk * n_ctx)
    logits = make_logits(rng, n_chunk, n_ctx, n_vocab)
    full = write(tmp_path, "full.kld", tokens, logits, n_ctx)
    streamed = write(tmp_path, "stream.kld", tokens, (c[4:7] for c in logits), n_ctx)
    assert full.read_bytes() == streamed.read_bytes()
    with pytest.raises(ValueError, match="2 chunks, tokens give 3"):
        write(tmp_path, "short.kld", tokens, logits[:2], n_ctx)
    assert not (tmp_path / "short.kld").exists()
    with pytest.raises(ValueError, match="logits shape"):
        write(tmp_path, "bad.kld", tokens, logits[:, :5], n_ctx)
    with pytest.raises(ValueError, match="more logit chunks"):
        write(tmp_path, "long.kld", tokens[:16], logits, n_ctx)


def test_writer_refuses_bad_tokens_and_non_finite_logits(tmp_path):
    """Float token ids were truncated (3.7 -> 3) and NaN ids cast to garbage; NaN / +inf logits and
    a row of -inf were quantized into a file llama.cpp would read as numbers.  Each is refused,
    nothing is left at the path; a row with some -inf (masked tokens) is kept."""
    n_ctx, n_vocab, n_chunk = 8, 6, 2
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, n_vocab, size=n_chunk * n_ctx)
    logits = make_logits(rng, n_chunk, n_ctx, n_vocab)
    for bad, err, msg in ((tokens + 0.7, TypeError, "tokens must be integer token ids, got float64"),
                          (np.where(np.arange(tokens.size) == 3, np.nan, tokens), TypeError, "integer token ids"),
                          (tokens > 2, TypeError, "integer token ids, got bool"),
                          (np.where(np.arange(tokens.size) == 3, -1, tokens), ValueError, r"token 3 is -1, outside \[0, n_vocab=6\)")):
        with pytest.raises(err, match=msg):
            write(tmp_path, "bad.kld", bad, logits, n_ctx)
    for value, row in ((np.nan, 5), (np.inf, 4), (None, 6)):
        x = logits.copy()
        if value is None:
            x[1, row] = -np.inf
        else:
            x[1, row, 2] = value
        with pytest.raises(ValueError, match=rf"chunk 1: scored row {row - 4} \(position {row}\) .* not finite"):
            write(tmp_path, "bad.kld", tokens, x, n_ctx)
    assert not (tmp_path / "bad.kld").exists()
    x = logits.copy()
    x[:, :, 0] = -np.inf
    tokens[tokens == 0] = 1
    f = llamacpp.read_logits_file(write(tmp_path, "masked.kld", tokens, x, n_ctx))
    assert np.isfinite(f.target_log_probs()).all()
    del f


# ----------------------------------------------------------------- validation


@pytest.fixture
def small_file(tmp_path):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 9, size=16)
    return write(tmp_path, "small.kld", tokens, make_logits(rng, 2, 8, 9), 8)


def test_bad_magic(small_file):
    raw = bytearray(small_file.read_bytes())
    raw[:8] = b"_logitz_"
    small_file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="not a llama.cpp logits file"):
        llamacpp.read_logits_file(small_file)


def test_truncated_and_oversized(small_file):
    raw = small_file.read_bytes()
    expected = len(raw)
    small_file.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=f"truncated.*{expected} bytes, the file has {expected - 1}"):
        llamacpp.read_logits_file(small_file)
    small_file.write_bytes(raw + b"\0\0")
    with pytest.raises(ValueError, match=f"inconsistent sizes.*{expected} bytes, the file has {expected + 2}"):
        llamacpp.read_logits_file(small_file)
    small_file.write_bytes(raw[:12])
    with pytest.raises(ValueError, match="truncated"):
        llamacpp.read_logits_file(small_file)


def test_inconsistent_header(small_file):
    raw = bytearray(small_file.read_bytes())
    raw[12:16] = struct.pack("=i", 11)  # n_vocab 9 -> 11: wider rows
    small_file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="n_vocab=11"):
        llamacpp.read_logits_file(small_file)
    raw[12:16] = struct.pack("=i", -1)
    small_file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="inconsistent header"):
        llamacpp.read_logits_file(small_file)


# -------------------------------------------------------------------- compare


def test_compare_matches_brute_force(tmp_path):
    n_ctx, n_vocab, n_chunk = 16, 40, 3
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, n_vocab, size=n_chunk * n_ctx)
    base_logits = make_logits(rng, n_chunk, n_ctx, n_vocab, spread=4.0)
    quant_logits = base_logits + rng.normal(0, 0.3, size=base_logits.shape).astype(np.float32)
    base = write(tmp_path, "base.kld", tokens, base_logits, n_ctx)
    quant = write(tmp_path, "quant.kld", tokens, quant_logits, n_ctx)
    res = llamacpp.compare_logits_files(base, quant)

    fb, fq = llamacpp.read_logits_file(base), llamacpp.read_logits_file(quant)
    lb = np.concatenate(list(fb.iter_chunks())).astype(np.float64)
    lq = np.concatenate(list(fq.iter_chunks())).astype(np.float64)
    targets = fb.scored_targets()
    rows = np.arange(len(targets))
    kld = np.array([np.sum(np.exp(b[b > -16]) * (b[b > -16] - q[b > -16])) for b, q in zip(lb, lq)])
    np.testing.assert_allclose(res["kld"], kld, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res["base_log_probs"], lb[rows, targets], rtol=1e-6)
    np.testing.assert_allclose(res["quant_log_probs"], lq[rows, targets], rtol=1e-6)
    np.testing.assert_array_equal(res["base_log_probs"], fb.target_log_probs())
    np.testing.assert_array_equal(res["same_top1"], lb.argmax(1) == lq.argmax(1))
    np.testing.assert_allclose(res["p_base"], np.exp(lb[rows, targets]), rtol=1e-6)
    np.testing.assert_allclose(res["delta_p"], res["p_quant"] - res["p_base"])
    assert res["same_top1"].dtype == bool and 0 < res["same_top1"].mean() < 1

    # ...and close to the exact KL divergence of the float logits
    first = n_ctx // 2
    pb = log_softmax64(base_logits[:, first : n_ctx - 1]).reshape(-1, n_vocab)
    pq = log_softmax64(quant_logits[:, first : n_ctx - 1]).reshape(-1, n_vocab)
    exact = (np.exp(pb) * (pb - pq)).sum(1)
    np.testing.assert_allclose(res["kld"], exact, atol=2e-3)
    np.testing.assert_array_equal(res["same_top1"], pb.argmax(1) == pq.argmax(1))
    same = llamacpp.compare_logits_files(base, base)
    assert np.all(same["kld"] == 0) and np.all(same["same_top1"]) and np.all(same["delta_p"] == 0)


def test_compare_small_blocks_same_result(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 20, size=24)
    base = write(tmp_path, "b.kld", tokens, make_logits(rng, 2, 12, 20), 12)
    quant = write(tmp_path, "q.kld", tokens, make_logits(rng, 2, 12, 20), 12)
    whole = llamacpp.compare_logits_files(base, quant)
    monkeypatch.setattr(llamacpp, "_BLOCK_VALUES", 40)  # two rows per block
    blocked = llamacpp.compare_logits_files(base, quant)
    for key in whole:
        np.testing.assert_array_equal(whole[key], blocked[key])


def test_compare_rejects_mismatched_runs(tmp_path):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 10, size=16)
    base = write(tmp_path, "base.kld", tokens, make_logits(rng, 2, 8, 10), 8)
    other_vocab = write(tmp_path, "v.kld", tokens, make_logits(rng, 2, 8, 11), 8)
    with pytest.raises(ValueError, match=r"n_vocab differs: .*base.kld has 10, .*v.kld has 11"):
        llamacpp.compare_logits_files(base, other_vocab)
    other_ctx = write(tmp_path, "c.kld", tokens, make_logits(rng, 4, 4, 10), 4)
    with pytest.raises(ValueError, match="n_ctx differs"):
        llamacpp.compare_logits_files(base, other_ctx)
    changed = tokens.copy()
    changed[13] += 1
    other_tokens = write(tmp_path, "t.kld", changed, make_logits(rng, 2, 8, 10), 8)
    with pytest.raises(ValueError, match=r"tokens differ .*chunk 1, position 5"):
        llamacpp.compare_logits_files(base, other_tokens)


# ------------------------------------------------------- llama-cpp-python path


class FakeLlama:
    """The slice of llama_cpp.Llama that token_log_probs uses, with causal fake logits."""

    BOS = 1

    def __init__(self, n_vocab=13, n_ctx=32, logits_all=True):
        self._logits_all = logits_all
        self._n_ctx, self._n_vocab = n_ctx, n_vocab
        self.scores = np.zeros((n_ctx, n_vocab), dtype=np.float32)
        self.n_tokens = 0
        self.input_ids = np.zeros(n_ctx, dtype=np.int64)
        self.evaluated = []

    def n_ctx(self):
        return self._n_ctx

    def n_vocab(self):
        return self._n_vocab

    def token_bos(self):
        return self.BOS

    def reset(self):
        self.n_tokens = 0

    @staticmethod
    def logits(prefix, n_vocab):
        """Logits after ``prefix`` (a deterministic function of the whole prefix)."""
        s = sum((k + 1) * t for k, t in enumerate(prefix))
        return (4 * np.sin(0.7 * np.arange(n_vocab) + 0.13 * s + len(prefix))).astype(np.float32)

    def eval(self, tokens):
        self.evaluated.append(list(tokens))
        for t in tokens:
            self.input_ids[self.n_tokens] = t
            self.n_tokens += 1
            self.scores[self.n_tokens - 1] = self.logits(self.input_ids[: self.n_tokens].tolist(), self._n_vocab)


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))


def expected_protocol(tokens, n_ctx, n_vocab, add_bos=True):
    """Hand computation of llama-perplexity's scoring on the fake model."""
    out = []
    for c in range(len(tokens) // n_ctx):
        chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
        if add_bos:
            chunk[0] = FakeLlama.BOS
        for j in range(n_ctx // 2, n_ctx - 1):
            lp = log_softmax64(FakeLlama.logits(chunk[: j + 1], n_vocab))
            out.append(lp[tokens[c * n_ctx + j + 1]])
    return np.array(out)


def test_token_log_probs_llama_cpp_protocol(fake_llama_cpp):
    n_ctx, n_vocab = 10, 13
    tokens = np.random.default_rng(4).integers(2, n_vocab, size=3 * n_ctx + 4)
    llama = FakeLlama(n_vocab=n_vocab, n_ctx=16)
    got = llamacpp.token_log_probs(llama, tokens, n_ctx=n_ctx)
    assert got.dtype == np.float64 and got.shape == (3 * 4,)
    np.testing.assert_allclose(got, expected_protocol(tokens, n_ctx, n_vocab), rtol=1e-6)
    assert len(llama.evaluated) == 3
    for c, seq in enumerate(llama.evaluated):  # BOS replaces each chunk's first token
        assert seq == [FakeLlama.BOS] + tokens[c * n_ctx + 1 : (c + 1) * n_ctx].tolist()
    no_bos = llamacpp.token_log_probs(FakeLlama(n_vocab=n_vocab), tokens, n_ctx=n_ctx, add_bos=False)
    np.testing.assert_allclose(no_bos, expected_protocol(tokens, n_ctx, n_vocab, add_bos=False), rtol=1e-6)


def test_token_log_probs_agrees_with_logits_file(fake_llama_cpp, tmp_path):
    n_ctx, n_vocab = 8, 13
    tokens = np.random.default_rng(9).integers(2, n_vocab, size=2 * n_ctx)
    direct = llamacpp.token_log_probs(FakeLlama(n_vocab=n_vocab), tokens, n_ctx=n_ctx)
    chunks = []
    for c in range(2):
        chunk = [FakeLlama.BOS] + tokens[c * n_ctx + 1 : (c + 1) * n_ctx].tolist()
        chunks.append([FakeLlama.logits(chunk[: j + 1], n_vocab) for j in range(n_ctx)])
    path = write(tmp_path, "fake.kld", tokens, np.array(chunks), n_ctx)
    np.testing.assert_allclose(llamacpp.read_logits_file(path).target_log_probs(), direct, atol=SCALE_16)


def test_token_log_probs_asks_vocab_for_bos(fake_llama_cpp):
    tokens = np.random.default_rng(6).integers(2, 13, size=16)
    llama = FakeLlama()
    llama._model = types.SimpleNamespace(add_bos_token=lambda: False)  # llama_vocab_get_add_bos
    got = llamacpp.token_log_probs(llama, tokens, n_ctx=8)
    assert llama.evaluated[0][0] == tokens[0]
    np.testing.assert_allclose(got, expected_protocol(tokens, 8, 13, add_bos=False), rtol=1e-6)


def test_token_log_probs_checks(fake_llama_cpp):
    tokens = np.arange(40) % 13
    with pytest.raises(ValueError, match="logits_all=True"):
        llamacpp.token_log_probs(FakeLlama(logits_all=False), tokens, n_ctx=8)
    old_style = FakeLlama()  # older llama-cpp-python: the flag lives in context_params
    del old_style._logits_all
    old_style.context_params = types.SimpleNamespace(logits_all=False)
    with pytest.raises(ValueError, match="logits_all=True"):
        llamacpp.token_log_probs(old_style, tokens, n_ctx=8)
    with pytest.raises(ValueError, match="smaller than n_ctx=64"):
        llamacpp.token_log_probs(FakeLlama(), tokens, n_ctx=64)
    with pytest.raises(ValueError, match="protocol"):
        llamacpp.token_log_probs(FakeLlama(), tokens, n_ctx=8, protocol="sliding")
    with pytest.raises(ValueError, match="at least n_ctx=16"):
        llamacpp.token_log_probs(FakeLlama(), tokens[:10], n_ctx=16)


def test_token_log_probs_without_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        llamacpp.token_log_probs(FakeLlama(), np.arange(40) % 13, n_ctx=8)


def test_reading_a_closed_logits_file_says_so(small_file):
    """After close() (or its with-block) every read said "'NoneType' object is not subscriptable"."""
    with llamacpp.read_logits_file(small_file) as f:
        want = f.target_log_probs()
    for read in (f.target_log_probs, f.scored_targets, lambda: f.chunk_log_probs(0), lambda: f.tokens,
                 lambda: list(f.iter_chunks())):
        with pytest.raises(ValueError, match="this LogitsFile is closed"):
            read()
    assert f.n_scored == want.size and "small.kld" in repr(f)
    np.testing.assert_array_equal(llamacpp.read_logits_file(small_file).target_log_probs(), want)
