"""Flips and pass@k on the edges: outcomes as lm-eval logs them, non-integer answers and k;
token targets out of range in every integer dtype."""
import math

import numpy as np
import pytest
import ppldelta
from _deps import torch


def _hand(co, cq):
    """(original acc, quantized acc, right->wrong, wrong->right) counted by hand."""
    n = len(co)
    return (sum(co) / n, sum(cq) / n, sum(a and not b for a, b in zip(co, cq)),
            sum(b and not a for a, b in zip(co, cq)))


@pytest.mark.parametrize("orig", [
    ["True", "False", "true", "FALSE", "1", "0", " yes ", "No"],
    [True, False, True, False, 1, 0, True, False],
    np.array([1, 0, 1, 0, 1, 0, 1, 0], dtype=np.int8),
    np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
    np.array(["True", "False", "True", "False", "1", "0", "yes", "no"]),
    np.array([True, "False", 1, 0, 1.0, "0", "yes", False], dtype=object),
    *([torch.tensor([True, False, True, False, True, False, True, False])] if torch else []),
], ids=["strings", "mixed-list", "int8", "float", "str-array", "object", "torch"][:7 if torch else 6])
def test_outcomes_are_parsed_not_truth_tested(orig):
    want = [True, False, True, False, True, False, True, False]
    quant = [False] * 8
    f = ppldelta.paired_outcomes(orig, quant)
    assert (f.original_accuracy, f.quantized_accuracy, f.right_to_wrong, f.wrong_to_right) == _hand(want, quant)


@pytest.mark.parametrize("bad,shown", [
    (["True", "maybe"], "'maybe'"), ([1, 2], "2"), ([1.0, math.nan], "nan"), ([0.5, 1], "0.5"),
    (np.array([1, None], dtype=object), "None"), (["", "1"], "''"),
])
def test_bad_outcomes_name_index_and_argument(bad, shown):
    i = 0 if shown in ("0.5", "''") else 1
    with pytest.raises(ValueError, match=rf"quantized_correct\[{i}\] = {shown} is not a pass/fail outcome"):
        ppldelta.paired_outcomes([1, 0], bad)


def test_choice_answers_must_be_integer_indices():
    so = np.array([[0.0, -1.0, -2.0], [-1.0, 0.0, -2.0], [-2.0, -1.0, 0.0]])
    assert ppldelta.choice_flips(so, so, np.array([0.0, 1.0, 2.0])).original_accuracy == 1.0  # pandas floats
    assert ppldelta.choice_flips(so, so, np.array([0, 1, 2], np.uint64)).original_accuracy == 1.0
    with pytest.raises(ValueError, match=r"answers\[2\] = 1.5 is not an integer"):
        ppldelta.choice_flips(so, so, [0, 1, 1.5])
    with pytest.raises(ValueError, match=r"answers\[1\] = nan is not an integer"):
        ppldelta.choice_flips(so, so, [0, math.nan, 1])
    with pytest.raises(ValueError, match=r"answers\[0\] = 3 is not a choice index in \[0, 3\)"):
        ppldelta.choice_flips(so, so, [3, 1, 1])
    with pytest.raises(TypeError, match="answers must be integers"):
        ppldelta.choice_flips(so, so, [True, False, True])
    with pytest.raises(TypeError, match="answers must be integers"):
        ppldelta.choice_flips(so, so, ["a", "b", "c"])


def test_pass_at_k_needs_integers():
    assert ppldelta.pass_at_k(10, 3, 2.0) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    with pytest.raises(ValueError, match=r"k = 2.5 is not an integer"):
        ppldelta.pass_at_k(10, 3, 2.5)
    with pytest.raises(ValueError, match=r"n = 10.5 is not an integer"):
        ppldelta.pass_at_k(10.5, 3, 2)
    with pytest.raises(ValueError, match=r"c\[1\] = 0.5 is not an integer"):
        ppldelta.pass_at_k([10, 10], [3, 0.5], 2)
    with pytest.raises(TypeError, match="k must be integers"):
        ppldelta.pass_at_k(10, 3, True)


# ----------------------------------------------------------------------------- targets (logits)

@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                   np.uint32, np.uint64])
def test_targets_out_of_range_raise_in_every_integer_type(dtype):
    a = np.zeros((3, 10), np.float32)
    info = np.iinfo(dtype)
    bad = [v for v in (info.max, info.max - 99, 10, -1, -101, info.min) if v >= 10 or (v < 0 and v != -100)]
    for v in bad:
        if not info.min <= v <= info.max:
            continue
        t = np.array([1, 2, v], dtype=dtype)
        with pytest.raises(ValueError, match=rf"targets\[2\] = {v} is outside the vocabulary \[0, 10\)"):
            ppldelta.token_log_probs(a, t)
        with pytest.raises(ValueError, match=rf"targets\[2\] = {v} is outside"):
            ppldelta.kl_divergence(a, a, targets=t)
    lp = ppldelta.token_log_probs(a, np.array([1, 2, 9], dtype=dtype))
    assert lp == pytest.approx([-math.log(10)] * 3)


