"""Per-sample outputs of EleutherAI's lm-evaluation-harness (``--log_samples``).

With ``--output_path OUT --log_samples`` the harness (>= 0.4.3,
``EvaluationTracker.save_results_samples``) writes one JSON object per line to
``OUT/<model_name_sanitized>/samples_<task>_<date_id>.jsonl``, where
``date_id`` is ``datetime.now().isoformat()`` with ``:`` replaced by ``-``
(so newer runs sort later).  Releases up to 0.4.2 instead wrote one indented
JSON array per task; :func:`read_samples` reads both.  Each record has

``doc_id``, ``doc``
    the document index (position in the evaluated split) and the document;
``target``
    ``doc_to_target(doc)``, stringified since 0.4.4 (``"3"``), raw before;
``arguments``
    one request per entry, ``{"gen_args_0": {"arg_0": context, "arg_1":
    continuation}, ...}`` since 0.4.3, ``[[context, continuation], ...]`` before;
``resps``, ``filtered_resps``
    per request: ``resps[i] = [[loglikelihood, is_greedy]]`` (one response per
    request) and ``filtered_resps[i] = [loglikelihood, is_greedy]`` after the
    ``take_first`` filter; numbers are strings since 0.4.3 (``sanitize_list``);
    a rolling-loglikelihood request has ``[[ll]]`` / ``ll`` instead;
``filter``, ``metrics``, ``doc_hash``, ``prompt_hash``, ``target_hash``
    since 0.4.3; one record per (document, filter);
and one key per metric, e.g. ``acc`` / ``acc_norm`` for multiple choice and
``[summed loglikelihood, count]`` pairs for ``word_perplexity``,
``byte_perplexity`` and ``bits_per_byte`` (``loglikelihood_rolling`` tasks).

Multiple-choice tasks issue one ``(context, target_delimiter + choice)``
request per choice; ``acc`` takes the argmax of the loglikelihoods,
``acc_norm`` the argmax of loglikelihood / ``len(choice)`` (characters of the
choice text, without the delimiter) and ``acc_bytes`` (2025) the argmax of
loglikelihood / UTF-8 bytes of the choice (``ConfigurableTask.process_results``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "read_samples",
    "sample_files",
    "multiple_choice_scores",
    "paired_multiple_choice",
    "rolling_loglikelihoods",
    "paired_rolling",
    "per_task",
    "PairedMultipleChoice",
    "PairedRolling",
]

_SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>[^_]+)\.jsonl$")
_ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


class PairedMultipleChoice(NamedTuple):
    """Choice loglikelihoods of two runs over the same documents (sorted by doc_id)."""

    orig_scores: np.ndarray  #: float64 (n_docs, n_choices_max), -inf padded
    quant_scores: np.ndarray  #: same shape
    answers: np.ndarray  #: int64 (n_docs,) gold choice index
    doc_ids: np.ndarray  #: int64 (n_docs,)


class PairedRolling(NamedTuple):
    """Per-document rolling loglikelihoods of two runs (sorted by doc_id)."""

    orig_loglikelihood: np.ndarray  #: float64 (n_docs,) summed over the document
    quant_loglikelihood: np.ndarray  #: float64 (n_docs,)
    n_words: np.ndarray  #: int64 (n_docs,), -1 where not logged
    n_bytes: np.ndarray  #: int64 (n_docs,), -1 where not logged
    doc_ids: np.ndarray  #: int64 (n_docs,)


def sample_files(directory: str | os.PathLike) -> dict[str, Path]:
    """``{task: newest samples_<task>_<date_id>.jsonl}`` found anywhere under ``directory``.

    The harness writes one folder per model (``<output>/<model name>/``): a task found in two
    folders is two models' runs, and mixing them would pair a model with another, so it is a
    ValueError naming both (pass the model's own folder)."""
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(Path(directory).rglob("samples_*.jsonl")):
        m = _SAMPLES_NAME.match(path.name)
        if not m:
            continue
        if m["task"] in found and found[m["task"]][1].parent != path.parent:
            raise ValueError(f"{directory}: task {m['task']!r} has samples in two folders, "
                             f"{found[m['task']][1].parent} and {path.parent} (two models' runs?): "
                             "pass the folder of one run")
        if m["task"] not in found or m["date"] > found[m["task"]][0]:
            found[m["task"]] = (m["date"], path)
    return {task: path for task, (_, path) in sorted(found.items())}


def read_samples(
    path_or_dir: str | os.PathLike, task: str | None = None, *, filter_name: str | None = None
) -> list[dict]:
    """Records of one task's ``--log_samples`` output.

    ``path_or_dir`` is a samples file (JSON lines, or the JSON array of
    harness <= 0.4.2) or an output directory, searched recursively for
    ``samples_<task>_<date_id>.jsonl``; the newest ``date_id`` wins.  ``task``
    may be omitted when the directory holds a single task.  ``filter_name``
    keeps only records of that filter (tasks with several filters log one
    record per document and filter).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        files = sample_files(path)
        if task is None and len(files) == 1:
            task = next(iter(files))
        if task not in files:
            wanted = "a task name" if task is None else f"task {task!r}"
            raise ValueError(f"{path}: pass {wanted}; samples files found for {sorted(files)}")
        path = files[task]
    text = path.read_text(encoding="utf-8")
    array = text.lstrip().startswith("[")  # the JSON array of harness <= 0.4.2, else JSON lines
    lines = [text] if array else text.splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            if line.strip():
                records.extend(json.loads(line) if array else [json.loads(line)])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno if array else lineno} is not valid JSON ({exc.msg})") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad} is a {type(records[bad]).__name__}, not a JSON object")
    if filter_name is not None:
        records = [r for r in records if r.get("filter") == filter_name]
    return records


def _by_doc(records: list[dict]) -> list[dict]:
    """Records sorted by doc_id; ValueError on repeated doc_ids (several filters)."""
    for i, r in enumerate(records):
        d = r.get("doc_id") if isinstance(r, dict) else None
        if isinstance(d, bool) or not isinstance(d, (int, str)) or not str(d).strip().isdigit():
            raise ValueError(f"record {i}: no integer doc_id (got {d!r}): not a --log_samples record")
    records = sorted(records, key=lambda r: int(r["doc_id"]))
    ids = [int(r["doc_id"]) for r in records]
    dup = sorted({i for i, j in zip(ids, ids[1:]) if i == j})
    if dup:
        filters = sorted({str(r.get("filter")) for r in records})
        raise ValueError(
            f"several records for doc_id {dup[:5]} (filters {filters}); "
            "select one with read_samples(..., filter_name=...)"
        )
    return records


def _number(value) -> float:
    """First scalar of a response: ``[[ll, greedy]]``, ``[ll, greedy]`` or ``ll``, str or number."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"response {value!r} is not a loglikelihood") from None


def _requests(record: dict) -> list[tuple[float, str, str]]:
    """(loglikelihood, context, continuation) per request, in request order."""
    resps = record.get("filtered_resps", record.get("resps"))
    if not isinstance(resps, list):
        raise ValueError(f"doc_id {record.get('doc_id')}: no responses logged (resps / filtered_resps)")
    args = record.get("arguments") or [[""]] * len(resps)
    if isinstance(args, dict):  # {"gen_args_<i>": {"arg_<j>": ...}}
        args = [[a[k] for k in sorted(a, key=lambda k: int(k.rsplit("_", 1)[1]))]
                for _, a in sorted(args.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
    if len(args) != len(resps):
        raise ValueError(f"doc_id {record.get('doc_id')}: {len(resps)} responses "
                         f"for {len(args)} requests")
    odd = next((a[1] for a in args if len(a) > 1 and not isinstance(a[1], str)), None)
    if odd is not None:
        raise ValueError(f"doc_id {record.get('doc_id')}: a request whose second argument is not a continuation "
                         f"({type(odd).__name__}): a generate_until task, not a loglikelihood one")
    try:
        return [(_number(r), str(a[0]), a[1] if len(a) > 1 else "") for r, a in zip(resps, args)]
    except ValueError as exc:
        raise ValueError(f"doc_id {record.get('doc_id')}: {exc}") from None


def _gold(record: dict, choices: list[str], lls=None) -> int:
    target = record.get("target")
    if isinstance(target, str) and re.fullmatch(r"\s*\d+\s*", target):
        as_text = choices.index(target) if target in choices else None
        target = int(target)  # the harness's reading of a templated digit target: an index
        if as_text is not None and as_text != target and lls is not None and record.get("acc") is not None:
            # choices that are digits themselves ("1".."4"): the logged acc (argmax == gold) tells
            # which reading the harness took when only one of them agrees with it
            hit = float(record["acc"]) == 1.0
            pred = int(np.argmax(lls))
            if (pred == as_text) == hit and (pred == target) != hit:
                target = as_text
    elif isinstance(target, str) and target in choices:
        target = choices.index(target)
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < len(choices):
        raise ValueError(f"doc_id {record.get('doc_id')}: cannot read a gold index from "
                         f"target {record.get('target')!r} ({len(choices)} choices)")
    return target


def _gold_from_acc(record: dict, lls: np.ndarray) -> int:
    """Gold of a two-way multiple-input task (winogrande) from its logged ``acc``.

    Such tasks log the shared continuation as ``target`` and take the gold from
    ``doc_to_text``; with two choices ``acc`` (argmax == gold) pins it down.
    """
    acc, pred = record.get("acc"), int(np.argmax(lls))
    if acc is None or (not float(acc) and len(lls) != 2):
        raise ValueError(f"doc_id {record.get('doc_id')}: multiple-input task (one continuation, "
                         f"{len(lls)} contexts): the gold index is only recoverable from 'acc' "
                         "for two choices")
    return pred if float(acc) else 1 - pred


def multiple_choice_scores(
    records: list[dict], *, normalize: bool | str = False, target_delimiter: str = " "
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choice loglikelihoods of a ``multiple_choice`` task.

    Returns ``(scores, answers, doc_ids)`` sorted by doc_id: float64
    ``(n_docs, n_choices_max)`` padded with ``-inf`` for documents with fewer
    choices, int64 gold indices (from ``target``: an int, a string of an int,
    or the text of a choice; a string of digits is read as an index, as the
    harness does for templated targets) and int64 doc ids.  Loglikelihoods
    come from ``filtered_resps`` (``resps`` when absent).  For
    ``acc_mutual_info`` tasks only the conditional half of the requests is
    used.  Multiple-input tasks (winogrande: the same continuation after each
    choice's context) log no usable target; for two choices the gold index is
    recovered from the logged ``acc``, and their choice text for ``normalize``
    is the context (the harness's choice in zero-shot runs).

    ``normalize=True`` divides by the character length of each choice, the
    harness's ``acc_norm``; ``normalize="bytes"`` by its UTF-8 byte length
    (``acc_bytes``).  The choice text is the request's continuation with the
    task's ``target_delimiter`` (``" "`` by default) removed from its front.
    """
    if normalize not in (False, True, "bytes"):
        raise ValueError(f"normalize must be False, True or 'bytes', got {normalize!r}")
    records = _by_doc(records)
    rows, answers = [], []
    for record in records:
        reqs = _requests(record)
        if "acc_mutual_info" in record:
            reqs = reqs[: len(reqs) // 2]
        lls = np.array([ll for ll, _, _ in reqs], dtype=np.float64)
        choices = [c[len(target_delimiter):] if target_delimiter and c.startswith(target_delimiter)
                   else c for _, _, c in reqs]
        if len(reqs) > 1 and len(set(choices)) == 1:  # multiple input: choices are contexts
            choices = [ctx for _, ctx, _ in reqs]
            answers.append(_gold_from_acc(record, lls))
        else:
            answers.append(_gold(record, choices, lls))
        if normalize:
            lengths = [len(c.encode("utf-8")) if normalize == "bytes" else len(c) for c in choices]
            with np.errstate(divide="ignore", invalid="ignore"):
                lls = lls / np.array(lengths, dtype=np.float64)
        rows.append(lls)
    width = max((len(r) for r in rows), default=0)
    scores = np.full((len(rows), width), -np.inf)
    for i, r in enumerate(rows):
        scores[i, : len(r)] = r
    doc_ids = np.array([int(r["doc_id"]) for r in records], dtype=np.int64)
    return scores, np.array(answers, dtype=np.int64), doc_ids


def rolling_loglikelihoods(records: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-document results of a ``loglikelihood_rolling`` task (e.g. wikitext).

    Returns ``(loglikelihood, words, bytes, doc_ids)`` sorted by doc_id: the
    summed loglikelihood (float64) and the word and byte counts (int64, -1 when
    the record lacks ``word_perplexity`` resp. ``byte_perplexity`` /
    ``bits_per_byte``) the harness logged as ``[loglikelihood, count]`` metric
    pairs.  The counts are taken from the records, not recomputed, since tasks
    count differently (wikitext counts the raw page, not the detokenized target).
    """
    records = _by_doc(records)
    ll, words, nbytes = [], [], []
    for record in records:
        pairs = {m: record[m] for m in _ROLLING_METRICS if isinstance(record.get(m), list)}
        if pairs:
            ll.append(_number(next(iter(pairs.values()))))
        elif record.get("filtered_resps", record.get("resps")) is not None:
            reqs = _requests(record)
            if len(reqs) != 1 or reqs[0][2] or reqs[0][0] > 0:  # one request: the whole document
                raise ValueError(f"doc_id {record.get('doc_id')}: {len(reqs)} requests"
                                 f"{' with a continuation' if reqs and reqs[0][2] else ''}"
                                 f"{', a positive loglikelihood' if reqs and reqs[0][0] > 0 else ''}: "
                                 "not a loglikelihood_rolling task (perplexity of whole documents)")
            ll.append(reqs[0][0])
        else:
            raise ValueError(f"doc_id {record.get('doc_id')}: no rolling loglikelihood logged")
        words.append(int(pairs["word_perplexity"][1]) if "word_perplexity" in pairs else -1)
        byte_pair = pairs.get("byte_perplexity", pairs.get("bits_per_byte"))
        nbytes.append(int(byte_pair[1]) if byte_pair else -1)
    doc_ids = np.array([int(r["doc_id"]) for r in records], dtype=np.int64)
    return (np.array(ll, dtype=np.float64), np.array(words, dtype=np.int64),
            np.array(nbytes, dtype=np.int64), doc_ids)


def _read_pair(original_path, quantized_path, task, filter_name) -> tuple[list[dict], list[dict]]:
    """Both runs' records; ValueError unless they share doc_ids (and doc_hash where logged)."""
    orig = read_samples(original_path, task, filter_name=filter_name)
    quant = read_samples(quantized_path, task, filter_name=filter_name)
    where = task or f"{original_path} vs {quantized_path}"
    a = {int(r["doc_id"]): r.get("doc_hash") for r in orig}
    b = {int(r["doc_id"]): r.get("doc_hash") for r in quant}
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a or only_b:
        raise ValueError(f"{where}: documents differ: doc_ids only in the original run "
                         f"{only_a[:10]}, only in the quantized run {only_b[:10]}")
    changed = sorted(i for i in a if a[i] and b[i] and a[i] != b[i])
    if changed:
        raise ValueError(f"{where}: doc_hash differs for doc_ids {changed[:10]} "
                         "(different documents under the same ids)")
    return orig, quant


def paired_multiple_choice(
    original_path: str | os.PathLike,
    quantized_path: str | os.PathLike,
    task: str | None = None,
    normalize: bool | str = False,
    *,
    filter_name: str | None = None,
) -> PairedMultipleChoice:
    """:func:`multiple_choice_scores` of two runs, aligned by doc_id (and doc_hash).

    Paths are files or output directories (see :func:`read_samples`).  Raises
    ValueError naming the offending doc_ids when the runs cover different
    documents or disagree on a gold answer.  Both score arrays are padded to
    the same width.
    """
    orig, quant = _read_pair(original_path, quantized_path, task, filter_name)
    s_o, ans, ids = multiple_choice_scores(orig, normalize=normalize)
    s_q, ans_q, _ = multiple_choice_scores(quant, normalize=normalize)
    if not np.array_equal(ans, ans_q):
        raise ValueError(f"gold answers differ for doc_ids {ids[ans != ans_q][:10].tolist()}")
    n_o, n_q = ((s > -np.inf).sum(1) for s in (s_o, s_q))  # -inf only pads
    if not np.array_equal(n_o, n_q):
        bad = np.flatnonzero(n_o != n_q)[:10]
        raise ValueError(f"the runs score different numbers of choices for doc_ids {ids[bad].tolist()} "
                         f"({n_o[bad].tolist()} against {n_q[bad].tolist()}): different task versions?")
    width = max(s_o.shape[1], s_q.shape[1])
    pad = [np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-np.inf) for s in (s_o, s_q)]
    return PairedMultipleChoice(pad[0], pad[1], ans, ids)


def paired_rolling(
    original_path: str | os.PathLike,
    quantized_path: str | os.PathLike,
    task: str | None = None,
    *,
    filter_name: str | None = None,
) -> PairedRolling:
    """:func:`rolling_loglikelihoods` of two runs, aligned by doc_id (and doc_hash).

    Word and byte counts come from the original run; ValueError if the
    quantized run logged different counts for a document.
    """
    orig, quant = _read_pair(original_path, quantized_path, task, filter_name)
    ll_o, words, nbytes, ids = rolling_loglikelihoods(orig)
    ll_q, words_q, nbytes_q, _ = rolling_loglikelihoods(quant)
    bad = (words != words_q) | (nbytes != nbytes_q)
    if bad.any():
        raise ValueError(f"word/byte counts differ for doc_ids {ids[bad][:10].tolist()}")
    return PairedRolling(ll_o, ll_q, words, nbytes, ids)


def _task_kind(record: dict) -> str | None:
    if any(m in record for m in _ROLLING_METRICS):
        return "rolling"
    if any(m in record for m in ("acc", "acc_norm")) and len(_requests(record)) > 1:
        return "multiple_choice"
    return None


def per_task(
    original_dir: str | os.PathLike, quantized_dir: str | os.PathLike, *, normalize: bool | str = False
) -> dict[str, PairedMultipleChoice | PairedRolling]:
    """Paired data for every task with samples in both output directories.

    Multiple-choice tasks (``acc``/``acc_norm`` over several requests) give a
    :class:`PairedMultipleChoice`, rolling-loglikelihood tasks a
    :class:`PairedRolling`; other tasks (generation, single loglikelihood)
    are skipped.  The newest samples file of each task is used.
    """
    orig_files, quant_files = sample_files(original_dir), sample_files(quantized_dir)
    out: dict[str, PairedMultipleChoice | PairedRolling] = {}
    for task in sorted(orig_files.keys() & quant_files.keys()):
        records = read_samples(orig_files[task])
        kind = _task_kind(records[0]) if records else None
        if kind == "multiple_choice":
            out[task] = paired_multiple_choice(orig_files[task], quant_files[task], task, normalize)
        elif kind == "rolling":
            out[task] = paired_rolling(orig_files[task], quant_files[task], task)
    return out
