"""``ppldelta reference build`` and ``ppldelta eval`` end to end in a subprocess, on tiny random
Llama models saved with save_pretrained (no hub): exit codes, strict JSON with each gate's
outcome, the table sorted by KLD, the cached reference of ``eval ORIGINAL QUANT``, and the same
numbers as the Python API."""
import copy
import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the model commands need torch; the core's tests run without it
from transformers import LlamaConfig, LlamaForCausalLM

from ppldelta import hf, reffile, refstats
from ppldelta.cli import main

V = 64
WORDS = ("the cat sat on a mat while dogs ran past quiet old houses near green fields and "
         "rivers under grey skies every morning before noon").split()

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """original, two perturbed variants (small and large noise), one with another tokenizer,
    a text file and another text."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    orig = LlamaForCausalLM(cfg).eval()
    tok = _tokenizer()
    paths = {}
    for name, scale in (("orig", 0.0), ("q_small", 0.01), ("q_large", 0.08), ("q_other_tok", 0.01)):
        m = copy.deepcopy(orig)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        m.save_pretrained(root / name)
        (_tokenizer(WORDS[::-1] + ["zebra"]) if name == "q_other_tok" else tok).save_pretrained(root / name)
        paths[name] = str(root / name)
    r = np.random.default_rng(2)
    (root / "text.txt").write_text(" ".join(r.choice(WORDS, size=150)))
    (root / "other.txt").write_text(" ".join(r.choice(WORDS, size=150)))
    paths["text"], paths["other"], paths["root"] = str(root / "text.txt"), str(root / "other.txt"), root
    return paths


def _run(*args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "ppldelta", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=e)


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_build_then_eval_json_text_and_gates(models, tmp_path):
    ref = tmp_path / "base.ppldref"
    r = _run("reference", "build", models["orig"], "--text", models["text"], "--max-length", "32",
             "--top-k", "8", "-o", ref, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert ref.exists() and "scored tokens" in r.stdout and "K = 8" in r.stdout
    assert reffile.read_reference(ref).header["model"]["name"] == models["orig"]

    r = _run("eval", ref, models["q_large"], models["q_small"], "--format", "json", "--no-progress",
             "--expected", "q_small=int8", "--expected", "gptq-4")
    assert r.returncode == 0, r.stderr
    out = _strict(r.stdout)
    names = [v["name"] for v in out["variants"]]
    assert names == ["q_small", "q_large"]  # sorted by KLD
    klds = [v["report"]["kld"]["mean"] for v in out["variants"]]
    assert klds == sorted(klds)
    assert all(v["gate"] == {"passed": True, "reason": None} for v in out["variants"])
    assert out["reference"]["k"] == 8 and out["reference"]["protocol"]["name"] == "sliding"
    assert out["variants"][0]["report"]["expected"]["format"] == "int8"
    assert out["variants"][1]["report"]["expected"]["format"] == "gptq-4"
    # the same numbers as the Python API on the same reference
    q = LlamaForCausalLM.from_pretrained(models["q_small"]).eval()
    rep = hf.evaluate_against_reference(q, ref, progress=False, expected="int8").to_dict()
    assert out["variants"][0]["report"]["reference"] == rep["reference"]
    assert out["variants"][0]["report"]["kld"]["mean"] == pytest.approx(rep["kld"]["mean"], rel=1e-12)

    # text: one table, sorted by KLD; a gate that fails exits 1 with one line naming the variant
    r = _run("eval", ref, models["q_large"], models["q_small"], "--no-progress",
             "--max-relative-delta", "0.000001")
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    rows = [ln for ln in lines if ln.startswith("q_")]
    assert [ln.split()[0] for ln in rows] == ["q_small", "q_large"]
    assert all(ln.rstrip().endswith("FAIL") for ln in rows)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppldelta: FAIL: q_small:") and "q_large:" in err[0]



def test_markdown_and_mismatches_in_process(models, tmp_path, capsys):
    ref = str(tmp_path / "base.ppldref")
    assert main(["reference", "build", models["orig"], "--text", models["text"], "--max-length", "32",
                 "--top-k", "4", "-o", ref, "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["eval", ref, models["q_small"], "--no-progress", "--format", "markdown", "--fail-on", "poor"])
    assert code in (0, 1)
    assert "| variant | PPL |" in capsys.readouterr().out
    # the text is checked against the reference's tokens; the tokenizer against its vocabulary
    assert main(["eval", ref, models["q_small"], "--no-progress", "--text", models["other"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens" in err[0]
    assert main(["eval", ref, models["q_other_tok"], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer" in err[0]
    assert main(["eval", ref, models["q_small"], "--no-progress", "--text", models["text"]]) == 0


def test_eval_original_builds_and_caches_reference(models, tmp_path):
    cache = tmp_path / "cache"
    args = ("eval", models["orig"], models["q_small"], "--text", models["text"], "--max-length", "32",
            "--top-k", "4", "--cache-dir", cache, "--no-progress", "--format", "json")
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    files = [f for f in os.listdir(cache) if f.endswith(".ppldref")]
    assert len(files) == 1
    first = _strict(r.stdout)
    stamp = os.stat(cache / files[0]).st_mtime_ns
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    assert os.stat(cache / files[0]).st_mtime_ns == stamp  # reused, not rebuilt
    again = _strict(r.stdout)
    assert again["variants"][0]["report"] == first["variants"][0]["report"]
    assert first["reference"]["k"] == 4


def test_bad_input_exit_codes_in_process(models, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.ppldref"), models["q_small"], "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["reference", "build", models["orig"], "-o", str(tmp_path / "x.ppldref"),
                 "--no-progress"]) == 2
    assert "needs --text" in capsys.readouterr().err
    assert main(["reference", "build", models["orig"], "--text", models["text"], "--top-k", "0",
                 "-o", str(tmp_path / "x.ppldref"), "--no-progress"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.ppldref"), models["q_small"], "--expected", "int5"]) == 2
    assert "unknown quantization format" in capsys.readouterr().err
    bad = tmp_path / "bad.ppldref"
    bad.write_bytes(b"PPLDREF\0" + b"\1" * 40)
    assert main(["eval", str(bad), models["q_small"], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.ppldref" in err[0]


def test_llamacpp_logits_file_as_reference_source(models, tmp_path, capsys):
    from ppldelta import llamacpp

    n_ctx = 16
    tok = _tokenizer()
    ids = np.asarray(tok(open(models["text"]).read())["input_ids"])
    orig = LlamaForCausalLM.from_pretrained(models["orig"]).eval()
    with torch.no_grad():  # the vocabulary adds no BOS: llama.cpp keeps each chunk's first token
        chunks = [orig(torch.from_numpy(ids[c * n_ctx:(c + 1) * n_ctx])[None]).logits[0].numpy()
                  for c in range(ids.size // n_ctx)]
    kld = tmp_path / "base.kld"
    llamacpp.write_logits_file(kld, ids, chunks, n_ctx)
    out = tmp_path / "conv.ppldref"
    assert main(["reference", "build", str(kld), "--top-k", "8", "-o", str(out), "--no-progress"]) == 0
    assert "K = 8, 8 probes" in capsys.readouterr().out
    for m in (0, 3):  # --probes: the record layout follows (0: no probe fields, format version 1's)
        other = tmp_path / f"conv{m}.ppldref"
        assert main(["reference", "build", str(kld), "--top-k", "8", "--probes", str(m), "-o", str(other),
                     "--no-progress"]) == 0
        ref = reffile.read_reference(other)
        assert ref.probes == m and ref.dtype == refstats.RECORD_DTYPE(8, m)
        assert f"K = 8, {m} probes, {os.path.getsize(other):,} bytes" in capsys.readouterr().out
        assert np.array_equal(ref.records["lps"], reffile.read_reference(out).records["lps"])
    assert main(["reference", "build", str(kld), "--probes", "-1", "-o", str(tmp_path / "x")]) == 2
    assert "--probes must be >= 0" in capsys.readouterr().err
    assert main(["eval", str(kld), models["q_small"], "--top-k", "8", "--cache-dir", str(tmp_path / "c"),
                 "--format", "json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["reference"]["protocol"] == {"name": "llama.cpp", "max_length": n_ctx, "stride": None,
                                            "bos": None}
    rep = res["variants"][0]["report"]
    assert rep["n_tokens"] == (ids.size // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    direct = hf.evaluate_against_reference(LlamaForCausalLM.from_pretrained(models["q_small"]).eval(),
                                           out, tokenizer=tok, progress=False).to_dict()
    assert rep["reference"] == direct["reference"]
    # a quant's own logits file as QUANT: its stored rows, decoded by hand here, against the reference
    qm = LlamaForCausalLM.from_pretrained(models["q_large"]).eval()
    with torch.no_grad():
        qchunks = [qm(torch.from_numpy(ids[c * n_ctx:(c + 1) * n_ctx])[None]).logits[0].numpy()
                   for c in range(ids.size // n_ctx)]
    qkld = tmp_path / "q.kld"
    llamacpp.write_logits_file(qkld, ids, qchunks, n_ctx)
    raw = qkld.read_bytes()
    n_chunk = ids.size // n_ctx
    nv = 2 * ((V + 1) // 2) + 4
    rows = np.frombuffer(raw, dtype="<u2", offset=20 + 4 * n_chunk * n_ctx).reshape(-1, nv)
    par = np.ascontiguousarray(rows[:, :4]).view("<f4")
    dec = ((rows[:, 4:4 + V].astype(np.float32) * par[:, :1]) + par[:, 1:2]).astype(np.float64)  # float32, as llama.cpp
    m = dec.max(1, keepdims=True)
    lsm = dec - m - np.log(np.exp(dec - m).sum(1, keepdims=True))
    first, per = n_ctx // 2, n_ctx - 1 - n_ctx // 2
    targets = np.concatenate([ids[c * n_ctx + first + 1:(c + 1) * n_ctx] for c in range(n_chunk)])
    lpq = lsm[np.arange(targets.size), targets]
    d = tmp_path / "tok"
    assert main(["eval", str(out), str(qkld), "--format", "json", "--no-progress", "--save-tokens", str(d)]) == 0
    v = json.loads(capsys.readouterr().out)["variants"][0]
    assert main(["eval", str(out), str(qkld), "--no-progress"]) == 0  # no model name: none shown
    assert capsys.readouterr().out.startswith(f"reference {out}: ")
    for opt in (["--protocol", "gptq"], ["--max-length", "64"], ["--stride", "4"]):  # fixed by the file
        assert main(["reference", "build", str(kld), *opt, "-o", str(tmp_path / "y.ppldref"), "--no-progress"]) == 2
        assert f"{opt[0]} {opt[1]}: " in capsys.readouterr().err and not (tmp_path / "y.ppldref").exists()
    assert v["size"]["bytes"] is None  # a logits file is no weights file
    with np.load(d / "q.kld.npz") as z:
        np.testing.assert_allclose(z["quantized_log_probs"], lpq, rtol=0, atol=1e-7)  # the kernel's float32 exp
    assert v["report"]["n_tokens"] == n_chunk * per
    wrong = tmp_path / "wrong.kld"
    llamacpp.write_logits_file(wrong, ids[: 2 * 8], [qchunks[0][:8], qchunks[1][:8]], 8)
    assert main(["eval", str(out), str(wrong), "--no-progress"]) == 2
    assert "not comparable" in capsys.readouterr().err
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "the cat", "choices": ["sat", "ran"], "answer": 0}) + "\n")
    assert main(["eval", str(out), str(qkld), "--choices", str(mc), "--no-progress"]) == 2
    assert "cannot score choices" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the eval's outputs
@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """A reference of the original (K = 8) and variants under typical quantized-model names."""
    root = tmp_path_factory.mktemp("outputs")
    ref = root / "base.ppldref"
    assert main(["reference", "build", models["orig"], "--text", models["text"], "--max-length", "32",
                 "--top-k", "8", "-o", str(ref), "--no-progress"]) == 0
    names = {}
    for name, target in (("smollm2-q8_0", "q_small"), ("smollm2-q4_k_m", "q_large"),
                         ("smollm2-q6_k", "q_small"), ("a<b>&c", "q_large")):
        (root / name).symlink_to(models[target], target_is_directory=True)
        names[name] = str(root / name)
    return {"ref": str(ref), "root": root, **names}


def _eval_out(capsys, built, variants, *extra):
    code = main(["eval", built["ref"], *(built[v] for v in variants), "--no-progress", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _n_params(path):
    return sum(p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())


def test_text_table_fits_100_columns_with_size(built, models, capsys):
    out = _eval_out(capsys, built, ["smollm2-q4_k_m", "smollm2-q8_0", "smollm2-q6_k"], "--expected", "q4_k_m")
    lines = out.rstrip("\n").splitlines()
    body = lines[lines.index("") + 1:]  # the wrapped reference line may hold a long path
    assert max(len(ln) for ln in body) <= 100, "\n".join(ln for ln in body if len(ln) > 100)
    head = body[0].split()
    assert head[:2] == ["variant", "PPL"] and head[-2:] == ["bits/w", "gate"] and "KLD" in head
    rows = [ln.split() for ln in body[1:4]]
    assert [r[0] for r in rows][0] in ("smollm2-q8_0", "smollm2-q6_k") and rows[2][0] == "smollm2-q4_k_m"
    nbytes = os.path.getsize(os.path.join(models["q_small"], "model.safetensors"))
    assert all(r[-2] == f"{8 * nbytes / _n_params(models['q_small']):.2f}" and r[-1] == "pass" for r in rows)
    verdicts = body[body.index("verdict:") + 1:]
    assert [v.split()[0] for v in verdicts] == [r[0] for r in rows]
    assert all(v.endswith("(q4_k_m)") for v in verdicts)


def test_size_of_weight_files(tmp_path):
    from ppldelta.cli import _size

    d = tmp_path / "m"
    d.mkdir()
    (d / "model-1.safetensors").write_bytes(b"x" * 300)
    (d / "model-2.safetensors").write_bytes(b"x" * 100)
    (d / "pytorch_model.bin").write_bytes(b"x" * 999)  # a second copy of the weights: not counted
    (d / "config.json").write_text("{}")
    assert _size(str(d), 100) == {"bytes": 400, "parameters": 100, "bits_per_weight": 32.0}
    (d / "w.gguf").write_bytes(b"x" * 50)
    assert _size(str(d), 400, gguf_file="w.gguf")["bits_per_weight"] == 1.0
    assert _size(str(d / "w.gguf"), None) == {"bytes": 50, "parameters": None, "bits_per_weight": None}
    for name in ("model-1.safetensors", "model-2.safetensors"):
        (d / name).unlink()
    assert _size(str(d), 999)["bytes"] == 999
    # what transformers loads: model.safetensors, not a consolidated copy beside it; an index's shards
    (d / "model.safetensors").write_bytes(b"x" * 70)
    (d / "consolidated.safetensors").write_bytes(b"x" * 70)
    assert _size(str(d), 70)["bytes"] == 70
    (d / "model-00001-of-00002.safetensors").write_bytes(b"x" * 30)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"x" * 12)
    (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", '
        '"c": "model-00001-of-00002.safetensors"}}')
    assert _size(str(d), 42)["bytes"] == 42
    assert _size("org/hub-model", 1000) == {"bytes": None, "parameters": 1000, "bits_per_weight": None}


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.script, self.tags, self._in = [], "", set(), None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th", "script"):
            self._in = tag
            if tag != "script":
                self.rows[-1].append("")

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "script":
            self.script += data
        elif self._in:
            self.rows[-1][-1] += data


def test_html_is_one_escaped_document_with_the_json_numbers(built, capsys):
    variants = ["a<b>&c", "smollm2-q8_0"]
    doc = _strict(_eval_out(capsys, built, variants, "--format", "json"))
    page = _eval_out(capsys, built, variants, "--format", "html")
    assert page.startswith("<!DOCTYPE html>") and "a<b>&c" not in page and "a&lt;b&gt;&amp;c" in page
    assert "src=" not in page and "href=" not in page and "http" not in page  # no external assets
    p = _Cells()
    p.feed(page)
    p.close()
    assert {"html", "head", "body", "table", "style"} <= p.tags and "b" not in p.tags
    assert json.loads(p.script) == doc
    head, *rows = p.rows
    assert head[:2] == ["variant", "PPL"] and len(rows) == 2
    col = {h: i for i, h in enumerate(head)}
    for row, v in zip(rows, doc["variants"]):
        rep = v["report"]
        assert row[0] == v["name"]
        assert row[col["PPL"]] == f"{rep['ppl']['quantized']['value']:.3f}"
        lo, hi = rep["ppl_ratio"]["ci"]
        assert row[col["PPL ratio [95 % CI]"]] == f"{rep['ppl_ratio']['value']:.4f} [{lo:.4f}, {hi:.4f}]"
        blo, bhi = rep["kld_bounds"]["mean"]
        assert row[col["KLD mean [bounds]"]] == f"{rep['kld']['mean']:.5f} [{blo:.5f}, {bhi:.5f}]"
        assert row[col["bits/weight"]] == f"{v['size']['bits_per_weight']:.2f}"
        assert row[col["size"]] == f"{v['size']['bytes']:,} B"
    assert [r[0] for r in rows] == ["smollm2-q8_0", "a<b>&c"]  # sorted by KLD


def test_plot_png_atomic_with_the_reports_values(built, models, tmp_path, capsys, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    from ppldelta import plot

    png = tmp_path / "out" / "q.png"
    png.parent.mkdir()
    doc = _strict(_eval_out(capsys, built, ["smollm2-q4_k_m", "smollm2-q8_0"], "--format", "json",
                            "--plot", str(png)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(png.parent) == ["q.png"]
    n = _n_params(models["q_small"])
    for v in doc["variants"]:
        assert v["size"]["parameters"] == n
        assert v["size"]["bits_per_weight"] == pytest.approx(8 * v["size"]["bytes"] / n, rel=1e-12)
    reports = {v["name"]: v["report"] for v in doc["variants"]}
    ax = plot.quality_vs_size(reports, {v["name"]: v["size"] for v in doc["variants"]})
    (pts,) = [ln for ln in ax.lines if ln.get_label() == "KLD mean"]
    assert list(pts.get_xdata()) == [v["size"]["bits_per_weight"] for v in doc["variants"]]
    assert list(pts.get_ydata()) == [r["kld"]["mean"] for r in reports.values()]
    assert ax.get_yscale() == "log"
    (bars,) = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    spans = [sorted(seg[:, 1]) for seg in bars.lines[2][0].get_segments()]
    assert spans == [pytest.approx(r["kld_bounds"]["mean"], rel=1e-12) for r in reports.values()]
    assert [t.get_text() for t in ax.texts] == list(reports)
    # sizes unknown: the table's order; only bytes known: MB
    ax = plot.quality_vs_size(reports)
    (pts,) = [ln for ln in ax.lines if ln.get_label() == "KLD mean"]
    assert list(pts.get_xdata()) == [1, 2] and "unknown" in ax.get_xlabel()
    ax = plot.quality_vs_size(reports, {k: {"bytes": 2e6} for k in reports})
    assert list(ax.lines[0].get_xdata()) == [2.0, 2.0] and "MB" in ax.get_xlabel()

    # a failing write leaves the old file as it was and no temporary file behind
    png.write_bytes(b"old")

    def broken(self, f, **kw):
        f.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    assert main(["eval", built["ref"], built["smollm2-q8_0"], "--no-progress", "--plot", str(png)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert png.read_bytes() == b"old" and os.listdir(png.parent) == ["q.png"]


def test_plot_refused_before_any_model_runs(built, tmp_path, capsys, monkeypatch):
    assert main(["eval", built["ref"], "no/such-model", "--plot", str(tmp_path / "q.svg")]) == 2
    assert "only PNG" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["eval", built["ref"], "no/such-model", "--plot", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plot needs matplotlib" in err[0] and "ppldelta[plot]" in err[0]


def test_save_tokens_read_back_by_compare(built, tmp_path, capsys):
    d = tmp_path / "tokens"
    doc = _strict(_eval_out(capsys, built, ["smollm2-q8_0", "a<b>&c"], "--format", "json",
                            "--save-tokens", str(d)))
    assert sorted(os.listdir(d)) == ["a_b__c.npz", "smollm2-q8_0.npz"]
    n = doc["reference"]["n_scored"]
    for v in doc["variants"]:
        f = v["tokens_file"]
        assert os.path.dirname(f) == str(d)
        with np.load(f) as z:
            assert set(z.files) == {"original_log_probs", "quantized_log_probs", "kld", "kld_lo", "kld_hi",
                                    "kld_reverse", "kld_reverse_lo", "kld_reverse_hi", "delta_p",
                                    "same_top1", "top1_in_top5", "top1_in_top10", "target_positions"}
            assert all(z[k].shape == (n,) for k in z.files)
            assert z["same_top1"].dtype == bool and z["target_positions"].dtype.kind == "i"
            assert np.all(z["kld_lo"] <= z["kld"]) and np.all(z["kld"] <= z["kld_hi"])
            assert math.fsum(z["kld"]) / n == pytest.approx(v["report"]["kld"]["mean"], rel=1e-12)
        assert main(["compare", f"{f}:original_log_probs", f"{f}:quantized_log_probs", "--format", "json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["reference"] == v["report"]["reference"]  # the same PPLs, bit for bit
        assert rep["ppl"] == v["report"]["ppl"] and rep["n_tokens"] == n
        # the one-file form: every per-token column, so the KLD and its bounds come back too
        assert main(["compare", f, "--format", "json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        for key in ("reference", "ppl", "kld", "kld_bounds", "kld_reverse", "kld_reverse_bounds", "same_top1",
                    "delta_p"):
            assert rep[key] == v["report"][key], key
    bad = tmp_path / "bad.npz"
    np.savez(bad, kld=np.zeros(3))
    assert main(["compare", str(bad)]) == 2
    assert "lacks original_log_probs, quantized_log_probs" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "x.txt")]) == 2
    assert "two log-prob files, or one .npz" in capsys.readouterr().err
    # the text output says where they are
    out = _eval_out(capsys, built, ["smollm2-q8_0"], "--save-tokens", str(d))
    assert out.rstrip().endswith(os.path.join(str(d), "smollm2-q8_0.npz"))


def test_per_group_deltas_rendered(capsys):
    """Reports with groups (texts of a reference): a Δ % [CI] column per group in markdown / html,
    one compact line per variant in text."""
    import types

    import ppldelta
    from ppldelta.cli import _emit_eval, _eval_table

    r = np.random.default_rng(0)
    o = -r.exponential(2.0, 600)
    labels = np.repeat(["prose", "code"], 300)
    rows = []
    for name, shift in (("v-small", 0.01), ("v-large", 0.05)):
        q = np.minimum(o - shift - np.where(labels == "code", shift, 0) + r.normal(0, 0.1, 600), 0)
        rep = ppldelta.analyze(o, q, groups=labels, kld=r.exponential(shift, 600), n_bootstrap=100)
        rows.append({"name": name, "source": name, "report": rep, "gate": None, "size": None})
    head, body = _eval_table(rows, True)
    assert head[-4:-2] == ["prose Δ %", "code Δ %"]
    for (name, rep), row in zip(((x["name"], x["report"]) for x in rows), body):
        g = rep.groups["code"]
        lo, hi = ((c - 1) * 100 for c in g.ppl_ratio.ci)
        assert row[-3] == f"{(g.ppl_ratio.value - 1) * 100:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    ref = types.SimpleNamespace(header={}, k=8, records=np.zeros(600))
    _emit_eval(rows, ref, "r.ppldref", "text")
    out = capsys.readouterr().out.splitlines()
    i = out.index("Δ PPL % per group (CIs: --format markdown/html/json):")
    g = rows[1]["report"].groups
    assert out[i + 2].split() == ["v-large", "prose", f"{(g['prose'].ppl_ratio.value - 1) * 100:+.2f},",
                                  "code", f"{(g['code'].ppl_ratio.value - 1) * 100:+.2f}"]
    assert max(map(len, out)) <= 100


def test_weight_count_is_the_unquantized_architecture(models):
    """bits per weight divide by the weights the model stands for: a quanto 4-bit model (packed
    storage) counts as its float original; an object with its own count brings it; else None."""
    quanto = pytest.importorskip("optimum.quanto")
    from ppldelta.hf._reference import _n_weights

    m = LlamaForCausalLM.from_pretrained(models["q_small"]).eval()
    n = sum(p.numel() for p in m.parameters())
    quanto.quantize(m, weights=quanto.qint4)
    quanto.freeze(m)
    assert isinstance(m.model.layers[0].mlp.up_proj.weight, quanto.QTensor)
    assert _n_weights(m) == n
    assert _n_weights(type("Own", (), {"ppldelta_n_weights": lambda self: 12345})()) == 12345
    assert _n_weights(object()) is None


def test_text_groups_from_the_command_line(models, tmp_path, capsys):
    """Several --text files: one token stream, each file a group (LABEL=FILE, else the file's
    name); the reference records them and eval reports each group's perplexities, equal to the
    per-token arrays split by an oracle of which file each target comes from (the word-level
    tokenizer gives one token per word, and the blank line between files none)."""
    ref = tmp_path / "g.ppldref"
    assert main(["reference", "build", models["orig"], "--text", f"prose={models['text']}", "--text",
                 models["other"], "-o", str(ref), "--no-progress"]) == 0
    capsys.readouterr()
    n1 = len(open(models["text"]).read().split())
    h = reffile.read_reference(ref).header
    assert h["groups"] == {"names": ["prose", "other.txt"], "runs": [[0, 0], [n1, 1]]}
    d = tmp_path / "tok"
    code = main(["eval", str(ref), models["q_large"], "--no-progress", "--format", "json", "--save-tokens", str(d)])
    res = _strict(capsys.readouterr().out)
    assert code == 0
    rep = res["variants"][0]["report"]
    with np.load(d / "q_large.npz", allow_pickle=False) as z:
        pos, lo, lq, stored = z["target_positions"], z["original_log_probs"], z["quantized_log_probs"], z["groups"]
    want = np.where(pos < n1, "prose", "other.txt")
    assert np.array_equal(stored, want)
    assert set(rep["groups"]) == {"prose", "other.txt"}
    for g in ("prose", "other.txt"):
        ref_g = rep["groups"][g]["reference"]
        assert ref_g["original_perplexity"] == round(math.exp(-math.fsum(lo[want == g]) / (want == g).sum()), 4)
        assert ref_g["quantized_perplexity"] == round(math.exp(-math.fsum(lq[want == g]) / (want == g).sum()), 4)
    # the per-token file carries the groups into compare; the text table has a line per variant
    assert main(["compare", str(d / "q_large.npz"), "--format", "json"]) == 0
    assert set(_strict(capsys.readouterr().out)["groups"]) == {"prose", "other.txt"}
    out = _eval_out(capsys, {"ref": str(ref), "q": models["q_small"]}, ["q"])
    assert "Δ PPL % per group" in out and "prose" in out and "other.txt" in out
    # passing the same texts again checks them against the reference; another order is refused
    assert main(["eval", str(ref), models["q_small"], "--no-progress", "--text", f"prose={models['text']}",
                 "--text", models["other"]]) == 0
    capsys.readouterr()
    assert main(["eval", str(ref), models["q_small"], "--no-progress", "--text", models["other"],
                 "--text", models["text"]]) == 2
    assert "the groups are other.txt, " in capsys.readouterr().err
    # the same files in the same order under other labels: refused too (the report would name them wrongly)
    assert main(["eval", str(ref), models["q_small"], "--no-progress", "--text", f"other.txt={models['text']}",
                 "--text", f"prose={models['other']}"]) == 2
    assert "the groups are other.txt, prose here and prose, other.txt in the reference" in capsys.readouterr().err
    # unlabelled files whose text differs from the reference's: the token check refuses them
    assert main(["eval", str(ref), models["q_small"], "--no-progress", "--text", models["other"]]) == 2
    assert "differ from the reference" in capsys.readouterr().err


@pytest.mark.parametrize("text,msg", [("=x.txt", "not a file"), ("lab=missing.txt", "not a file"),
                                      ("  =TEXT", "empty LABEL")])
def test_text_option_refusals(models, tmp_path, capsys, text, msg):
    text = text.replace("TEXT", models["text"])
    assert main(["reference", "build", models["orig"], "--text", text, "-o", str(tmp_path / "r.ppldref"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_groups_entry_round_trip_and_refusals(tmp_path):
    """reffile.groups_entry / scored_groups: runs of a label per token give back every label;
    malformed entries and label counts are refused; hf.build_reference needs a list of texts."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, 3), min_size=1, max_size=60))
    def prop(labels):
        names = ["a", "b", "c", "d"]
        e = reffile.groups_entry(names, labels)
        pos = np.arange(len(labels))
        assert list(reffile.scored_groups({"groups": e}, pos)) == [names[i] for i in labels]
        assert all(x[1] != y[1] for x, y in zip(e["runs"], e["runs"][1:]))  # maximal runs

    prop()
    assert reffile.scored_groups({"groups": None}, [0]) is None
    for bad in ({"names": ["a"]}, {"names": ["a"], "runs": [[1, 0]]}, {"names": ["a"], "runs": [[0, 1]]},
                {"names": ["a", "b"], "runs": [[0, 0], [0, 1]]}):
        with pytest.raises(ValueError, match="groups entry is malformed"):
            reffile.scored_groups({"groups": bad}, [0])
    with pytest.raises(ValueError, match="groups has 1 labels for 2 texts"):
        reffile.text_labels(["x"], 2)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    m = LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="groups needs texts as a list"):
        hf.build_reference(m, texts="one text\nstring", tokenizer=_tokenizer(), groups=["x"],
                           out=tmp_path / "r.ppldref", progress=False)
    with pytest.raises(ValueError, match="groups has 3 labels for 2 texts"):
        hf.build_reference(m, texts=["the cat", "a dog"], tokenizer=_tokenizer(), groups=["x", "y", "z"],
                           out=tmp_path / "r.ppldref", progress=False)


