"""`ppldelta compare` and ppldelta.io on hostile and unusual files: every bad input is exit 2 with
one line naming the file; no pickle ever runs; nothing unbounded is read; strict JSON out."""
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ppldelta
from ppldelta.cli import main
from ppldelta.io import read_values
from _deps import needs_torch, torch

RNG = np.random.default_rng(3)
O = -RNG.exponential(2.0, 300)
Q = np.minimum(O - 0.03 + RNG.normal(0, 0.05, 300), 0)
CLI = [sys.executable, "-m", "ppldelta"]


def run_cli(*args, timeout=120, **kw):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def npy(tmp_path):
    np.save(tmp_path / "o.npy", O)
    np.save(tmp_path / "q.npy", Q)
    return str(tmp_path / "o.npy"), str(tmp_path / "q.npy")


def one_error_line(err, name):
    assert err.startswith("ppldelta: error: ") and err.count("\n") == 1, err
    assert name in err and "Traceback" not in err, err


# ------------------------------------------------------------------ .pt: float64 kept, no pickle


@needs_torch
def test_pt_float64_is_read_exactly(tmp_path, npy, capsys):
    x = O + 1e-12  # differences far below float32 resolution
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    np.save(tmp_path / "x.npy", x)
    got = read_values(tmp_path / "x.pt")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, x)
    torch.save({"a": torch.from_numpy(x).to(torch.bfloat16)}, tmp_path / "b.pt")
    np.testing.assert_array_equal(read_values(tmp_path / "b.pt"), torch.from_numpy(x).to(torch.bfloat16).double().numpy())
    outs = []
    for f in ("x.pt", "x.npy"):
        assert main(["compare", npy[0], str(tmp_path / f), "--format", "json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1]
    assert outs[0]["reference"] == ppldelta.perplexity_delta(O, x)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@needs_torch
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_in_pt_never_runs(tmp_path, npy, capsys, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"lp": _Payload(str(marker))}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(_Payload(str(marker)), f)
    assert main(["compare", npy[0], str(path)]) == 2
    one_error_line(capsys.readouterr().err, "evil.pt")
    assert main(["compare", npy[0], npy[1], "--groups", str(path)]) == 2
    one_error_line(capsys.readouterr().err, "evil.pt")
    assert not marker.exists()
    # the payload is live: an unrestricted unpickler does create the file
    torch.load(path, weights_only=False) if how == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()


# ------------------------------------------------------------------ ambiguous multi-array files


@needs_torch
def test_multi_array_files_need_a_key(tmp_path, capsys):
    both = tmp_path / "both.npz"
    np.savez(both, original=O, quantized=Q)
    assert main(["compare", str(both), str(both)]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "both.npz")
    assert "original" in err and "quantized" in err and "both.npz:KEY" in err
    assert main(["compare", f"{both}:original", f"{both}:quantized", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"] == ppldelta.perplexity_delta(O, Q)
    torch.save({"original": torch.from_numpy(O), "quantized": torch.from_numpy(Q)}, tmp_path / "both.pt")
    from safetensors.numpy import save_file

    save_file({"original": O, "quantized": Q}, str(tmp_path / "both.safetensors"))
    for name in ("both.pt", "both.safetensors"):
        with pytest.raises(ValueError, match="which one"):
            read_values(tmp_path / name)
        np.testing.assert_array_equal(read_values(f"{tmp_path / name}:quantized"), Q)
    # one array named like log-probs next to others is not ambiguous
    np.savez(tmp_path / "lp.npz", log_probs=Q, tokens=np.arange(300))
    np.testing.assert_array_equal(read_values(tmp_path / "lp.npz"), Q)
    np.savez(tmp_path / "two.npz", log_probs=Q, lp=O)
    with pytest.raises(ValueError, match="which one"):
        read_values(tmp_path / "two.npz")


def test_help_documents_key_syntax_and_json():
    r = run_cli("compare", "--help")
    assert r.returncode == 0
    assert "FILE:KEY" in r.stdout and "both.npz:original" in r.stdout and "null" in r.stdout


# ------------------------------------------------------------------ bad files: exit 2, one line


def _npz_member_claiming(path, shape):
    """An .npz whose member's .npy header claims ``shape`` but holds 16 bytes."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("lp.npy", buf.getvalue() + b"\0" * 16)


def _bad_files(d):
    d = d / "bad"
    d.mkdir()
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "zero.npy", np.zeros(0))
    (d / "empty2.npy").write_bytes(np.lib.format.MAGIC_PREFIX)
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    raw = (d / "ok.npz")
    np.savez(raw, lp=O)
    (d / "truncated.npz").write_bytes(raw.read_bytes()[:-100])
    (d / "garbage.pt").write_bytes(b"\x80\x04garbage")
    (d / "zip.pt").write_bytes(raw.read_bytes())
    (d / "bad.safetensors").write_bytes(b"\xff" * 64)
    (d / "huge.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "bigint.json").write_text("[-1.0, -" + "9" * 4000 + "]")
    (d / "bigint.jsonl").write_text("-1.0\n-" + "9" * 4000 + "\n")
    (d / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (d / "strings.json").write_text('["a", "b"]')
    (d / "notjson.json").write_text("{")
    (d / "latin1.txt").write_bytes(b"-1.0\n\xe9\n")
    (d / "nan.txt").write_text("-1\nnan\n" * 150)
    _npz_member_claiming(d / "claims.npz", (2**40,))
    _npz_member_claiming(d / "claims2.npz", (1000,))
    np.save(d / "object.npy", np.array([1.0, None], dtype=object), allow_pickle=True)
    np.savez(d / "object.npz", lp=np.array([1.0, None], dtype=object))
    return sorted(p for p in d.iterdir() if p.name != "ok.npz")


def test_every_bad_file_is_exit_2_with_one_line(tmp_path, npy, capsys):
    for path in _bad_files(tmp_path):
        path, name = str(path), path.name
        for argv in (["compare", npy[0], path], ["compare", path, npy[1]]):
            assert main(argv) == 2, name
            one_error_line(capsys.readouterr().err, name)


def test_bad_groups_files_are_exit_2(tmp_path, npy, capsys):
    for path in _bad_files(tmp_path):
        if path.name in ("strings.json", "nan.txt"):  # fine as labels: then the count is wrong
            continue
        assert main(["compare", *npy, "--groups", str(path)]) == 2, path.name
        one_error_line(capsys.readouterr().err, path.name)


def test_bad_files_in_a_subprocess_have_no_traceback(tmp_path, npy):
    _bad_files(tmp_path)
    for name in ("deep.json", "bigint.json", "claims.npz", "garbage.pt"):
        r = run_cli("compare", npy[0], tmp_path / "bad" / name)
        assert r.returncode == 2 and r.stdout == ""
        one_error_line(r.stderr, name)


def test_npz_header_checked_before_allocating(tmp_path):
    _npz_member_claiming(tmp_path / "c.npz", (2**40,))
    with pytest.raises(ValueError, match=r"c\.npz:lp: the header claims 1099511627776 values"):
        read_values(tmp_path / "c.npz")
    np.savez_compressed(tmp_path / "z.npz", lp=np.zeros(100_000))  # compresses ~1000:1: still read
    np.testing.assert_array_equal(read_values(tmp_path / "z.npz"), np.zeros(100_000))


def test_analysis_errors_name_the_file(tmp_path, npy, capsys):
    bad = Q.copy()
    bad[7] = np.nan
    np.save(tmp_path / "nanq.npy", bad)
    assert main(["compare", npy[0], str(tmp_path / "nanq.npy")]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "nanq.npy")
    assert "contains NaN at index 7" in err and "o.npy" not in err
    (tmp_path / "g.txt").write_text("a\n" * 10)
    assert main(["compare", *npy, "--groups", str(tmp_path / "g.txt")]) == 2
    one_error_line(capsys.readouterr().err, "g.txt")


def test_unexpected_analysis_exception_is_not_exit_1(npy, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(ppldelta.analysis, "analyze", boom)  # the cli imports it from its module
    assert main(["compare", *npy]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "RuntimeError: something odd")
    assert "o.npy" in err and "q.npy" in err


# ------------------------------------------------------------------ endless streams


def _limited():
    import resource

    # AddressSanitizer reserves terabytes of shadow address space: no RLIMIT_AS under it (the
    # timeout still catches an endless read)
    if "asan" not in os.environ.get("LD_PRELOAD", ""):
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.skipif(not os.path.exists("/dev/zero") or sys.platform != "linux", reason="needs /dev/zero")
def test_devices_and_pipes_are_refused(tmp_path, npy):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)  # nobody writes: opening it would block forever
    for argv, bad in ((["compare", "/dev/zero", npy[1]], "/dev/zero"),
                      (["compare", npy[0], "/dev/zero"], "/dev/zero"),
                      (["compare", *npy, "--groups", "/dev/zero"], "/dev/zero"),
                      (["compare", npy[0], fifo], str(fifo)),
                      (["compare", *npy, "--groups", fifo], str(fifo)),
                      (["compare", npy[0], tmp_path], str(tmp_path))):
        r = run_cli(*argv, timeout=60, preexec_fn=_limited)
        assert r.returncode == 2, (argv, r.stderr[-300:])
        one_error_line(r.stderr, bad)
        assert "not a regular file" in r.stderr


# ------------------------------------------------------------------ broken pipe


@pytest.mark.parametrize("extra, code", [([], 0), (["--fail-on", "good"], 1)])
def test_closed_pipe_is_quiet_and_keeps_the_gate(npy, extra, code):
    p = subprocess.Popen(CLI + ["compare", *npy, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written, like `| head -0`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == code
    assert "Broken pipe" not in err and "Traceback" not in err
    assert err == ("" if code == 0 else err.splitlines()[0] + "\n")
    if code:
        assert err.startswith("ppldelta: FAIL: ")


def test_head_reads_one_line(npy):
    r = subprocess.run(" ".join(CLI + ["compare", *npy, "--format", "json", "| head -1; echo ${PIPESTATUS[0]}"]),
                       shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert r.stdout == "{\n0\n" and r.stderr == ""


# ------------------------------------------------------------------ strict JSON


def to_json(obj):
    return ppldelta.io.to_json(obj)


def _strict(text):
    def refuse(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict(tmp_path, npy, capsys):
    bad = Q.copy()
    bad[5] = -np.inf
    np.save(tmp_path / "inf.npy", bad)
    assert main(["compare", npy[0], str(tmp_path / "inf.npy"), "--format", "json"]) == 0
    out = _strict(capsys.readouterr().out)
    assert out["reference"]["quantized_perplexity"] is None
    assert out["nonfinite"]["reference.quantized_perplexity"] == "inf"
    assert out["nonfinite"]["reference.relative_delta_pct"] == "inf"
    assert out["reference"]["quality"] == "poor"
    assert main(["compare", *npy, "--format", "json"]) == 0
    assert "nonfinite" not in _strict(capsys.readouterr().out)


_leaf = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.text(max_size=3),
                  st.none(), st.booleans())
_tree = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text("abc", max_size=3), c, max_size=4),
                     max_leaves=20)


def _expect(obj, path, bad):
    if isinstance(obj, dict):
        return {k: _expect(v, f"{path}.{k}" if path else k, bad) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expect(v, f"{path}.{i}" if path else str(i), bad) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        bad[path] = "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
        return None
    return obj


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text("xyz", min_size=1, max_size=3), _tree, max_size=5))
def test_to_json_property(obj):
    bad = {}
    want = _expect(obj, "", bad)
    if bad:
        want["nonfinite"] = bad
    assert _strict(to_json(obj)) == want
    assert _strict(to_json({"a": np.float32("nan"), "b": np.array([1.0, np.inf])})) == \
        {"a": None, "b": [1.0, None], "nonfinite": {"a": "nan", "b.1": "inf"}}



def test_json_strings_and_nulls_are_not_numbers(tmp_path, capsys):
    """["-1.5", "-2"] in a .json / .jsonl was cast to numbers (the README: strings are refused at
    every entry point); a null became NaN.  Refused naming the file; numbers still read."""
    from ppldelta.cli import main

    txt = tmp_path / "q.txt"
    txt.write_text("-1\n-2\n")
    for name, body, what in (("s.json", '["-1.5", "-2"]', "str values such as '-1.5'"),
                             ("n.json", "[-1.5, null]", "null values such as None"),
                             ("s.jsonl", '"-1.5"\n-2\n', "str values such as '-1.5'")):
        (tmp_path / name).write_text(body)
        assert main(["compare", str(tmp_path / name), str(txt)]) == 2
        assert capsys.readouterr().err.strip() == f"ppldelta: error: {tmp_path / name}: holds {what}, not numbers"
    (tmp_path / "ok.json").write_text("[-1.5, -2]")
    assert main(["compare", str(tmp_path / "ok.json"), str(txt)]) == 0
