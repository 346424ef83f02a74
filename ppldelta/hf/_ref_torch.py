"""Torch twins of ppldelta.refstats for logits on an accelerator: ``summarize_torch`` and
``compare_torch`` compute the reductions over each full logits row where the logits are (float64
on the device, in row chunks) and move only O(K) values per token to the host, where the bounds
are finished by the same NumPy code as the CPU path (``refstats.finish``).  CPU tensors go to
the CPU functions; MPS (no float64) copies each row chunk to the CPU path.  Tested against the
CPU functions (tests/test_refstats_torch.py)."""
from __future__ import annotations

import numpy as np

from .. import refstats
from ._kl_torch import log_probs_rows


def _host_side(x):
    """CPU and MPS tensors, and arrays that are no tensor (NumPy: llama.cpp's logits), go to the
    CPU functions."""
    return getattr(getattr(x, "device", None), "type", "cpu") in ("cpu", "mps")


def _host_threads(x):
    """Threads of the C kernels for host rows: torch's (``_kl_torch.cpu_threads``) for a tensor,
    one for a NumPy array."""
    from ._kl_torch import cpu_threads

    return cpu_threads(x) if hasattr(x, "numel") and callable(x.numel) else 1


def _rows(x):
    V = x.shape[-1]
    return x.reshape(-1, V), V


