"""Accumulator.from_state: states that updates could not have produced are a ValueError."""
import copy
import json
import math

import numpy as np
import pytest

import ppldelta
from ppldelta.accumulate import _SHIFT


def _state():
    rng = np.random.default_rng(0)
    o = -rng.exponential(2.0, 300)
    q = o - 0.05
    acc = ppldelta.Accumulator(block_size=16)
    acc.update(o, q, kld=rng.exponential(0.05, 300), same_top1=rng.random(300) < 0.9,
               groups=np.where(np.arange(300) % 2, "a", "b"))
    return json.loads(json.dumps(acc.state_dict()))


def _hex(x):
    return hex(round(x * 2 ** 60) << (_SHIFT - 60))  # x * 2^1127, as the state stores sums


def test_round_trip_and_version_1_states_still_load():
    s = _state()
    r = ppldelta.Accumulator.from_state(s).report(n_bootstrap=50).to_dict()
    assert json.loads(json.dumps(ppldelta.Accumulator.from_state(copy.deepcopy(s)).state_dict())) == s
    v2 = copy.deepcopy(s)  # version 2: no counts of the quantized top-1 in the original's top 5 / 10
    v2["version"] = 2
    for k in ("qtop5", "qtop10"):
        del v2["has"][k], v2["counts"][k]
    assert ppldelta.Accumulator.from_state(copy.deepcopy(v2)).report(n_bootstrap=50).to_dict() == r
    v1 = copy.deepcopy(v2)
    v1["version"] = 1
    del v1["inf"], v1["ignored"]
    for g in v1["groups"].values():
        del g["inf"]
    assert ppldelta.Accumulator.from_state(v1).report(n_bootstrap=50).to_dict() == r
    with pytest.raises(ValueError, match="unknown keys"):  # version 2 never had them
        ppldelta.Accumulator.from_state({**v2, "has": s["has"], "counts": s["counts"]})
    empty = json.loads(json.dumps(ppldelta.Accumulator().state_dict()))
    assert ppldelta.Accumulator.from_state(empty).n == 0


def _set(path, value):
    def f(s):
        d = s
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


TAMPERED = {
    "positive lo sum (PPL 0.0 'excellent')": _set(("sums", "lo"), _hex(5.0)),
    "positive group lq sum": _set(("groups", "a", "lq"), _hex(3.0)),
    "n = 1e300": _set(("n",), 1e300),
    "n a string": _set(("n",), "300"),
    "n negative": _set(("n",), -1),
    "n disagrees with the histogram": _set(("n",), 301),
    "negative histogram index": lambda s: s["hist"]["dp"]["nonzero"].__setitem__(0, -1),
    "histogram index past the end": lambda s: s["hist"]["kld"]["nonzero"].__setitem__(-1, 10 ** 6),
    "negative histogram count": lambda s: s["hist"]["dp"]["counts"].__setitem__(0, -5),
    "count above n": _set(("counts", "same"), 301),
    "bool as a count": _set(("counts", "top5"), True),
    "negative sum of squares": _set(("sums", "oo"), _hex(-1.0)),
    "delta-p sum beyond n": _set(("sums", "dp"), _hex(1000.0)),
    "not hex": _set(("sums", "lq"), "zz"),
    "unknown version": _set(("version",), 4),
    "missing key": lambda s: s.pop("sums"),
    "unknown key": _set(("extra",), 1),
    "has not booleans": _set(("has", "kld"), "yes"),
    "kld sum without kld": lambda s: s["has"].__setitem__("kldr", False) or
    s["sums"].__setitem__("kldr", _hex(1.0)),
    "block lengths do not add up": lambda s: s["blocks"][1].__setitem__(0, 17.0),
    "NaN block sum": lambda s: s["blocks"][0].__setitem__(0, math.nan),
    "group larger than n": _set(("groups", "a", "n"), 10 ** 6),
    "groups hold more than n": lambda s: s["groups"].__setitem__("c", copy.deepcopy(s["groups"]["a"])) or
    s["groups"].__setitem__("d", copy.deepcopy(s["groups"]["b"])),
    "block_size zero": _set(("block_size",), 0),
    "minmax min > max": _set(("minmax", "dp"), [0.5, -0.5]),
    "inf count above n": _set(("inf", "kld"), [10 ** 6, 0]),
}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_tampered_state_is_a_value_error(name):
    s = _state()
    TAMPERED[name](s)
    with pytest.raises(ValueError, match="Accumulator state"):
        ppldelta.Accumulator.from_state(s)


