"""ppldelta vs lm-evaluation-harness, run for real (``lm-eval run --model hf``, no hub) on the
GGUF model as transformers loads it (run in float64: lm-eval's log-softmax and sums then carry no
float32 rounding), original and one requantized variant, over two local tasks
(tasks/*.yaml: a loglikelihood_rolling task on the text, a multiple-choice task made from it):

- ``ppldelta.lmeval`` readers of the ``--log_samples`` files reproduce the reported
  word_perplexity, byte_perplexity, bits_per_byte, acc and acc_norm;
- flips and McNemar's exact p come from the paired samples (``paired_multiple_choice`` +
  ``choice_flips``), checked against a count and a binomial test written here;
- ppldelta's own token-level computation (``ppldelta.hf.score``) equals lm-eval's rolling
  log-likelihood of every document to 1e-6."""
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import _agree
from ppldelta import choice_flips, lmeval

TASKS = Path(__file__).parent / "tasks"
N_DOCS, DOC_CHARS, N_MC = 6, 2500, 60


def _documents(raw: str) -> list:
    """N_DOCS documents of about DOC_CHARS characters: whole paragraphs from the start."""
    docs, cur = [], []
    for para in raw.split("\n\n"):
        if not para.strip():
            continue
        cur.append(para.strip("\n"))
        if sum(len(p) for p in cur) >= DOC_CHARS:
            docs.append("\n\n".join(cur))
            cur = []
            if len(docs) == N_DOCS:
                break
    return docs


def _questions(raw: str) -> list:
    """N_MC next-word questions from sentences of the text: context = a sentence's first words,
    choices = the true next word and three words from elsewhere (deterministic)."""
    words = sorted({w for w in re.findall(r"\b[a-z]{4,12}\b", raw)})
    out = []
    for sent in re.split(r"(?<=[.!?])\s+", raw.replace("\n", " ")):
        toks = sent.split()
        if len(toks) < 10 or not all(re.fullmatch(r"[A-Za-z,;']+", t) for t in toks[:8]):
            continue
        k = len(toks) // 2
        gold = toks[k].strip(",;.")
        if not re.fullmatch(r"[a-z]{4,12}", gold):
            continue
        i = len(out)
        h = sum(map(ord, sent))
        others = [w for w in (words[(h + j * 7919) % len(words)] for j in range(1, 20)) if w != gold]
        choices = others[:3]
        choices.insert(i % 4, gold)
        if len(set(choices)) < 4:
            continue
        out.append({"context": " ".join(toks[:k]), "choices": choices, "answer": i % 4})
        if len(out) == N_MC:
            break
    return out


@pytest.fixture(scope="session")
def task_dir(cfg, text):
    d = cfg.out / "lmeval-tasks"
    d.mkdir(parents=True, exist_ok=True)
    docs, qs = _documents(text[0]), _questions(text[0])
    assert len(docs) >= 2 and len(qs) >= 20, (
        f"the text gives {len(docs)} documents of {DOC_CHARS} characters and {len(qs)} questions: "
        "pass a longer PPLDELTA_AGREEMENT_TEXT")
    with open(d / "rolling.jsonl", "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    with open(d / "mc.jsonl", "w") as f:
        for q in qs:
            f.write(json.dumps(q) + "\n")
    for y in TASKS.glob("*.yaml"):
        (d / y.name).write_text(y.read_text().replace("DATA_DIR", str(d)))
    return d


def _lm_eval(cfg, task_dir, model: Path, name: str, tasks: str = "ppldelta_rolling,ppldelta_mc") -> Path:
    out = cfg.out / f"lmeval-{name}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(cfg.out / "hf-datasets-cache"), TOKENIZERS_PARALLELISM="false")
    _agree.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                f"pretrained={model.parent},gguf_file={model.name},dtype=float64", "--tasks",
                tasks, "--include_path", task_dir, "--batch_size", "1",
                "--device", "cpu", "--log_samples", "--output_path", out],
               cfg.out / f"lmeval-{name}.log", env=env, timeout=3600)
    return out


