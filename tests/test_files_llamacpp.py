"""llama.cpp logits files as hostile or concurrent input: token ids validated on open, sizes
bounded before allocating, atomic rewrites that never SIGBUS a reader, and `ppldelta compare`
on two logits files."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import ppldelta
from ppldelta import llamacpp
from ppldelta.cli import main

N_CTX, N_VOCAB, N_CHUNK = 8, 9, 3


def make(tmp_path, name, rng, tokens=None, spread=4.0):
    if tokens is None:
        tokens = rng.integers(0, N_VOCAB, N_CHUNK * N_CTX)
    logits = rng.normal(0, spread, (N_CHUNK, N_CTX, N_VOCAB)).astype(np.float32)
    path = tmp_path / name
    llamacpp.write_logits_file(path, tokens, logits, N_CTX)
    return path, tokens


def poke_token(path, index, value):
    raw = bytearray(path.read_bytes())
    raw[20 + 4 * index : 24 + 4 * index] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ token ids


@pytest.mark.parametrize("value", [-1, -(2**31), N_VOCAB, 2**31 - 1])
@pytest.mark.parametrize("index", [0, N_CTX - 1, N_CHUNK * N_CTX - 1])
def test_token_ids_validated_on_open(tmp_path, index, value):
    path, _ = make(tmp_path, "t.kld", np.random.default_rng(index))
    poke_token(path, index, value)
    chunk, pos = divmod(index, N_CTX)
    with pytest.raises(ValueError, match=rf"t\.kld: token id {value} at chunk {chunk}, position {pos} "
                                         rf"is outside \[0, n_vocab={N_VOCAB}\)"):
        llamacpp.read_logits_file(path)


def test_writer_refuses_token_ids_outside_vocab(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, N_VOCAB, N_CHUNK * N_CTX)
    for bad in (-1, N_VOCAB, 2**32):
        t = tokens.copy()
        t[5] = bad
        with pytest.raises(ValueError, match=rf"token 5 is {bad}, outside \[0, n_vocab={N_VOCAB}\)"):
            make(tmp_path, "w.kld", rng, tokens=t)
        assert not (tmp_path / "w.kld").exists()


# ------------------------------------------------------------------ sizes before allocating


def test_sparse_huge_vocab_decodes_without_temporaries(tmp_path):
    n_vocab, n_ctx = 1 << 22, 3  # one scored row of 4 M entries in a sparse 8 MB file
    path = tmp_path / "sparse.kld"
    with open(path, "wb") as f:
        f.write(b"_logits_" + np.array([n_ctx, n_vocab, 1], dtype="<i4").tobytes())
        f.write(np.zeros(n_ctx, dtype="<i4").tobytes())
        f.truncate(20 + 4 * n_ctx + 2 * (2 * ((n_vocab + 1) // 2) + 4))
    lf = llamacpp.read_logits_file(path)
    tracemalloc.start()
    try:
        out = lf.chunk_log_probs(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (1, n_vocab) and out.dtype == np.float32
    assert peak < out.nbytes + (1 << 20)  # the result itself, no result-sized temporaries
    # the header cannot claim more than the file holds
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(np.int32(1 << 29).tobytes())
    with pytest.raises(ValueError, match="implies 1073741864 bytes, the file has 8388648"):
        llamacpp.read_logits_file(path)


# ------------------------------------------------------------------ atomic rewrites


def _child(code, tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        from ppldelta import llamacpp
        os.chdir({str(tmp_path)!r})
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_rewriting_a_mapped_file_is_refused_not_sigbus(tmp_path):
    path, _ = make(tmp_path, "m.kld", np.random.default_rng(1))
    before = path.read_bytes()
    r = _child("""
        f = llamacpp.read_logits_file("m.kld")
        # rewrite the file in place from its own memory map (e.g. to re-quantize it)
        try:
            llamacpp.write_logits_file("m.kld", f.tokens, (c * 2 for c in f.iter_chunks()), f.n_ctx)
        except ValueError as e:
            print("refused:", e)
        t = f.tokens
        f.close()
        with llamacpp.read_logits_file("m.kld") as g:
            chunks = [c * 2 for c in g.iter_chunks()]
        llamacpp.write_logits_file("m.kld", t, chunks, 8)  # t still maps the old file
        print("old map still reads", int(t.sum()))
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, -signal.SIGBUS, r.stderr[-500:])
    assert "refused: " in r.stdout and "is open as a LogitsFile" in r.stdout
    toks = np.frombuffer(before, dtype="<i4", count=N_CHUNK * N_CTX, offset=20)
    assert f"old map still reads {int(toks.sum())}" in r.stdout
    new = llamacpp.read_logits_file(path)
    np.testing.assert_array_equal(new.tokens.reshape(-1), toks)
    assert new.n_ctx == N_CTX and len(os.listdir(tmp_path)) == 1  # no temporary files left


