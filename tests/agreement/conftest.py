"""The agreement job (``bash .ci/agreement``): ppldelta against llama.cpp, llama-cpp-python,
lm-evaluation-harness and the Hugging Face recipe, on a real model.  Collected only with
PPLDELTA_AGREEMENT=1 (the job sets it, with the paths of the tools it built): the main
``python -m pytest tests`` run skips this directory and needs none of these tools.

Session fixtures run each tool once; the tests compare and record rows of the table that the
job writes to PPLDELTA_AGREEMENT_TABLE (see docs/agreement.md)."""
import os
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PPLDELTA_AGREEMENT") != "1":
    collect_ignore_glob = ["test_*.py"]

sys.path.insert(0, os.path.dirname(__file__))

import _agree  # noqa: E402

_TABLE = _agree.Table()


@pytest.fixture(scope="session")
def cfg():
    c = _agree.Config.from_env()
    c.out.mkdir(parents=True, exist_ok=True)
    return c


@pytest.fixture(scope="session")
def table():
    return _TABLE


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("PPLDELTA_AGREEMENT") != "1" or not _TABLE.rows:
        return
    c = _agree.Config.from_env()
    c.table.parent.mkdir(parents=True, exist_ok=True)
    head = (f"Model: {c.gguf.name} and its requantizations {', '.join(c.variants)}; text: "
            f"{_agree.text_description(c)}; {c.chunks} chunks of 512 tokens for llama.cpp; "
            f"{platform.machine()}, Python {platform.python_version()}.\n")
    c.table.write_text(_TABLE.markdown(head), encoding="utf-8")
    print(f"\nagreement: table written to {c.table}")


# ---------------------------------------------------------------------------- inputs
@pytest.fixture(scope="session")
def text(cfg):
    """(raw text, path of the text file given to llama.cpp's tools)."""
    raw = _agree.read_text(cfg)
    path = cfg.out / "text.txt"
    path.write_text(raw, encoding="utf-8")
    return raw, path


@pytest.fixture(scope="session")
def variants(cfg):
    """{type: path} of the requantized models (cached by type next to the original)."""
    cfg.models.mkdir(parents=True, exist_ok=True)
    out = {}
    for q in cfg.variants:
        path = cfg.models / f"{cfg.gguf.stem}.{q}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            _agree.run([cfg.bin / "llama-quantize", "--allow-requantize", cfg.gguf, tmp, q, str(cfg.threads)],
                       cfg.out / f"quantize-{q}.log")
            tmp.rename(path)
        out[q] = path
    return out


def _perplexity_args(cfg):
    # -b 512: one chunk per batch (n_seq 1), as llama-cpp-python evaluates it; -fa on: the flash
    # attention that llama-cpp-python is asked for (llama-perplexity's default "auto" picks it too)
    return ["-c", "512", "-b", "512", "-t", str(cfg.threads), "-fa", "on", "--chunks", str(cfg.chunks)]


@pytest.fixture(scope="session")
def base_run(cfg, text):
    """llama-perplexity over the text with --kl-divergence-base: (printout, logits file)."""
    kld = cfg.out / "base.kld"
    log = _agree.run([cfg.bin / "llama-perplexity", "-m", cfg.gguf, "-f", text[1],
                      "--kl-divergence-base", kld, *_perplexity_args(cfg)], cfg.out / "perplexity-base.log")
    return log, kld


@pytest.fixture(scope="session")
def kld_runs(cfg, base_run, variants):
    """{type: printout} of llama-perplexity --kl-divergence for each variant."""
    out = {}
    for q, path in variants.items():
        out[q] = _agree.run([cfg.bin / "llama-perplexity", "-m", path, "--kl-divergence-base", base_run[1],
                             "--kl-divergence", *_perplexity_args(cfg)], cfg.out / f"perplexity-kld-{q}.log")
    return out


def make_llama(path):
    """A llama-cpp-python model set up as llama-perplexity runs (n_ctx 512, one chunk per batch,
    flash attention on, f16 KV cache), keeping every position's logits."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True,
                           flash_attn=True, n_threads=int(os.environ.get("PPLDELTA_AGREEMENT_THREADS", "2")),
                           verbose=False)


@pytest.fixture(scope="session")
def base_llama(cfg):
    return make_llama(cfg.gguf)


@pytest.fixture(scope="session")
def tokens(cfg, text, base_llama):
    """llama-cpp-python's tokens of the text as llama-perplexity reads it (-f: one trailing
    newline dropped, escapes processed)."""
    from ppldelta import llamacpp

    data = llamacpp.prompt_bytes(text[0].encode("utf-8"))
    return np.asarray(base_llama.tokenize(data, add_bos=True), dtype=np.int64)