def test_uint64_near_2_64_is_not_ignore_index():
    a = np.zeros((2, 10), np.float32)
    t = np.array([1, 2 ** 64 - 100], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"targets\[1\] = 18446744073709551516 is outside"):
        ppldelta.token_log_probs(a, t)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ppldelta.analyze(None, None, original_logits=a, quantized_logits=a, targets=t)
    lp = ppldelta.token_log_probs(a, np.array([1, -100], dtype=np.int8))
    assert math.isnan(lp[1])


@pytest.mark.parametrize("t", [np.array([1.0, 2.0]), np.array([True, False]),
                               *([torch.tensor([True, False])] if torch else []), np.array(["1", "2"])])
def test_non_integer_targets_are_a_type_error(t):
    with pytest.raises(TypeError, match="targets must be integers"):
        ppldelta.token_log_probs(np.zeros((2, 10), np.float32), t)


def test_alpha_scores_answers_and_k_are_checked():
    """alpha=2 printed "McNemar p = 1 (significant)"; +inf scores won every argmax; an answer on
    a -inf padding column was scored as a wrong choice; answers of 1e20 wrapped to -2**63 in the
    message; k as a list raised NumPy's "only 0-dimensional arrays" TypeError."""
    so = np.array([[-1.0, -2.0, -np.inf], [-2.0, -1.0, -3.0]])
    for alpha in (2, 0, -1, math.nan, True):
        with pytest.raises(ValueError, match="alpha must be a significance level in"):
            ppldelta.choice_flips(so, so, [0, 1], alpha=alpha)
        with pytest.raises(ValueError, match="alpha must be a significance level in"):
            ppldelta.paired_outcomes([1, 0], [1, 1], alpha=alpha)
    assert ppldelta.choice_flips(so, so, [0, 1], alpha=0.01).alpha == 0.01
    inf = so.copy()
    inf[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"quantized_scores\[1, 2\] = inf: not a log-likelihood"):
        ppldelta.choice_flips(so, inf, [0, 1])
    with pytest.raises(ValueError, match=r"answers\[0\] = 2 points at a padding column"):
        ppldelta.choice_flips(so, so, [2, 1])
    with pytest.raises(ValueError, match=r"answers\[0\] = 1e\+20 is not an integer"):
        ppldelta.choice_flips(so, so, [1e20, 1.0])
    with pytest.raises(ValueError, match="k must be one integer, got 2 values"):
        ppldelta.pass_at_k(10, 3, [1, 2])


def test_flips_say_how_answers_changed():
    """choice_flips counts every changed answer, wrong->other wrong included, while the breakdown
    named only right->wrong and wrong->right (the demo's '21 (15 right->wrong, 3 wrong->right)')."""
    so = np.array([[0.0, -1, -2], [-1, 0.0, -2], [0.0, -1, -2], [0.0, -1, -2]])
    sq = np.array([[-1, 0.0, -2], [0.0, -1, -2], [-1, -2, 0.0], [0.0, -1, -2]])
    r = ppldelta.choice_flips(so, sq, [0, 0, 1, 0])  # right->wrong, wrong->right, wrong->wrong, kept
    assert (r.flips, r.right_to_wrong, r.wrong_to_right) == (3, 1, 1)
    assert r.breakdown == "1 right->wrong, 1 wrong->right, 1 wrong->wrong" and r.breakdown in r.summary()
    assert ppldelta.paired_outcomes([1, 0, 1], [0, 1, 1]).breakdown == "1 right->wrong, 1 wrong->right"


def test_bare_values_are_named_as_outcomes_not_log_probabilities():
    with pytest.raises(TypeError, match="original_correct must be a sequence or array of values, not bool"):
        ppldelta.paired_outcomes(True, False)


def test_paired_outcomes_need_the_same_shape():
    """(2, 2) against (4,) had passed the length check: the items are not paired that way."""
    with pytest.raises(ValueError, match=r"shape mismatch: original outcomes \(2, 2\), quantized \(4,\)"):
        ppldelta.paired_outcomes([[1, 0], [1, 1]], [1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"shape mismatch: original outcomes \(3,\), quantized \(2,\)"):
        ppldelta.paired_outcomes([1, 0, 1], [1, 0])
    assert ppldelta.paired_outcomes([[1, 0], [1, 1]], [[1, 1], [0, 1]]).n == 4