def test_failed_or_killed_writer_leaves_the_old_file(tmp_path):
    rng = np.random.default_rng(2)
    path, tokens = make(tmp_path, "k.kld", rng)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="got logits for 1 chunks"):
        llamacpp.write_logits_file(path, tokens, np.zeros((1, N_CTX, N_VOCAB)), N_CTX)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["k.kld"]
    r = _child("""
        def chunks():
            yield np.zeros((8, 9), dtype=np.float32)
            os._exit(7)  # the process dies mid-write
        llamacpp.write_logits_file("k.kld", np.zeros(24, dtype=np.int32), chunks(), 8)
    """, tmp_path)
    assert r.returncode == 7
    assert path.read_bytes() == before


# ------------------------------------------------------------------ ppldelta compare base.kld quant.kld


def brute_force(base, quant):
    """Per scored token: log p_base(target), log p_quant(target), KLD over base entries > -16, same top-1."""
    b, q = llamacpp.read_logits_file(base), llamacpp.read_logits_file(quant)
    out = {k: [] for k in ("lb", "lq", "kld", "top1")}
    for c in range(b.n_chunk):
        for r in range(b.rows_per_chunk):
            pos = b.first_scored + r
            target = int(b.tokens[c, pos + 1])
            params_b = b._rows[c, r, :4].copy().view(np.float32)
            params_q = q._rows[c, r, :4].copy().view(np.float32)
            lb = b._rows[c, r, 4 : 4 + b.n_vocab].astype(np.float32) * params_b[0] + params_b[1]
            lq = q._rows[c, r, 4 : 4 + q.n_vocab].astype(np.float32) * params_q[0] + params_q[1]
            out["lb"].append(float(lb[target]))
            out["lq"].append(float(lq[target]))
            keep = lb > np.float32(-16)
            out["kld"].append(float(sum(np.exp(float(x)) * (float(x) - float(y)) for x, y in zip(lb[keep], lq[keep]))))
            out["top1"].append(int(np.argmax(lb)) == int(np.argmax(lq)))
    return {k: np.array(v) for k, v in out.items()}


def test_compare_two_logits_files(tmp_path, capsys):
    rng = np.random.default_rng(4)
    base, tokens = make(tmp_path, "base.kld", rng)
    quant, _ = make(tmp_path, "quant.kld", rng, tokens=tokens)
    bf = brute_force(base, quant)
    assert main(["compare", str(base), str(quant), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reference"] == ppldelta.perplexity_delta(bf["lb"], bf["lq"])
    assert out["n_tokens"] == N_CHUNK * (N_CTX - 1 - N_CTX // 2)
    assert out["kld"]["mean"] == pytest.approx(float(np.mean(bf["kld"])), rel=1e-9, abs=1e-12)
    assert out["same_top1"]["pct"] == pytest.approx(100.0 * float(np.mean(bf["top1"])), rel=1e-12)
    # llama.cpp's truncated definition (base entries <= -16 skipped, rows decoded from uint16),
    # which the report had called 'full vocabulary'
    assert out["kld_definition"] == llamacpp.KLD_DEFINITION and "-16 skipped" in out["kld_definition"]
    assert main(["compare", str(base), str(quant)]) == 0
    text = capsys.readouterr().out
    assert "KLD" in text and "KLD definition" in text and "uint16" in text


def test_compare_logits_files_refusals(tmp_path, capsys):
    rng = np.random.default_rng(5)
    base, tokens = make(tmp_path, "base.kld", rng)
    other = tokens.copy()
    other[N_CTX + 2] = (other[N_CTX + 2] + 1) % N_VOCAB
    quant, _ = make(tmp_path, "quant.kld", rng, tokens=other)
    assert main(["compare", str(base), str(quant)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokens differ between" in err and "base.kld" in err and "quant.kld" in err
    assert "chunk 1, position 2" in err
    np.save(tmp_path / "lp.npy", -np.ones(N_CHUNK * 3))
    for argv in ([str(base), str(tmp_path / "lp.npy")], [str(tmp_path / "lp.npy"), str(base)]):
        assert main(["compare", *argv]) == 2
        err = capsys.readouterr().err
        assert "base.kld is a llama.cpp logits file and " in err and "lp.npy is not" in err
    poke_token(quant, 0, -5)
    assert main(["compare", str(base), str(quant)]) == 2
    assert "quant.kld: token id -5 at chunk 0, position 0" in capsys.readouterr().err