@pytest.fixture(scope="session")
def lmeval_runs(cfg, task_dir, variants):
    q = list(variants)[-1]  # the coarser variant: more flips
    return {"original": _lm_eval(cfg, task_dir, cfg.gguf, "original"),
            q: _lm_eval(cfg, task_dir, variants[q], q)}


def _results(out: Path) -> dict:
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results_*.json under {out}"
    return json.loads(files[-1].read_text())["results"]


def test_readers_reproduce_reported_metrics(lmeval_runs, table):
    for name, out in lmeval_runs.items():
        res = _results(out)
        ll, words, nbytes, ids = lmeval.rolling_loglikelihoods(lmeval.read_samples(out, "ppldelta_rolling"))
        assert (words > 0).all() and (nbytes > 0).all()
        s_ll, s_w, s_b = sum(ll.tolist()), sum(words.tolist()), sum(nbytes.tolist())  # lm-eval's order
        ours = {"word_perplexity": math.exp(-s_ll / s_w), "byte_perplexity": math.exp(-s_ll / s_b),
                "bits_per_byte": -s_ll / s_b / math.log(2)}
        for metric, value in ours.items():
            reported = res["ppldelta_rolling"][f"{metric},none"]
            assert value == pytest.approx(reported, rel=1e-13), (name, metric, reported, value)
            table.add("lm-eval", f"loglikelihood_rolling ({name})", metric, reported, value, "rel 1e-13")
        recs = lmeval.read_samples(out, "ppldelta_mc")
        for norm, metric in [(False, "acc"), (True, "acc_norm")]:
            scores, answers, _ = lmeval.multiple_choice_scores(recs, normalize=norm)
            acc = float(np.mean(scores.argmax(axis=1) == answers))
            reported = res["ppldelta_mc"][f"{metric},none"]
            assert acc == reported, (name, metric, reported, acc)
            table.add("lm-eval", f"multiple_choice ({name})", metric, reported, acc, "equal")


def test_flips_and_mcnemar_from_paired_samples(lmeval_runs, table):
    (o_name, o_dir), (q_name, q_dir) = lmeval_runs.items()
    pair = lmeval.paired_multiple_choice(o_dir, q_dir, "ppldelta_mc")
    rep = choice_flips(pair.orig_scores, pair.quant_scores, pair.answers)
    # oracle: lm-eval's own per-document acc of each run, paired by doc_id
    acc = {}
    for name, d in lmeval_runs.items():
        acc[name] = {int(r["doc_id"]): float(r["acc"]) for r in lmeval.read_samples(d, "ppldelta_mc")}
    ids = sorted(acc[o_name])
    co = np.array([acc[o_name][i] for i in ids]) == 1
    cq = np.array([acc[q_name][i] for i in ids]) == 1
    b, c = int((co & ~cq).sum()), int((~co & cq).sum())
    assert (rep.right_to_wrong, rep.wrong_to_right) == (b, c)
    assert rep.original_accuracy == _results(o_dir)["ppldelta_mc"]["acc,none"]
    assert rep.quantized_accuracy == _results(q_dir)["ppldelta_mc"]["acc,none"]
    from scipy.stats import binomtest

    p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    assert rep.mcnemar_p == pytest.approx(p, rel=1e-9)
    table.add("lm-eval (paired samples)", f"multiple_choice, original vs {q_name}", "McNemar exact p",
              p, rep.mcnemar_p, "rel 1e-9 vs scipy binomtest")
    table.notes.append(f"lm-eval multiple choice, original vs {q_name}: {rep.summary()}.")


