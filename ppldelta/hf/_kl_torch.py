"""Per-row statistics of logit chunks (log-probs at the targets, KL divergence, top-k agreement):
the C kernels (``ppldelta.logits``) for CPU tensors, and their one torch twin for tensors on an
accelerator, so that (tokens x vocab) logits never cross the bus.  The twin is tested against
the C kernels (tests/test_hf.py::test_kl_stats_torch_matches_c_kernels)."""
from __future__ import annotations

import numpy as np

from .. import logits as _logits

#: Elements of a (rows x vocab) temporary per row chunk (64 MiB in float32, 128 MiB in float64):
#: bounds the memory of the log-softmax / KL step independently of the window length and the vocabulary.
ROW_BUDGET = 1 << 24

KEYS = ("kld", "same_top1", "top1_in_top5", "top1_in_top10",
        "quantized_top1_in_original_top5", "quantized_top1_in_original_top10")


def log_probs_rows(logits_rows, targets):
    """log_softmax(logits_rows)[row, target] as float64 numpy: the one computation of per-token
    log-probs behind every entry point (score, token_log_probs, evaluate_perplexity,
    compare_models, quantization_report), so that they agree bit for bit on the same logits.
    CPU logits go through the C kernel (``ppldelta.token_log_probs``, float64 accumulation);
    logits on an accelerator are upcast to float64 there (MPS, which has no float64, copies the
    row chunk to the CPU kernel)."""
    if logits_rows.device.type in ("cpu", "mps"):
        return _logits.token_log_probs(logits_rows, targets, threads=cpu_threads(logits_rows))
    return log_probs_rows_torch(logits_rows, targets)


#: Logits per thread of the C row kernels (about 0.5 ms of work): smaller chunks run on one
#: thread, since starting threads (and waking cores that torch's pool keeps busy) costs more.
THREAD_GRAIN = 1 << 20


def cpu_threads(rows):
    """Threads of the C row kernels for a chunk ``rows`` (shape (..., vocab)): torch's intra-op
    thread count (what the forward uses; ``torch.set_num_threads`` bounds both), fewer for a
    small chunk.  Rows are independent, so the values do not depend on it."""
    import torch

    return max(1, min(torch.get_num_threads(), rows.numel() // THREAD_GRAIN))


def log_probs_rows_torch(logits_rows, targets):
    """The accelerator branch of :func:`log_probs_rows`: float64 log-softmax where the logits are."""
    import torch

    from . import _fused

    dev = logits_rows.device
    if _fused.usable(logits_rows):  # one fused kernel per row chunk (Triton on CUDA)
        return _fused.log_probs_rows(logits_rows, targets).cpu().numpy()
    t = torch.as_tensor(targets).to(dev, torch.long, non_blocking=dev.type == "cuda")
    lp = torch.log_softmax(logits_rows.double(), dim=-1).gather(-1, t[:, None]).squeeze(-1)
    return lp.cpu().numpy()


def kl_stats(lo, lq):
    """Per-row KL and top-k agreement of two logit chunks: the C kernels for CPU tensors, torch
    otherwise (log-probs come from :func:`log_probs_rows`)."""
    if lo.device.type == "cpu" and lq.device.type == "cpu":
        return _logits.kl_divergence(lo, lq, threads=cpu_threads(lo))
    return kl_stats_torch(lo, lq)


def kl_stats_torch(logits_o, logits_q):
    """Torch twin of ``ppldelta.kl_divergence`` (used for logits that are not on the CPU):
    per row KL(P_o || P_q) (nats, clamped at 0), same_top1, top1_in_top5/10 (the original's
    argmax among the quantized model's 5/10 largest logits, ties not counted against it) and
    quantized_top1_in_original_top5/10 (the other way round).  float32 on the logits' device,
    in row chunks; numpy out."""
    import torch

    lead = tuple(logits_o.shape[:-1])
    V = logits_o.shape[-1]
    if tuple(logits_q.shape) != tuple(logits_o.shape):
        raise ValueError(f"shape mismatch: {tuple(logits_o.shape)} vs {tuple(logits_q.shape)}")
    lo_all = logits_o.reshape(-1, V)
    lq_all = logits_q.reshape(-1, V)
    n = lo_all.shape[0]
    parts = {k: [] for k in KEYS}
    rows = max(1, ROW_BUDGET // max(1, V))
    with torch.no_grad():
        for r0 in range(0, n, rows):
            a = lo_all[r0:r0 + rows].float()
            b = lq_all[r0:r0 + rows].to(a.device).float()
            la = torch.log_softmax(a, dim=-1)
            lb = torch.log_softmax(b, dim=-1)
            kld = (la.exp() * (la - lb)).sum(-1).clamp_min_(0.0)
            am = a.argmax(-1)
            bm = b.argmax(-1)
            rank = (b > b.gather(-1, am[:, None])).sum(-1)
            rank_a = (a > a.gather(-1, bm[:, None])).sum(-1)
            parts["kld"].append(kld.to("cpu", torch.float64))
            parts["same_top1"].append((am == bm).cpu())
            for k in (5, 10):
                parts[f"top1_in_top{k}"].append((rank < k).cpu())
                parts[f"quantized_top1_in_original_top{k}"].append((rank_a < k).cpu())
            del a, b, la, lb
    out = {}
    for k, v in parts.items():
        arr = torch.cat(v).numpy() if v else np.zeros(0, dtype=bool if k != "kld" else np.float64)
        out[k] = arr.reshape(lead)
    return out
