"""One set of input tests run against every entry point: each reads its array arguments through
the one adapter (ppldelta._adapt), so every input kind gives the result of the plain ndarray,
and masked arrays and non-arrays are refused the same way everywhere."""
import math

import warnings

import numpy as np
import pytest

import ppldelta
from _deps import torch
from ppldelta import _adapt
from reliability.fuzz_core import DLPackOnly

# values exactly representable in bfloat16, float16 and float32: every kind holds the same numbers
LP = -((np.arange(40) * 7) % 23 + 1) / 16.0
LP2 = LP - 1 / 16
KLD = ((np.arange(40) * 5) % 13) / 64.0
FLAGS = ((np.arange(40) * 3) % 5 != 0).astype(np.float64)
LOGITS = (((np.arange(6 * 9) * 7) % 23) - 11).reshape(6, 9) / 8.0
LOGITS2 = LOGITS[:, ::-1] / 2
TARGETS = np.array([0, 3, 8, 1, 2, 5])
SCORES = (((np.arange(8 * 4) * 5) % 11) / 4.0 - 3).reshape(8, 4)
ANSWERS = np.array([0, 1, 2, 3, 0, 1, 2, 3])


def _bars(ax):
    return [p.get_height() for p in ax.patches]


def _plot(name):
    def call(*a):
        pytest.importorskip("matplotlib")
        from ppldelta import plot

        return _bars(getattr(plot, name)(*a))
    return call


# name -> (canonical float64 input, call(x) -> comparable result, computed from logits (approximate))
ENTRY_POINTS = {
    "perplexity": (LP, lambda x: ppldelta.perplexity(x), False),
    "perplexity_delta": (LP, lambda x: ppldelta.perplexity_delta(x, LP2), False),
    "perplexity_delta/quantized": (LP2, lambda x: ppldelta.perplexity_delta(LP, x), False),
    "analyze": (LP, lambda x: ppldelta.analyze(x, LP2, n_bootstrap=40).to_dict(), False),
    "analyze/quantized": (LP2, lambda x: ppldelta.analyze(LP, x, n_bootstrap=40).to_dict(), False),
    "analyze/kld": (KLD, lambda x: ppldelta.analyze(LP, LP2, kld=x, n_bootstrap=40).to_dict(), False),
    "analyze/same_top1": (FLAGS, lambda x: ppldelta.analyze(LP, LP2, same_top1=x, n_bootstrap=40).to_dict(),
                          False),
    "analyze/logits": (LOGITS, lambda x: ppldelta.analyze(
        None, None, original_logits=x, quantized_logits=LOGITS2, targets=TARGETS, n_bootstrap=40).to_dict(), True),
    "Accumulator.update": (LP, lambda x: ppldelta.Accumulator().update(x, LP2).report(n_bootstrap=40).to_dict(),
                           False),
    "Accumulator.update/kld": (KLD, lambda x: ppldelta.Accumulator().update(LP, LP2, kld=x).report(
        n_bootstrap=40).to_dict(), False),
    "Accumulator.update/top1_in_top5": (FLAGS, lambda x: ppldelta.Accumulator().update(
        LP, LP2, top1_in_top5=x).report(n_bootstrap=40).to_dict(), False),
    "token_log_probs": (LOGITS, lambda x: ppldelta.token_log_probs(x, TARGETS), True),
    "kl_divergence": (LOGITS, lambda x: ppldelta.kl_divergence(x, LOGITS2, targets=TARGETS), True),
    "kl_divergence/quantized": (LOGITS2, lambda x: ppldelta.kl_divergence(LOGITS, x), True),
    "paired_outcomes": (FLAGS, lambda x: ppldelta.paired_outcomes(x, FLAGS[::-1]).to_dict(), False),
    "choice_flips": (SCORES, lambda x: ppldelta.choice_flips(x, SCORES[::-1], ANSWERS).to_dict(), False),
    "plot.delta_histogram": (LP, lambda x: _plot("delta_histogram")(x, LP2), False),
    "plot.kld_distribution": (KLD, lambda x: _plot("kld_distribution")(x), False),
}


def _strided(a):
    buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],))
    buf[..., ::2] = a
    return buf[..., ::2]


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


KINDS = {
    "ndarray": lambda a: a,
    "list": lambda a: a.tolist(),
    "tuple": lambda a: tuple(a.tolist()),
    "fortran": np.asfortranarray,
    "strided": _strided,
    "reversed": lambda a: np.flip(np.flip(a).copy()),
    "big-endian": lambda a: a.astype(">f8"),
    "float32": lambda a: a.astype(np.float32),
    "float16": lambda a: a.astype(np.float16),
    "read-only": _read_only,
    "buffer-protocol": lambda a: memoryview(np.ascontiguousarray(a)),
    "dlpack-only": lambda a: DLPackOnly(np.ascontiguousarray(a)),
    "torch": lambda a: torch.from_numpy(a.copy()),
    "torch-float32-grad": lambda a: torch.tensor(a, dtype=torch.float32, requires_grad=True),
    "torch-bfloat16": lambda a: torch.tensor(a).to(torch.bfloat16),
    "torch-strided": lambda a: torch.from_numpy(np.repeat(a, 2, axis=-1))[..., ::2],
}