def test_token_level_equals_lm_eval_rolling(cfg, lmeval_runs, task_dir, table):
    """ppldelta.hf.score over [prefix] + document tokens (one window, as lm-eval's rolling
    windows are for documents shorter than the model's context) sums to lm-eval's loglikelihood."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppldelta import hf

    out = lmeval_runs["original"]
    ll, _, _, ids = lmeval.rolling_loglikelihoods(lmeval.read_samples(out, "ppldelta_rolling"))
    docs = [json.loads(line)["text"] for line in (task_dir / "rolling.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name)
    model = AutoModelForCausalLM.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name, dtype=torch.float64)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # HFLM.prefix_token_id
    ours = {}
    for doc_id in ids:
        t = tok(docs[doc_id], add_special_tokens=False)["input_ids"]
        x = np.array([prefix] + list(t), dtype=np.int64)
        lp, _ = hf.score(model, x, protocol="sliding", max_length=x.size, stride=x.size, progress=False)
        ours[int(doc_id)] = float(lp.sum())

    def rels(ll, ids):
        return {int(d): abs(ours[int(d)] - v) / abs(v) for v, d in zip(ll.tolist(), ids)}

    def report(ll, ids):
        return "; ".join(f"doc {d}: lm-eval {v!r}, ppldelta {ours[int(d)]!r} (rel {r:.2e})"
                         for (d, r), v in zip(rels(ll, ids).items(), ll.tolist()))

    rel = rels(ll, ids)
    if max(rel.values()) > 1e-6:
        # Seen once in CI, never reproduced (60+ lm-eval runs and first forwards, every thread
        # count, under load, with scrambled heap memory): lm-eval's first document alone, the
        # process's first forward, 2.7e-5 off, while every later document and every multiple-choice
        # score of the same process matched to 1e-14.  A second lm-eval process tells such a one-off
        # from a real difference: the test passes only if that run matches at the same tolerance,
        # and the table keeps the first run's numbers (docs/agreement.md).
        first = report(ll, ids)
        ll2, _, _, ids2 = lmeval.rolling_loglikelihoods(lmeval.read_samples(
            _lm_eval(cfg, task_dir, cfg.gguf, "original-rerun", tasks="ppldelta_rolling"), "ppldelta_rolling"))
        rel2 = rels(ll2, ids2)
        assert max(rel2.values()) <= 1e-6, f"first lm-eval run: {first}; second run: {report(ll2, ids2)}"
        table.notes.append(f"lm-eval's rolling log-likelihoods differed from ppldelta's in its first run "
                           f"({first}) and equalled them in a second lm-eval process (largest relative "
                           f"difference {max(rel2.values()):.1e}): a one-off of that lm-eval process.")
        rel = rel2
    worst = max(rel.values())
    digits = "all" if worst == 0 else str(max(0, int(math.floor(-math.log10(worst)))))
    table.rows.append(_agree.Row("lm-eval", "loglikelihood_rolling (original), per document",
                                 "summed log-likelihood: largest relative difference", "-",
                                 f"{worst:.1e}", digits, "<= 1e-6 relative"))


def test_choice_scores_equal_lm_eval(cfg, lmeval_runs, task_dir, table):
    """ppldelta.hf.score_choices (the scores a reference stores for flips, ``--choices``) on the
    task's own items file equals lm-eval's per-choice loglikelihoods, and gives its acc."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppldelta import hf

    out = lmeval_runs["original"]
    want, answers, doc_ids = lmeval.multiple_choice_scores(lmeval.read_samples(out, "ppldelta_mc"))
    items = [json.loads(line) for line in (task_dir / "mc.jsonl").read_text().splitlines()]
    assert [items[i]["answer"] for i in doc_ids] == answers.tolist()
    tok = AutoTokenizer.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name)
    model = AutoModelForCausalLM.from_pretrained(cfg.gguf.parent, gguf_file=cfg.gguf.name, dtype=torch.float64)
    ours = hf.score_choices(model, task_dir / "mc.jsonl", tokenizer=tok, progress=False)[doc_ids]
    fin = np.isfinite(want)
    assert np.array_equal(fin, np.isfinite(ours))
    worst = float(np.max(np.abs(ours[fin] - want[fin]) / np.abs(want[fin])))
    assert worst <= 1e-9, f"largest relative difference {worst:.2e}"
    acc = float(np.mean(ours.argmax(axis=1) == answers))
    assert acc == _results(out)["ppldelta_mc"]["acc,none"]
    table.add("lm-eval", "multiple_choice (original), ppldelta.hf.score_choices", "acc",
              _results(out)["ppldelta_mc"]["acc,none"], acc, "equal")
    digits = "all" if worst == 0 else str(max(0, int(math.floor(-math.log10(worst)))))
    table.rows.append(_agree.Row("lm-eval", "multiple_choice (original), per choice",
                                 "loglikelihood: largest relative difference", "-", f"{worst:.1e}", digits,
                                 "<= 1e-9 relative"))