# ---------------------------------------------------------------------------- refusals before work
def test_gate_thresholds_must_be_finite(built, capsys):
    for opt, val in (("--max-relative-delta", "nan"), ("--max-relative-delta", "inf"), ("--confidence", "nan")):
        with pytest.raises(SystemExit) as e:
            main(["eval", built["ref"], built["smollm2-q8_0"], opt, val])
        assert e.value.code == 2 and "must be a finite number" in capsys.readouterr().err


def test_missing_local_variants_and_references_as_quant_refused_up_front(built, tmp_path, capsys, monkeypatch):
    from ppldelta import cli

    monkeypatch.setattr(cli, "_evaluate_variant", lambda *a: pytest.fail("a model ran"))
    for q, msg in ((str(tmp_path / "missing_dir"), "no such file or directory"),
                   ("./missing_dir", "no such file or directory"), ("q.gguf", "no such file or directory"),
                   (built["ref"], "is a reference file; pass it as SOURCE")):
        assert main(["eval", built["ref"], built["smollm2-q8_0"], q, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{q}: {msg}" in err[0], err


def test_plot_into_a_missing_folder_refused_up_front_and_gate_kept_on_late_failure(
        built, tmp_path, capsys, monkeypatch):
    from ppldelta import cli

    bad = tmp_path / "nodir" / "x.png"
    assert main(["eval", built["ref"], "no/such-model", "--plot", str(bad)]) == 2
    assert "is not a writable folder" in capsys.readouterr().err

    def fail(rows, path):
        raise PermissionError(13, "Permission denied", path + ".tmp")
    monkeypatch.setattr(cli, "_plot_eval", fail)
    code = main(["eval", built["ref"], built["smollm2-q4_k_m"], "--no-progress", "--max-relative-delta", "0",
                 "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "ppldelta: FAIL: smollm2-q4_k_m" in err  # the gate's line is not lost
    assert f"--plot {tmp_path / 'x.png'}: Permission denied" in err


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    from ppldelta import cli

    def stop(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_eval", stop)
    assert main(["eval", "a.ppldref", "q"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "resumes" in err[0]


def test_options_fixed_by_a_reference_source_are_refused(built, capsys):
    for opt, val, have in (("--top-k", "3", "8"), ("--protocol", "gptq", "sliding"), ("--max-length", "64", "32"),
                           ("--stride", "7", "16"), ("--probes", "2", "8")):
        assert main(["eval", built["ref"], built["smollm2-q8_0"], opt, val, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{opt} {val}: the reference {built['ref']} has {have}" in err, err
    assert main(["eval", built["ref"], built["smollm2-q8_0"], "--top-k", "8", "--max-length", "32",
                 "--no-progress"]) == 0  # the same values are fine
    capsys.readouterr()


def test_output_path_checks(models, tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text(open(models["text"]).read())
    before = text.read_bytes()
    base = ["reference", "build", models["orig"], "--text", str(text), "--no-progress"]
    for out, extra, msg in (("", [], "name a file"), (str(tmp_path), [], "is a directory"),
                            (str(text), ["--overwrite"], "is one of this command's inputs"),
                            (str(text), [], "is one of this command's inputs")):
        assert main(base + ["-o", out, *extra]) == 2
        assert msg in capsys.readouterr().err
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert main(base + ["-o", str(other), "--overwrite"]) == 2
    assert "replaces only a reference file" in capsys.readouterr().err
    assert text.read_bytes() == before and other.read_text() == "mine"


def test_text_not_utf8_named(models, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["reference", "build", models["orig"], "--text", str(bad), "-o", str(tmp_path / "r.ppldref")]) == 2
    err = capsys.readouterr().err
    assert f"--text {bad}: not UTF-8" in err


def test_bad_window_and_device_options(models, tmp_path, capsys):
    for opt in (["--max-length", "0"], ["--max-length", "-4"], ["--stride", "0"]):
        assert main(["reference", "build", models["orig"], "--text", models["text"], *opt,
                     "-o", str(tmp_path / "r.ppldref")]) == 2
        assert f"{opt[0]} must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["reference", "build", models["orig"], "--text", models["text"], "--device", "cuda",
                     "-o", str(tmp_path / "r.ppldref")]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err


def test_variant_with_missing_weights_is_refused(built, models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    import shutil

    d = tmp_path / "q_missing"
    shutil.copytree(models["q_small"], d)
    w = load_file(str(d / "model.safetensors"))
    gone = sorted(k for k in w if k.startswith("model.layers.1."))
    save_file({k: v for k, v in w.items() if k not in gone}, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert main(["eval", built["ref"], str(d), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"lacks {len(gone)} of the model's weights" in err and gone[0] in err


def test_variant_with_a_smaller_vocabulary_or_too_few_positions_is_refused_before_its_forward(
        built, models, tmp_path, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "small_vocab")
    tok.save_pretrained(tmp_path / "small_vocab")
    assert main(["eval", built["ref"], str(tmp_path / "small_vocab"), "--no-progress"]) == 2
    assert "beyond the model's vocabulary (16 embeddings)" in capsys.readouterr().err
    opt = OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                    max_position_embeddings=16, word_embed_proj_dim=32)
    OPTForCausalLM(opt).save_pretrained(tmp_path / "opt16")
    tok.save_pretrained(tmp_path / "opt16")
    assert main(["eval", built["ref"], str(tmp_path / "opt16"), "--no-progress"]) == 2
    assert "exceed the model's max_position_embeddings = 16 (learned positions" in capsys.readouterr().err


def test_markdown_escapes_pipes_in_names(built, models, capsys):
    root = built["root"]
    (root / "a|b").symlink_to(models["q_small"], target_is_directory=True)
    out = _eval_out(capsys, {"ref": built["ref"], "v": str(root / "a|b")}, ["v"], "--format", "markdown")
    rows = [ln for ln in out.splitlines() if ln.startswith("| ")]
    cells = lambda ln: [c for c in ln.replace("\\|", "\0").split("|")][1:-1]  # noqa: E731
    assert len(cells(rows[1])) == len(cells(rows[0])) and rows[1].startswith("| a\\|b |")


def test_tied_weights_listed_missing_are_not_refused():
    from ppldelta.hf._load import _untied

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    assert _untied(m, ["lm_head.weight"]) == []  # shares the loaded embedding's storage
    assert _untied(m, ["lm_head.weight", "model.norm.weight"]) == ["model.norm.weight"]
    untied = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "tie_word_embeddings": False}))
    assert _untied(untied, ["lm_head.weight"]) == ["lm_head.weight"]
