"""The per-token log-prob of logits rows on a CUDA device in one fused kernel (Triton): per row
the maximum, the sum of exp(x - max) (float32 exps, float64 accumulation: the precision of the C
row kernel, csrc/logits_template.h) and the target's log-prob, reading each row twice and writing
one float64 per row.  The plain torch path (``log_softmax`` of a float64 copy) writes and reads
the rows several times in float64, which costs a bfloat16 model on an H100 about a third of its
forward throughput.  Used by ``_kl_torch.log_probs_rows_torch`` when Triton is importable and the
rows are on a CUDA device; checked against the C kernel by scripts/gpu_check.py (no GPU in CI)."""
from __future__ import annotations

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:  # no Triton: the torch path
            _KERNEL = False
            return None

        @triton.jit
        def lp_rows(X, T, OUT, V, stride, BLOCK: tl.constexpr):
            row = tl.program_id(0)
            base = X + row.to(tl.int64) * stride
            m = tl.full([BLOCK], float("-inf"), tl.float32)
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m = tl.maximum(m, x)
            mx = tl.max(m, 0)
            acc = tl.zeros([BLOCK], tl.float64)
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                acc += tl.exp(x - mx).to(tl.float64)
            s = tl.sum(acc, 0)
            t = tl.load(T + row)
            xt = tl.load(base + t).to(tl.float64)
            tl.store(OUT + row, (xt - mx.to(tl.float64)) - tl.log(s))

        _KERNEL = lp_rows
    return _KERNEL or None


def usable(rows) -> bool:
    """Whether the fused kernel takes these rows (a 2-D CUDA tensor of a float dtype)."""
    import torch

    return (rows.is_cuda and rows.dim() == 2 and rows.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and rows.shape[0] > 0 and _kernel() is not None)


def log_probs_rows(rows, targets):
    """float64 log-prob of ``targets[i]`` under row ``i`` of ``rows`` (on the rows' device)."""
    import torch

    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n, V = rows.shape
    t = torch.as_tensor(targets)
    if tuple(t.shape) != (n,):
        raise ValueError(f"targets has shape {tuple(t.shape)} for {n} logits rows")
    # the kernel reads row[target]: never out of bounds.  Checked where the targets are (on the
    # host, as run_windows passes them: no device sync per call), before they move
    bad = ((t < 0) | (t >= V)).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        raise ValueError(f"targets[{r}] = {int(t[r])} is outside the vocabulary [0, {V})")
    t = t.to(rows.device, torch.long, non_blocking=True).contiguous()
    out = torch.empty(n, dtype=torch.float64, device=rows.device)
    _kernel()[(n,)](rows, t, out, V, rows.stride(0), BLOCK=2048)
    return out