def _step(V):
    return max(1, refstats.ROW_BUDGET // max(1, V))


def _host(x):
    return x.detach().to("cpu").numpy()


def _topk_sorted_torch(x, k):
    """ids of the k largest by decreasing value, ties by smaller id (refstats._topk_sorted)."""
    import torch

    n, V = x.shape
    if k >= V:
        idx = torch.arange(V, device=x.device).expand(n, V).clone()
    else:
        vals, idx = torch.topk(x, k, dim=1)
        v = vals[:, -1:]
        fix = ((x == v).sum(1) > (vals == v).sum(1)).nonzero().flatten().tolist()
        for r in fix:
            gt = (x[r] > v[r]).nonzero().flatten()
            eq = (x[r] == v[r]).nonzero().flatten()[:k - gt.numel()]
            idx[r] = torch.cat([gt, eq])
    idx, _ = torch.sort(idx, dim=1)
    vals = torch.gather(x, 1, idx)
    _, order = torch.sort(-vals, dim=1, stable=True)
    return torch.gather(idx, 1, order)


def summarize_torch(logits, targets, k: int = refstats.DEFAULT_K, *, probes: int = refstats.DEFAULT_PROBES,
                    positions=None, ignore_index=-100):
    """``refstats.summarize`` for a logits tensor on any device (targets: one id per row, none
    equal to ignore_index; positions: the rows' token positions, as there); the records come
    back as a NumPy structured array."""
    if _host_side(logits):
        return refstats.summarize(logits, targets, k, probes=probes, positions=positions,
                                  ignore_index=ignore_index, threads=_host_threads(logits))
    return _summarize_device(logits, targets, k, ignore_index, probes=probes, positions=positions)


def _probe_positions_torch(cum, m, offsets):
    """refstats.probe_positions on the device (offsets: the rows' probe offsets, float64)."""
    import torch

    V = cum.shape[1]
    tot = cum[:, -1:]
    thr = (torch.arange(m, device=cum.device, dtype=torch.float64) + offsets[:, None]) / m * tot
    pos = torch.searchsorted(cum.contiguous(), thr.contiguous(), right=True).clamp_(max=V - 1)
    return torch.where(tot > 0, pos, torch.full_like(pos, -1))


def _summarize_device(logits, targets, k, ignore_index=-100, probes=refstats.DEFAULT_PROBES, positions=None):
    """The device path of summarize_torch (any device; tests run it on CPU tensors)."""
    import torch

    x_all, V = _rows(logits.detach())
    t = torch.as_tensor(targets).reshape(-1).to(logits.device, torch.long)
    if t.numel() != x_all.shape[0]:
        raise ValueError(f"targets has {t.numel()} values, logits {x_all.shape[0]} rows")
    u_all = refstats.probe_offsets(np.arange(t.numel()) if positions is None else positions)
    if u_all.size != t.numel():
        raise ValueError(f"positions has {u_all.size} values for {t.numel()} rows")
    u_all = torch.as_tensor(u_all, dtype=torch.float64, device=logits.device)
    tn = _host(t)
    refstats._check_scored(tn, ignore_index)
    if ((tn < 0) | (tn >= V)).any():
        raise ValueError(f"targets outside the vocabulary [0, {V})")
    k = int(k)
    kk = min(k, V)
    m = int(probes)
    out = np.zeros(t.numel(), dtype=refstats.RECORD_DTYPE(k, m))
    out["token"] = tn
    step = _step(V)
    with torch.no_grad():
        for r0 in range(0, t.numel(), step):
            x = x_all[r0:r0 + step].double()
            if torch.isnan(x).any() or (x == float("inf")).any() or (x == float("-inf")).all(1).any():
                raise ValueError("logits rows must be free of NaN and +inf, and not all -inf")
            out["lp"][r0:r0 + step] = log_probs_rows(x_all[r0:r0 + step], tn[r0:r0 + step])
            d = x - x.max(1, keepdim=True).values
            e = d.exp()
            ls = e.sum(1, keepdim=True).log()
            a = d - ls
            p = a.exp()
            ent = -torch.where(p > 0, p * a, torch.zeros_like(a)).sum(1)
            lpmin = d.min(1).values - ls[:, 0]
            ids = _topk_sorted_torch(x, kk)
            lps = torch.gather(a, 1, ids).float()
            if kk == V:
                tail = torch.full_like(ent, float("-inf"))
            else:
                e.scatter_(1, ids, 0.0)
                tail = e.sum(1).log() - ls[:, 0]
            sl = slice(r0, r0 + x.shape[0])
            out["entropy"][sl], out["lp_min"][sl], out["tail"][sl] = _host(ent), _host(lpmin), _host(tail)
            out["ids"][sl, :kk], out["lps"][sl, :kk] = _host(ids), _host(lps)
            if kk < k:
                out["ids"][sl, kk:] = -1
                out["lps"][sl, kk:] = -np.inf
            if m and kk < V:
                pos = _probe_positions_torch(torch.cumsum(e, 1), m, u_all[r0:r0 + x.shape[0]])
                pl = torch.gather(a, 1, pos.clamp(min=0))
                out["pids"][sl] = _host(pos)
                out["plps"][sl] = _host(torch.where(pos >= 0, pl, torch.full_like(pl, float("-inf"))).float())
            elif m:
                out["pids"][sl], out["plps"][sl] = -1, -np.inf
    return out


def _parts_torch(y, ids_np, M, pids_np=None):
    """Stage 1 of ``refstats.compare`` on the device (the C kernel ``_core.compare_rows`` on the
    CPU): the dict of O(K + M) values per row, on the host."""
    import torch

    n, V = y.shape
    K = ids_np.shape[1]
    Mv = min(M, V)
    dev = y.device
    ids = torch.as_tensor(ids_np, device=dev, dtype=torch.long)
    valid = ids >= 0
    idc = torch.where(valid, ids, torch.zeros_like(ids))
    ninf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
    pinf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    d = y - y.max(1, keepdim=True).values
    b = d - d.exp().sum(1, keepdim=True).log()
    q = b.exp()
    qb = torch.where(q > 0, q * b, zero)
    fin = b > ninf
    tm = torch.ones((n, V), dtype=torch.bool, device=dev)
    rows = torch.arange(n, device=dev)[:, None].expand(n, K)
    tm[rows[valid], idc[valid]] = False
    out = {"V": V, "M": M}
    bS = torch.gather(b, 1, idc)
    out["bS"] = _host(torch.where(valid, bS, torch.full_like(bS, float("nan"))))
    if pids_np is not None:
        pids = torch.as_tensor(pids_np, device=dev, dtype=torch.long)
        bP = torch.gather(b, 1, pids.clamp(min=0))
        out["bP"] = _host(torch.where(pids >= 0, bP, torch.full_like(bP, float("nan"))))
    out["HQ"] = _host(-qb.sum(1))
    out["zq"] = _host(torch.where(q > 0, q * (1 + b.abs()) ** 2, zero).sum(1))
    out["bmax"] = _host(torch.where(fin, -b, zero).max(1).values)
    out["nT"] = _host(tm.sum(1))
    out["ninfT"] = _host((tm & ~fin).sum(1))
    qt = torch.where(tm, q, zero)
    out["QT"] = _host(qt.sum(1))
    out["sbT"] = _host(torch.where(tm & fin, b, zero).sum(1))
    out["qbT"] = _host(torch.where(tm, qb, zero).sum(1))
    top, it = torch.topk(torch.where(tm, b, ninf), Mv, dim=1)
    qt.scatter_(1, it, 0.0)
    out["Qbeyond"] = _host(qt.sum(1))
    bot = -torch.topk(-torch.where(tm, b, pinf), Mv, dim=1).values
    out["top"] = refstats._pad(_host(top), M, -np.inf)
    out["bot"] = refstats._pad(_host(bot), M, np.inf)
    out["argmax_q"] = _host(y.argmax(1))  # torch's argmax is the first maximum
    out["rank_q"] = _host((y > torch.gather(y, 1, idc[:, :1])).sum(1))
    return out


def compare_torch(quantized_logits, records):
    """``refstats.compare`` for a logits tensor on any device: same dict of per-token arrays."""
    rec = refstats.check_records(records)
    if _host_side(quantized_logits):
        return refstats.compare(quantized_logits, rec, threads=_host_threads(quantized_logits))
    return _compare_device(quantized_logits, rec)


def _compare_device(quantized_logits, rec):
    """The device path of compare_torch (any device; tests run it on CPU tensors)."""
    import torch

    y_all, V = _rows(quantized_logits.detach())
    n = y_all.shape[0]
    t = refstats.check_rows_fit(rec, n, V)
    M = refstats.tail_m(rec["ids"].shape[1])
    step = _step(V)
    chunks, lq = [], []
    with torch.no_grad():
        for r0 in range(0, n, step):
            y = y_all[r0:r0 + step].double()
            if torch.isnan(y).any() or (y == float("inf")).any() or (y == float("-inf")).all(1).any():
                raise ValueError("logits rows must be free of NaN and +inf, and not all -inf")
            lq.append(log_probs_rows(y_all[r0:r0 + step], t[r0:r0 + step]))
            chunks.append(_parts_torch(y, rec["ids"][r0:r0 + step], M,
                                       rec["pids"][r0:r0 + step] if refstats.n_probes(rec) else None))
    out = refstats.finish(refstats.concat_parts(chunks), rec)
    return refstats.assemble(out, rec["lp"].astype(np.float64), np.concatenate(lq))