def _same(x, y, approx, path="result"):
    if isinstance(x, dict):
        assert isinstance(y, dict) and list(x) == list(y), path
        for k in x:
            _same(x[k], y[k], approx, f"{path}[{k!r}]")
    elif isinstance(x, (list, tuple, np.ndarray)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, path
        if x.dtype.kind in "fc" and approx:
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(y, x, err_msg=path)
    elif isinstance(x, float) and approx and math.isfinite(x):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-6), path
    else:
        assert y == x or (x != x and y != y), path


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_input_kind_gives_the_ndarray_result(entry, kind):
    if kind.startswith("torch") and torch is None:
        pytest.skip("needs torch")
    base, call, from_logits = ENTRY_POINTS[entry]
    want = call(base)
    # lower precision changes what the logits kernels compute in, never the values read
    _same(want, call(KINDS[kind](base)), from_logits and kind not in ("ndarray", "list", "tuple", "fortran",
                                                                       "strided", "reversed", "big-endian",
                                                                       "read-only", "buffer-protocol",
                                                                       "dlpack-only", "torch", "torch-strided"))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_masked_arrays_are_refused_everywhere(entry):
    base, call, _ = ENTRY_POINTS[entry]
    with pytest.raises(TypeError, match="masked array"):
        call(np.ma.array(base, mask=np.zeros(base.shape, bool)))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_complex_arrays_are_refused_everywhere(entry):
    """A complex array lost its imaginary parts with only NumPy's ComplexWarning (choice_flips
    scored 1+1j as 1)."""
    if entry.startswith("plot"):
        pytest.importorskip("matplotlib")
    base, call, _ = ENTRY_POINTS[entry]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning on the way to the refusal
        with pytest.raises(TypeError, match="complex"):
            call(np.asarray(base) + 1j)


BAD = {"str": "abc", "bytes": b"xx", "dict": {"a": 1}, "set": {1.0}, "complex": 1 + 2j, "object": object(),
       "float": 3.0}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_non_arrays_are_a_type_error_everywhere(entry, bad):
    if entry.startswith("plot"):
        pytest.importorskip("matplotlib")
    _, call, _ = ENTRY_POINTS[entry]
    with pytest.raises(TypeError):
        call(BAD[bad])


# ----------------------------------------------------------------------------- integer inputs

INT_KINDS = {
    "ndarray": lambda a: a,
    "list": lambda a: a.tolist(),
    "tuple": lambda a: tuple(a.tolist()),
    "int32": lambda a: a.astype(np.int32),
    "uint8": lambda a: a.astype(np.uint8),
    "big-endian": lambda a: a.astype(">i8"),
    "strided": lambda a: np.repeat(a, 2)[::2],
    "buffer-protocol": lambda a: memoryview(a.copy()),
    "dlpack-only": lambda a: DLPackOnly(a.copy()),
    "torch": lambda a: torch.from_numpy(a.copy()),
    "torch-int32": lambda a: torch.from_numpy(a.astype(np.int32)),
}


@pytest.mark.parametrize("kind", list(INT_KINDS))
def test_targets_and_answers_of_every_kind(kind):
    if kind.startswith("torch") and torch is None:
        pytest.skip("needs torch")
    wrap = INT_KINDS[kind]
    np.testing.assert_array_equal(ppldelta.token_log_probs(LOGITS, wrap(TARGETS)),
                                  ppldelta.token_log_probs(LOGITS, TARGETS))
    assert ppldelta.choice_flips(SCORES, SCORES[::-1], wrap(ANSWERS)) == \
        ppldelta.choice_flips(SCORES, SCORES[::-1], ANSWERS)
    np.testing.assert_array_equal(_adapt.as_ids(wrap(TARGETS)), TARGETS)


def _as_ids_oracle(input_ids):
    """ppldelta.hf's token-id rule as it was written with torch (the adapter's contract)."""
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:
        input_ids = input_ids["input_ids"]
    t = input_ids.detach().to("cpu") if isinstance(input_ids, torch.Tensor) else \
        torch.as_tensor(np.asarray(input_ids))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"input_ids must be one sequence (1-D, or 2-D with one row), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {t.dtype}")
    if t.numel() and (t < 0).any():  # since: a negative id (-100, an ignore_index) gave a silent NaN
        i = int(torch.nonzero(t < 0)[0, 0])
        raise ValueError(f"input_ids must be token ids in [0, 2**63) (-100 is a label's ignore_index, not an "
                         f"input), got {int(t[i])} at index {i}")
    return t.to(torch.long).contiguous()


@pytest.mark.parametrize("ids", [
    [5, 1, 7], (5, 1, 7), np.array([5, 1, 7], np.int32), np.array([[5, 1, 7]]), {"input_ids": [[5, 1, 7]]},
    np.array([3]), np.array([], np.int64), "torch", "torch-2d", "torch-int8",
    [[1, 2], [3, 4]], np.zeros((2, 2, 1), np.int64), 4, [1.0, 2.0], np.array([True]), np.float16([1]), "torch-float",
])
def test_as_ids_keeps_the_rule_of_the_torch_version(ids):
    if torch is None:
        pytest.skip("needs torch (the oracle)")
    ids = {"torch": torch.tensor([5, 1, 7]), "torch-2d": torch.tensor([[5, 1, 7]]),
           "torch-int8": torch.tensor([5, -1], dtype=torch.int8),
           "torch-float": torch.tensor([1.0])}.get(ids, ids) if isinstance(ids, str) else ids
    try:
        want = _as_ids_oracle(ids).numpy()
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc)) as got:
            _adapt.as_ids(ids)
        assert str(got.value) == str(exc)
        return
    got = _adapt.as_ids(ids)
    assert got.dtype == np.int64 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
