"""Tests for ppldelta.lmeval against small synthetic --log_samples fixtures.

tests/data/lmeval/ mimics ``lm_eval --output_path DIR --log_samples``:
``DIR/<model>/samples_<task>_<date_id>.jsonl``.  ``original`` uses the current
record layout (string-valued ``filtered_resps``, ``gen_args_<i>`` arguments,
stringified target), plus a stale older arc_easy run that must be ignored;
``quantized`` holds arc_easy in the harness 0.4.3 layout (int target, no
``filtered_resps``, so scores come from ``resps``) with shuffled records, and
an extra piqa task; ``legacy`` is a harness <= 0.4.2 JSON-array file.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from ppldelta import lmeval

DATA = Path(__file__).parent / "data" / "lmeval"
ORIG, QUANT = DATA / "original", DATA / "quantized"
LEGACY = DATA / "legacy" / "pretrained__EleutherAI__pythia-70m_arc_easy.jsonl"
NEG = -np.inf

ARC_ORIG = np.array([
    [-5.0, -2.5, -6.0, -9.0, NEG],
    [-1.0, -2.0, -3.0, NEG, NEG],
    [-4.0, -4.5, -5.0, -6.0, -3.5],
    [-3.0, -4.0, -4.5, -6.0, NEG],
])
ARC_QUANT = np.array([
    [-5.5, -3.0, -2.75, -9.0, NEG],
    [-1.25, -2.0, -2.5, NEG, NEG],
    [-4.25, -4.75, -5.25, -6.25, -3.75],
    [-3.0, -4.0, -4.5, -6.0, NEG],
])
ARC_ANSWERS = [1, 0, 4, 3]
# Choice texts (continuations without the leading " " delimiter).
ARC_CHOICES = [
    ["oxygen", "carbon dioxide", "nitrogen", "helium"],
    ["warm", "cold", "café"],
    ["a rock", "a tree", "a cloud", "a river", "a bird"],
    ["1", "22", "333", "4444"],
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_sample_files_picks_newest_run_per_task():
    files = lmeval.sample_files(ORIG)
    assert sorted(files) == ["arc_easy", "gsm8k", "hellaswag", "wikitext", "winogrande"]
    assert files["arc_easy"].name == "samples_arc_easy_2024-06-01T10-15-30.123456.jsonl"
    assert files["arc_easy"].parent.name == "EleutherAI__pythia-70m"


def test_read_samples_directory_and_file():
    records = lmeval.read_samples(ORIG, "arc_easy")
    assert [r["doc_id"] for r in records] == [0, 1, 2, 3]  # not the 2-doc stale run
    for key in ("doc", "target", "arguments", "resps", "filtered_resps", "filter",
                "metrics", "doc_hash", "prompt_hash", "target_hash", "acc", "acc_norm"):
        assert key in records[0]
    assert records == lmeval.read_samples(lmeval.sample_files(ORIG)["arc_easy"])
    with pytest.raises(ValueError, match="arc_easy"):
        lmeval.read_samples(ORIG)  # several tasks: must name one
    with pytest.raises(ValueError, match="piqa"):
        lmeval.read_samples(ORIG, "piqa")


def test_read_samples_filter_name(tmp_path):
    rec = lmeval.read_samples(ORIG, "arc_easy")[0]
    other = dict(rec, filter="strict")
    path = _write_jsonl(tmp_path / "samples_x_2024-01-01T00-00-00.0.jsonl", [rec, other])
    with pytest.raises(ValueError, match="filter_name"):
        lmeval.multiple_choice_scores(lmeval.read_samples(path))
    assert len(lmeval.read_samples(path, filter_name="strict")) == 1


def test_multiple_choice_scores_padding_answers_doc_ids():
    scores, answers, doc_ids = lmeval.multiple_choice_scores(lmeval.read_samples(ORIG, "arc_easy"))
    assert scores.dtype == np.float64 and answers.dtype == np.int64 and doc_ids.dtype == np.int64
    np.testing.assert_array_equal(scores, ARC_ORIG)  # 3 and 5 choices: -inf padded to 5
    np.testing.assert_array_equal(answers, ARC_ANSWERS)
    np.testing.assert_array_equal(doc_ids, [0, 1, 2, 3])


def test_normalize_matches_harness_acc_norm_and_acc_bytes():
    records = lmeval.read_samples(ORIG, "arc_easy")
    norm, answers, _ = lmeval.multiple_choice_scores(records, normalize=True)
    by_bytes, _, _ = lmeval.multiple_choice_scores(records, normalize="bytes")
    for i, choices in enumerate(ARC_CHOICES):
        k = len(choices)
        chars = np.array([len(c) for c in choices], dtype=float)
        nbytes = np.array([len(c.encode()) for c in choices], dtype=float)
        np.testing.assert_allclose(norm[i, :k], ARC_ORIG[i, :k] / chars)
        np.testing.assert_allclose(by_bytes[i, :k], ARC_ORIG[i, :k] / nbytes)
        assert np.all(norm[i, k:] == NEG)
    assert by_bytes[1, 2] == pytest.approx(-3.0 / 5)  # "café": 4 characters, 5 bytes
    # the logged per-document metrics agree with argmax of the raw / normalized scores
    raw, _, _ = lmeval.multiple_choice_scores(records)
    np.testing.assert_array_equal(raw.argmax(1) == answers, [r["acc"] for r in records])
    np.testing.assert_array_equal(norm.argmax(1) == answers, [r["acc_norm"] for r in records])
    assert norm.argmax(1)[3] != raw.argmax(1)[3]  # normalization matters for doc 3
    with pytest.raises(ValueError, match="normalize"):
        lmeval.multiple_choice_scores(records, normalize="tokens")


def test_both_resps_shapes_and_legacy_layout_agree():
    new = lmeval.read_samples(ORIG, "arc_easy")
    assert all(len(r["filtered_resps"][0]) == 2 for r in new)  # [[ll, greedy], ...]
    only_resps = [{k: v for k, v in r.items() if k != "filtered_resps"} for r in new]
    assert isinstance(only_resps[0]["resps"][0][0], list)  # [[[ll, greedy]], ...]
    legacy = lmeval.read_samples(LEGACY)  # JSON array, numeric values, list arguments
    assert isinstance(legacy[0]["arguments"], list) and isinstance(legacy[0]["target"], int)
    for records in (new, only_resps, legacy):
        for normalize in (False, True):
            scores, answers, _ = lmeval.multiple_choice_scores(records, normalize=normalize)
            expected, _, _ = lmeval.multiple_choice_scores(new, normalize=normalize)
            np.testing.assert_array_equal(scores, expected)
            np.testing.assert_array_equal(answers, ARC_ANSWERS)


def test_gold_from_choice_text_and_bad_target():
    rec = lmeval.read_samples(ORIG, "arc_easy")[0]
    _, answers, _ = lmeval.multiple_choice_scores([dict(rec, target="carbon dioxide")])
    assert answers.tolist() == [1]
    for bad in ("9", "argon", [0, 1]):
        with pytest.raises(ValueError, match="doc_id 0"):
            lmeval.multiple_choice_scores([dict(rec, target=bad)])


def test_winogrande_gold_from_acc():
    # multiple-input task: one continuation after two contexts; target is the
    # continuation text, the gold index (doc["answer"] "1"/"2") is recovered via acc
    records = lmeval.read_samples(ORIG, "winogrande")
    conts = {a["arg_1"] for a in records[0]["arguments"].values()}
    assert len(conts) == 1 and records[0]["target"] == next(iter(conts)).strip()
    scores, answers, _ = lmeval.multiple_choice_scores(records)
    np.testing.assert_array_equal(answers, [int(r["doc"]["answer"]) - 1 for r in records])
    np.testing.assert_array_equal(scores, [[-20.5, -19.0], [-11.0, -12.5], [-30.0, -31.0]])
    paired = lmeval.paired_multiple_choice(ORIG, QUANT, "winogrande")
    np.testing.assert_array_equal(paired.answers, answers)
    assert (paired.quant_scores.argmax(1) == answers).tolist() == [False, True, False]
    # normalize: the choice text is the context (zero-shot: doc_to_choice itself)
    norm, norm_answers, _ = lmeval.multiple_choice_scores(records, normalize=True)
    contexts = [[a["arg_0"] for a in r["arguments"].values()] for r in records]
    np.testing.assert_allclose(norm, [[ll / len(c) for ll, c in zip(row, ctx)]
                                      for row, ctx in zip(scores, contexts)])
    np.testing.assert_array_equal(norm_answers, answers)
    with pytest.raises(ValueError, match="multiple-input"):
        lmeval.multiple_choice_scores([{k: v for k, v in records[0].items() if k != "acc"}])


def test_paired_multiple_choice_aligns_by_doc_id():
    paired = lmeval.paired_multiple_choice(ORIG, QUANT, "arc_easy")
    orig, quant, answers, doc_ids = paired  # plain tuple unpacking works too
    np.testing.assert_array_equal(orig, ARC_ORIG)
    np.testing.assert_array_equal(quant, ARC_QUANT)  # quantized file is shuffled
    np.testing.assert_array_equal(answers, ARC_ANSWERS)
    np.testing.assert_array_equal(doc_ids, [0, 1, 2, 3])
    # doc 0 flips from correct to wrong
    assert orig[0].argmax() == 1 and quant[0].argmax() == 2


def test_paired_doc_sets_must_match(tmp_path):
    records = lmeval.read_samples(ORIG, "arc_easy")
    narrow = [r for r in records if r["doc_id"] != 2]
    a = _write_jsonl(tmp_path / "a.jsonl", narrow)
    b = _write_jsonl(tmp_path / "b.jsonl", [dict(narrow[0], doc_id=2, doc_hash=None)] + narrow[1:])
    with pytest.raises(ValueError, match=r"only in the original run \[0\].*only in the quantized run \[2\]"):
        lmeval.paired_multiple_choice(a, b)
    orig, quant, _, _ = lmeval.paired_multiple_choice(a, a)
    assert orig.shape == quant.shape == (3, 4)  # no 5-choice doc left: width 4


def test_paired_rejects_mismatched_docs(tmp_path):
    records = lmeval.read_samples(ORIG, "arc_easy")
    a = _write_jsonl(tmp_path / "a.jsonl", records)
    changed = [dict(r, doc_hash="0" * 64) if r["doc_id"] == 3 else r for r in records]
    with pytest.raises(ValueError, match=r"doc_hash differs for doc_ids \[3\]"):
        lmeval.paired_multiple_choice(a, _write_jsonl(tmp_path / "b.jsonl", changed))
    with pytest.raises(ValueError, match=r"only in the original run \[1\]"):
        lmeval.paired_multiple_choice(a, _write_jsonl(tmp_path / "c.jsonl", records[:1] + records[2:]))
    wrong_gold = [dict(r, target="2") if r["doc_id"] == 0 else r for r in records]
    with pytest.raises(ValueError, match=r"gold answers differ for doc_ids \[0\]"):
        lmeval.paired_multiple_choice(a, _write_jsonl(tmp_path / "d.jsonl", wrong_gold))


def test_rolling_loglikelihoods_and_pairing(tmp_path):
    records = lmeval.read_samples(ORIG, "wikitext")
    ll, words, nbytes, doc_ids = lmeval.rolling_loglikelihoods(records)
    np.testing.assert_array_equal(ll, [-95.5, -80.0, -70.25])
    np.testing.assert_array_equal(words, [r["word_perplexity"][1] for r in records])
    np.testing.assert_array_equal(nbytes, [len(r["doc"]["page"].encode()) for r in records])
    assert nbytes[0] != len(records[0]["doc"]["page"])  # "ō" is two bytes
    np.testing.assert_array_equal(doc_ids, [0, 1, 2])
    # without the metric pairs the loglikelihood comes from filtered_resps
    bare = [{k: v for k, v in r.items() if k not in lmeval._ROLLING_METRICS} for r in records]
    ll2, words2, _, _ = lmeval.rolling_loglikelihoods(bare)
    np.testing.assert_array_equal(ll2, ll)
    assert words2.tolist() == [-1, -1, -1]

    paired = lmeval.paired_rolling(ORIG, QUANT, "wikitext")
    np.testing.assert_array_equal(paired.orig_loglikelihood, ll)
    np.testing.assert_array_equal(paired.quant_loglikelihood, [-97.25, -80.5, -71.0])
    np.testing.assert_array_equal(paired.n_words, words)
    np.testing.assert_array_equal(paired.n_bytes, nbytes)
    recount = [dict(r, word_perplexity=[r["word_perplexity"][0], 1]) for r in records]
    with pytest.raises(ValueError, match="counts differ"):
        lmeval.paired_rolling(_write_jsonl(tmp_path / "a.jsonl", records),
                              _write_jsonl(tmp_path / "b.jsonl", recount))


def test_per_task_pairs_common_tasks():
    tasks = lmeval.per_task(ORIG, QUANT)
    # piqa only exists in the quantized run; gsm8k is a generation task
    assert sorted(tasks) == ["arc_easy", "hellaswag", "wikitext", "winogrande"]
    assert isinstance(tasks["arc_easy"], lmeval.PairedMultipleChoice)
    assert isinstance(tasks["wikitext"], lmeval.PairedRolling)
    hs = tasks["hellaswag"]
    assert hs.orig_scores.shape == hs.quant_scores.shape == (3, 4)
    np.testing.assert_array_equal(hs.answers, [3, 0, 2])
    np.testing.assert_array_equal(hs.quant_scores[1], [-19.0, -30.0, -25.0, -18.5])
    np.testing.assert_array_equal(tasks["arc_easy"].quant_scores, ARC_QUANT)
    normalized = lmeval.per_task(ORIG, QUANT, normalize=True)["arc_easy"]
    np.testing.assert_allclose(normalized.orig_scores[1, :3], [-1 / 4, -2 / 4, -3 / 4])


def test_records_of_the_wrong_kind_are_refused_not_read_as_numbers(tmp_path):
    """A generate_until task's answer "5" had been read as a rolling loglikelihood of +5 and a
    multiple-choice task's first choice as a document's; broken records gave AttributeError,
    TypeError, KeyError or a JSONDecodeError without a file; runs of two models under one folder
    were mixed silently; runs scoring different numbers of choices were padded silently."""
    for task, msg in (("gsm8k", "a generate_until task"), ("arc_easy", "not a loglikelihood_rolling task")):
        with pytest.raises(ValueError, match=msg):
            lmeval.rolling_loglikelihoods(lmeval.read_samples(ORIG, task))
    with pytest.raises(ValueError, match="a generate_until task"):
        lmeval.paired_multiple_choice(ORIG, QUANT, "gsm8k")
    mc = {"doc_id": 0, "target": "0", "arguments": [["q", " a"], ["q", " b"]]}
    for rec, msg in ((mc, "no responses logged"), ({**mc, "doc_id": None}, "no integer doc_id"),
                     ({**mc, "resps": [[["x"]], [["-2"]]]}, "'x' is not a loglikelihood")):
        with pytest.raises(ValueError, match=msg):
            lmeval.multiple_choice_scores([rec])
    bad = tmp_path / "samples_t_2024-01-01T00-00-00.000000.jsonl"
    bad.write_text(json.dumps({**mc, "resps": [[["-1"]], [["-2"]]]}) + "\n{oops\n")
    with pytest.raises(ValueError, match=rf"{bad.name}: line 2 is not valid JSON"):
        lmeval.read_samples(bad)
    assert lmeval.rolling_loglikelihoods([{"doc_id": 0, "arguments": [["a whole page"]], "resps": [[["-7.5"]]]}])[0][0] == -7.5
    with pytest.raises(ValueError, match="two folders"):  # the test data's root holds two models' runs
        lmeval.sample_files(DATA)
    three = {**mc, "arguments": [["q", " a"], ["q", " b"], ["q", " c"]], "resps": [[["-1"]], [["-2"]], [["-3"]]]}
    (tmp_path / "o").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "o" / bad.name).write_text(json.dumps({**mc, "resps": [[["-1"]], [["-2"]]]}) + "\n")
    (tmp_path / "q" / bad.name).write_text(json.dumps(three) + "\n")
    with pytest.raises(ValueError, match=r"different numbers of choices for doc_ids \[0\] \(\[2\] against \[3\]\)"):
        lmeval.paired_multiple_choice(tmp_path / "o", tmp_path / "q", "t")


def test_digit_choices_read_by_the_logged_acc():
    """Choices that are digits ("1".."4") with target "2": read as an index (the harness's rule
    for templated targets) unless the logged acc agrees only with the choice text."""
    def rec(acc):
        return {"doc_id": 0, "target": "2", "acc": acc,
                "arguments": {f"gen_args_{i}": {"arg_0": "Legs of a bird?", "arg_1": " " + c} for i, c in enumerate("1234")},
                "filtered_resps": [["-4.0", "False"], ["-1.0", "False"], ["-3.0", "False"], ["-5.0", "False"]]}
    # argmax is choice 1 (text "2"): acc 1.0 says the gold was the text "2", index 1
    assert lmeval.multiple_choice_scores([rec(1.0)])[1].tolist() == [1]
    # acc 0.0 agrees with the index reading (index 2 is not the argmax) and not with the text
    assert lmeval.multiple_choice_scores([rec(0.0)])[1].tolist() == [2]
    no_acc = rec(1.0)
    del no_acc["acc"]
    assert lmeval.multiple_choice_scores([no_acc])[1].tolist() == [2]
