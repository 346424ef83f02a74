"""``ppldelta reference build`` and ``ppldelta eval`` end to end in a subprocess, on tiny random
Llama models saved with save_pretrained (no hub): exit codes, strict JSON with each gate's
outcome, the table sorted by KLD, the cached reference of ``eval ORIGINAL QUANT``, and the same
numbers as the Python API."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the model commands need torch; the core's tests run without it
from transformers import LlamaConfig, LlamaForCausalLM

from ppldelta import hf, reffile
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
    assert "K = 8" in capsys.readouterr().out
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