def test_not_a_dict():
    for bad in (None, [], "state"):
        with pytest.raises(ValueError, match="state version"):
            ppldelta.Accumulator.from_state(bad)


def test_states_carry_infinities_and_ignored_counts_exactly():
    o = [-1.0, -2.0, -1.5, -1.0]
    a = ppldelta.Accumulator(block_size=2).update(o[:2], [-1.0, -math.inf], kld=[0.1, math.inf])
    b = ppldelta.Accumulator(block_size=2).update(o[2:], [-1.5, -1.1], kld=[0.2, 0.3])
    m = ppldelta.Accumulator.from_state(json.loads(json.dumps(a.state_dict()))).merge(
        ppldelta.Accumulator.from_state(json.loads(json.dumps(b.state_dict()))))
    r = m.report(n_bootstrap=40).to_dict()
    assert r["reference"] == ppldelta.perplexity_delta(o, [-1.0, -math.inf, -1.5, -1.1])
    assert r["kld"]["mean"] == math.inf and r["kld"]["min"] == 0.1


def _bounded_state():
    rng = np.random.default_rng(1)
    o = -rng.exponential(2.0, 120)
    q = o - 0.05
    q[7] = -math.inf
    k = rng.exponential(0.05, 120)
    k[7] = math.inf
    acc = ppldelta.Accumulator(block_size=16).update(o, q, kld=k, kld_bounds=(k / 2, k * 2),
                                                     groups=np.where(np.arange(120) % 2, "a", "b"))
    return acc


def test_state_is_strict_json_and_round_trips():
    """state_dict() is called JSON: it held float infinities (a min of +inf before any KLD, a
    block sum of +inf for a token the quantized model gives probability 0), which strict
    parsers (JavaScript, jq, json.dumps(allow_nan=False)) reject.  They are the strings
    "inf" / "-inf" now, and the state reads back to the same report."""
    for acc in (_bounded_state(), ppldelta.Accumulator(), ppldelta.Accumulator().update([-1.0, -2.0], [-1.0, -2.5])):
        text = json.dumps(acc.state_dict(), allow_nan=False)
        back = ppldelta.Accumulator.from_state(json.loads(text))
        assert json.dumps(back.state_dict(), allow_nan=False) == text
        if acc.n:
            assert back.report(n_bootstrap=0).to_dict() == acc.report(n_bootstrap=0).to_dict()
    assert '"inf"' in json.dumps(_bounded_state().state_dict(), allow_nan=False)


def test_every_field_replaced_by_any_json_value_is_a_value_error_or_a_state():
    """Every field of a state (bounds and groups included), replaced by each of a set of JSON
    values of the wrong type or range: from_state gives a ValueError or an accumulator that
    reports; never another exception (the bounds' histograms raised TypeError)."""
    base = json.loads(json.dumps(_bounded_state().state_dict()))
    values = [None, 1, -1, 1.5, "x", "0x1", "inf", [], {}, [1], [1, 2], {"a": 1}, True, 10 ** 30,
              [None, None], ["a", "b"], [[1], [2]]]

    def paths(d, p=()):
        yield p
        items = d.items() if isinstance(d, dict) else enumerate(d[:2]) if isinstance(d, list) else ()
        for k, v in items:
            yield from paths(v, p + (k,))

    count = 0
    for path in list(paths(base))[1:]:
        for v in values:
            s = copy.deepcopy(base)
            _set(path, v)(s)
            try:
                ppldelta.Accumulator.from_state(s).report(n_bootstrap=0)
            except ValueError:
                count += 1
    assert count > 1000
