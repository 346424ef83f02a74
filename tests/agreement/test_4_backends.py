"""Same model, same tokens, same protocol, two backends: transformers' float32 forward of the
dequantized GGUF (``ppldelta.hf.score(protocol="llama.cpp")``) against llama.cpp.

- under float32 numerics (the model converted to F32 with llama-quantize, ``-fa off -ctk f32
  -ctv f32``) llama-perplexity's PPL equals ppldelta.hf's within 1e-4 relative, and llama-cpp-python
  run the same way gives per-token log-probs within 2e-3 nats of transformers';
- with llama.cpp's default numerics (quantized matmuls with 8-bit activations, f16 KV cache,
  flash attention) the two differ by more: reported, not asserted."""
import numpy as np
import pytest

import _agree
from conftest import _perplexity_args
from ppldelta import llamacpp

REL_PPL = 1e-4
PER_TOKEN = 2e-3


@pytest.fixture(scope="session")
def f32_model(cfg):
    path = cfg.models / f"{cfg.gguf.stem}.F32.gguf"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        _agree.run([cfg.bin / "llama-quantize", "--allow-requantize", cfg.gguf, tmp, "F32", str(cfg.threads)],
                   cfg.out / "quantize-F32.log")
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def hf_llama_cpp_protocol(cfg, base_run):
    """ppldelta.hf's llama.cpp protocol over the base file's tokens (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppldelta import hf

    tok = AutoTokenizer.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name)
    model = AutoModelForCausalLM.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name, dtype=torch.float32)
    with llamacpp.read_logits_file(base_run[1]) as lf:
        ids = np.asarray(lf.tokens, dtype=np.int64).reshape(-1)
    lp, proto = hf.score(model, ids, protocol="llama.cpp", max_length=512, tokenizer=tok, progress=False)
    return lp, proto, ids


def test_float32_numerics_agree(cfg, f32_model, hf_llama_cpp_protocol, base_run, table):
    import llama_cpp

    lp_hf, proto, ids = hf_llama_cpp_protocol
    assert proto.bos is None, f"this vocabulary adds no BOS; the protocol wrote {proto.bos}"
    ppl_hf = float(np.exp(-lp_hf.mean()))
    log = _agree.run([cfg.bin / "llama-perplexity", "-m", f32_model, "-f", cfg.out / "text.txt",
                      *[a for a in _perplexity_args(cfg) if a not in ("-fa", "on")],
                      "-fa", "off", "-ctk", "f32", "-ctv", "f32"], cfg.out / "perplexity-f32.log")
    v, _ = _agree.parse_final_estimate(log)
    assert ppl_hf == pytest.approx(v.value, rel=REL_PPL), (v.text, ppl_hf)
    table.add("llama-perplexity, F32 model, -fa off -ctk f32 -ctv f32", "llama.cpp (transformers float32)",
              "PPL", v, ppl_hf, f"rel {REL_PPL:g}")
    llama = llama_cpp.Llama(model_path=str(f32_model), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True,
                            flash_attn=False, type_k=0, type_v=0, n_threads=cfg.threads, verbose=False)
    lp_cpp = llamacpp.token_log_probs(llama, ids, n_ctx=512)
    worst = float(np.max(np.abs(lp_cpp - lp_hf)))
    assert worst <= PER_TOKEN, f"largest per-token difference {worst:.2e} nats"
    table.rows.append(_agree.Row("llama-cpp-python, F32 model, f32 KV cache, no flash attention",
                                 "llama.cpp (transformers float32)", "largest per-token |Δ log p| (nats)", "-",
                                 f"{worst:.1e}", "-", f"<= {PER_TOKEN:g}"))


def test_default_numerics_differ(cfg, hf_llama_cpp_protocol, base_run, table):
    lp_hf, _, _ = hf_llama_cpp_protocol
    ppl_hf = float(np.exp(-lp_hf.mean()))
    v, _ = _agree.parse_final_estimate(base_run[0])
    table.add("llama-perplexity (default numerics)", "llama.cpp (transformers float32)", "PPL", v, ppl_hf,
              "reported, not asserted")
    assert abs(np.log(ppl_hf / v.value)) < 0.05  # same model and protocol: backends within 5 %
