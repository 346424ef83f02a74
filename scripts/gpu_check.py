"""The accelerator paths of ppldelta.hf, run once on a tiny random Llama (built from a config, no
downloads) on ``--device`` and compared with the same calls on the CPU.  Each check is timed,
records its largest difference and the tolerance it is held to, and never stops the others;
the results go to ``--out``/gpu_check.json and a table on stdout.  Exit status 0 when every
check passed.  ``scripts/gpu_check.sh`` runs it (``--device cpu``: a dry run of the script).

Tolerances: the logits of a float32 model differ between a GPU and the CPU by the rounding of
their matmuls (reduction orders, not TF32: torch leaves TF32 off for float32 matmuls), about
1e-6 relative on logits of size ~1; log-probs and KL inherit that.  Where both sides get the
very same logits (the torch twins of the C kernels), the tolerances are the twins' own."""
import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np


def _max_abs(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    both_nan = np.isnan(a) & np.isnan(b)
    d = np.abs(np.where(both_nan, 0.0, a - b))
    return float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0


class Checks:
    def __init__(self):
        self.rows = []

    def run(self, name, fn, tol=None):
        t = time.perf_counter()
        row = {"check": name, "tolerance": tol}
        try:
            got = fn()
            info = got if isinstance(got, dict) else {"max_abs_diff": got}
            row.update(info)
            diff = info.get("max_abs_diff")
            ok = info.get("ok", True)
            if tol is not None and diff is not None:
                ok = ok and diff <= tol
            row["status"] = "ok" if ok else "FAIL"
        except Exception as e:  # noqa: BLE001 - every check reports, none stops the rest
            row["status"] = "ERROR"
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=8)
        row["seconds"] = round(time.perf_counter() - t, 3)
        self.rows.append(row)
        diff = row.get("max_abs_diff")
        print(f"[{row['status']:>5}] {name:<52} diff {diff if diff is not None else '-'!s:<12} "
              f"tol {tol!s:<8} {row['seconds']:.2f} s {row.get('error', '')}", flush=True)
        return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ppldelta
    from ppldelta import hf, refstats
    from ppldelta.hf import _kl_torch, _ref_torch, _run

    dev = torch.device(a.device)
    env = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "device": str(dev), "python": sys.version.split()[0], "ppldelta": getattr(ppldelta, "__version__", "?")}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    print(json.dumps(env))
    torch.manual_seed(0)
    V = 512
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cpu_model = LlamaForCausalLM(cfg).eval()
    torch.manual_seed(1)
    cpu_quant = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a "quantized" variant: the original, perturbed
        for p, q in zip(cpu_model.parameters(), cpu_quant.parameters()):
            q.copy_(p + 0.02 * torch.randn_like(p))
    dev_model = LlamaForCausalLM(cfg).eval().to(dev)
    dev_model.load_state_dict(cpu_model.state_dict())
    dev_quant = LlamaForCausalLM(cfg).eval().to(dev)
    dev_quant.load_state_dict(cpu_quant.state_dict())
    ids = torch.randint(3, V, (1000,), generator=torch.Generator().manual_seed(2))
    c = Checks()
    LP_TOL = 1e-4  # log-probs of the same model on two devices (float32 matmuls)

    settings = {"sliding": dict(max_length=128, stride=48), "hf": dict(max_length=128, stride=48),
                "llama.cpp": dict(max_length=128, bos_token_id=1), "gptq": dict(max_length=128),
                "window-mean": dict(max_length=128, stride=48)}
    for proto, kw in settings.items():
        def score_check(proto=proto, kw=kw):
            a_, pa = hf.score(cpu_model, ids, protocol=proto, batch_size=3, progress=False, **kw)
            b_, pb = hf.score(dev_model, ids, protocol=proto, batch_size=3, progress=False, **kw)
            if pa.to_dict() != pb.to_dict():
                raise AssertionError(f"Protocol records differ: {pa.to_dict()} vs {pb.to_dict()}")
            return {"max_abs_diff": _max_abs(a_, b_), "n": int(len(a_))}
        c.run(f"score {proto} {dev.type} vs cpu", score_check, LP_TOL)

    def batch_invariance():
        lp1, _ = hf.score(dev_model, ids, max_length=128, stride=48, batch_size=1, progress=False)
        lp4, _ = hf.score(dev_model, ids, max_length=128, stride=48, batch_size=4, progress=False)
        return _max_abs(lp1, lp4)
    c.run(f"score {dev.type} batch_size 1 vs 4", batch_invariance, LP_TOL)

    def modes(fn):  # fn() under overlap off, on (the worker on its own stream), on (one stream)
        real, side = _run.run_windows, _run.SIDE_STREAM
        out = []
        for ov, ss in ((False, True), (True, True), (True, False)):
            _run.run_windows = lambda *x, ov=ov, **k: real(*x, **{**k, "overlap": ov})
            _run.SIDE_STREAM = ss
            try:
                out.append(fn())
            finally:
                _run.run_windows, _run.SIDE_STREAM = real, side
        return out

    def overlap_same_bits():  # the worker-thread overlap and its stream must not change a bit
        out = modes(lambda: hf.score(dev_model, ids, max_length=128, stride=48, batch_size=2,
                                     progress=False)[0])
        return {"max_abs_diff": max(_max_abs(out[0], o) for o in out[1:]),
                "ok": all(np.array_equal(out[0], o) for o in out[1:])}
    c.run(f"score {dev.type} overlap off / on / on one stream (same bits)", overlap_same_bits, 0.0)

    def overlap_same_file():  # a reference file and a comparison, the same bytes in every mode
        def build():
            path = os.path.join(tempfile.mkdtemp(prefix="ppldelta-gpu-modes-"), "r.ppldref")
            hf.build_reference(dev_model, input_ids=ids, out=path, max_length=128, stride=48, batch_size=2,
                               progress=False, resume=False)
            rep = hf.evaluate_against_reference(dev_quant, path, batch_size=2, progress=False, n_bootstrap=50)
            d = rep.to_dict() if hasattr(rep, "to_dict") else rep
            d["protocol"]["notes"].pop("reference", None)  # the file's path
            return open(path, "rb").read(), json.dumps(d, sort_keys=True, default=str)
        out = modes(build)
        return {"ok": all(o == out[0] for o in out[1:]), "file_bytes": len(out[0][0])}
    c.run(f"build_reference + evaluate {dev.type} overlap modes (same bytes)", overlap_same_file)

    with torch.no_grad():
        lo_c = cpu_model(ids[None, :200]).logits[0, :-1]
        lq_c = cpu_quant(ids[None, :200]).logits[0, :-1]
    lo_d, lq_d, t = lo_c.to(dev), lq_c.to(dev), ids[1:200]

    c.run(f"log_probs_rows {dev.type} twin vs C kernel (same logits)",
          lambda: _max_abs(_kl_torch.log_probs_rows(lo_d, t), ppldelta.token_log_probs(lo_c, t)), 1e-6)

    def fused_rows():  # the Triton kernel against the C kernel on the same rows, many shapes
        from ppldelta.hf import _fused

        g = torch.Generator().manual_seed(0)
        diffs = {"used": float(_fused.usable(torch.zeros(1, 8, device=dev)))}
        for V in (7, 2048, 2049, 32000, 151936):
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                for scale in (1.0, 8.0, 30.0):
                    x = (torch.randn(64, V, generator=g) * scale).to(dt)
                    x[3, : V // 2] = float("-inf")
                    tt = torch.randint(0, V, (64,), generator=g)
                    tt[3] = V - 1
                    mine = _kl_torch.log_probs_rows(x.to(dev), tt)
                    ref = ppldelta.token_log_probs(x.float().numpy(), tt.numpy())
                    diffs[f"V{V}.{str(dt)[6:]}.x{scale:g}"] = _max_abs(mine, ref)
        refused = 0  # a target outside the vocabulary is a ValueError, never a read out of bounds
        for bad in (-1, 512):
            try:
                _kl_torch.log_probs_rows(torch.zeros(4, 512, device=dev), torch.tensor([0, 1, bad, 2]))
            except ValueError as e:
                refused += "targets[2]" in str(e)
        return {"max_abs_diff": max(v for k, v in diffs.items() if k != "used"), "diffs": diffs,
                "ok": refused == 2}
    c.run(f"fused log-prob kernel {dev.type} vs C kernel (64 rows x 45 shapes)", fused_rows, 1e-6)

    def kl_twin():
        mine, ref = _kl_torch.kl_stats(lo_d, lq_d), ppldelta.kl_divergence(lo_c, lq_c)
        same = all(np.array_equal(mine[k], ref[k]) for k in ("same_top1", "top1_in_top5", "top1_in_top10"))
        return {"max_abs_diff": _max_abs(mine["kld"], ref["kld"]), "ok": same}
    c.run(f"kl_stats {dev.type} twin vs C kernel (same logits)", kl_twin, 2e-5)

    def compare_check():
        reps = [hf.compare_models(o, q, ids, max_length=128, stride=48, batch_size=3, progress=False,
                                  n_bootstrap=50) for o, q in ((cpu_model, cpu_quant), (dev_model, dev_quant))]
        d = [r.to_dict() if hasattr(r, "to_dict") else r for r in reps]
        keys = [("kld", "mean"), ("ppl_ratio", "value")]
        diffs = {}
        for k1, k2 in keys:
            try:
                diffs[f"{k1}.{k2}"] = abs(float(d[0][k1][k2]) - float(d[1][k1][k2]))
            except (KeyError, TypeError):
                pass
        agree = abs(float(d[0]["same_top1"]["pct"]) - float(d[1]["same_top1"]["pct"]))
        return {"max_abs_diff": max(diffs.values(), default=0.0), "diffs": diffs, "same_top1_pct_diff": agree,
                "ok": agree <= 1.0}
    c.run(f"compare_models {dev.type} vs cpu", compare_check, 1e-4)

    tmp = tempfile.mkdtemp(prefix="ppldelta-gpu-check-")

    def reference_check():
        outs = {}
        for name, m, q in (("cpu", cpu_model, cpu_quant), ("dev", dev_model, dev_quant)):
            path = os.path.join(tmp, f"ref-{name}.ppldref")
            hf.build_reference(m, input_ids=ids, out=path, max_length=128, stride=48, batch_size=3,
                               device=None, progress=False, resume=False)
            outs[name] = hf.evaluate_against_reference(q, path, batch_size=3, progress=False, n_bootstrap=50)
        d = [r.to_dict() if hasattr(r, "to_dict") else r for r in outs.values()]
        diffs = {}
        for k1, k2 in (("kld", "mean"), ("ppl_ratio", "value")):
            try:
                diffs[f"{k1}.{k2}"] = abs(float(d[0][k1][k2]) - float(d[1][k1][k2]))
            except (KeyError, TypeError):
                pass
        return {"max_abs_diff": max(diffs.values(), default=0.0), "diffs": diffs}
    c.run(f"build_reference + evaluate_against_reference {dev.type} vs cpu", reference_check, 1e-4)

    def refstats_twins():
        rec_c = refstats.summarize(lo_c, t)
        rec_d = _ref_torch.summarize_torch(lo_d, t)
        diffs, info = {}, {}
        for f in rec_c.dtype.names:
            if f in ("pids", "plps"):  # a probe may move where the GPU's running sum rounds otherwise
                info[f + "_mismatch_fraction"] = float(np.mean(rec_c[f] != rec_d[f]))
            elif np.issubdtype(rec_c[f].dtype, np.floating):
                diffs[f] = _max_abs(rec_c[f], rec_d[f])
            else:
                diffs[f] = 0.0 if np.array_equal(rec_c[f], rec_d[f]) else float("inf")
        o_c, o_d = refstats.compare(lq_c, rec_c), _ref_torch.compare_torch(lq_d, rec_c)
        for k, v in o_c.items():
            if v is not None and o_d.get(k) is not None:
                v2 = o_d[k]
                diffs["compare." + k] = (_max_abs(v, v2) if np.asarray(v).dtype != bool
                                         else float(np.mean(np.asarray(v) != np.asarray(v2))))
        return {"max_abs_diff": max(diffs.values(), default=0.0), "diffs": diffs, **info}
    c.run(f"refstats torch twins {dev.type} vs cpu (same logits)", refstats_twins, 1e-5)

    failed = [r for r in c.rows if r["status"] != "ok"]
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump({"env": env, "checks": c.rows, "failed": len(failed)}, f, indent=1, default=str)
    print(f"\n{len(c.rows) - len(failed)} of {len(c.rows)} checks ok" + (f"; not ok: {[r['check'] for r in failed]}"
                                                                        if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
