"""Accumulator: streaming, merging in any order, state round trips, torch.distributed."""
import json
import math

import numpy as np
import pytest

import ppldelta
from _deps import needs_torch
from ppldelta.accumulate import exact_sum
from _dist_worker import data, worker


def test_exact_sum_is_exact():
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.exponential(3, 5000), [1e300, -1e300, 5e-324, -2.5e-310, 1e-20]])
    assert exact_sum(x) / (1 << 1127) == math.fsum(x.tolist())
    assert exact_sum([]) == 0


def _chunks(o, q, kld, labels, sizes):
    i = 0
    for s in sizes:
        yield o[i:i + s], q[i:i + s], kld[i:i + s], labels[i:i + s]
        i += s


def test_merge_in_any_order_equals_one_pass():
    o, q, kld, labels = data(1, 5000)
    sizes = [700, 1300, 1000, 2000]
    one = ppldelta.Accumulator(block_size=50)
    parts = []
    for co, cq, ck, cl in _chunks(o, q, kld, labels, sizes):
        one.update(co, cq, kld=ck, groups=cl)
        parts.append(ppldelta.Accumulator(block_size=50).update(co, cq, kld=ck, groups=cl))
    want = json.dumps(one.report().to_dict(), sort_keys=True)
    for perm in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        m = ppldelta.Accumulator(block_size=50)
        for i in perm:
            m.merge(ppldelta.Accumulator.from_state(json.loads(json.dumps(parts[i].state_dict()))))
        assert json.dumps(m.report().to_dict(), sort_keys=True) == want
    # tree merge
    a = ppldelta.Accumulator(block_size=50).merge(parts[0]).merge(parts[2])
    b = ppldelta.Accumulator(block_size=50).merge(parts[3]).merge(parts[1])
    assert json.dumps(b.merge(a).report().to_dict(), sort_keys=True) == want


def test_report_agrees_with_analyze():
    o, q, kld, labels = data(2, 8000)
    acc = ppldelta.Accumulator(block_size=64)
    for co, cq, ck, cl in _chunks(o, q, kld, labels, [3000, 5000]):
        acc.update(co, cq, kld=ck, groups=cl)
    r = acc.report().to_dict()
    a = ppldelta.analyze(o, q, kld=kld, groups=labels).to_dict()
    assert r["reference"] == a["reference"] == ppldelta.perplexity_delta(o, q)
    for g in ("code", "prose"):
        assert r["groups"][g]["reference"] == a["groups"][g]["reference"]
    for path in (("ppl", "quantized", "value"), ("ppl_ratio", "value"), ("ln_ppl_ratio", "stderr"),
                 ("correlation",), ("kld", "mean"), ("delta_p", "rms")):
        x, y = r, a
        for k in path:
            x, y = x[k], y[k]
        assert x == pytest.approx(y, rel=1e-9), path
    for k in ("median", "p90", "p99"):
        assert r["kld"][k] == pytest.approx(a["kld"][k], rel=0.03)
    assert r["kld"]["max"] == a["kld"]["max"] and r["kld"]["min"] == a["kld"]["min"]
    assert r["delta_p"]["median"] == pytest.approx(a["delta_p"]["median"], abs=0.02)


def test_from_logits_every_top_k_rate_of_analyze():
    """Fed logits, analyze reports both directions of the top-k agreement; the Accumulator had
    dropped the quantized top-1 in the original's top 5 / 10.  Oracle: NumPy's argsort here.
    Updates in parts, merged through JSON states, give analyze's counts exactly."""
    rng = np.random.default_rng(11)
    a = rng.normal(0, 2, (300, 64))
    b = a + rng.normal(0, 0.8, a.shape)
    t = rng.integers(0, 64, 300)
    want = ppldelta.analyze(None, None, original_logits=a, quantized_logits=b, targets=t, n_bootstrap=0)
    parts = [ppldelta.Accumulator().update(None, None, original_logits=a[i:j], quantized_logits=b[i:j],
                                           targets=t[i:j]) for i, j in ((0, 100), (100, 300))]
    acc = ppldelta.Accumulator()
    for p in parts:
        acc.merge(ppldelta.Accumulator.from_state(json.loads(json.dumps(p.state_dict(), allow_nan=False))))
    got = acc.report(n_bootstrap=0)
    order_a, order_b = np.argsort(-a, axis=1), np.argsort(-b, axis=1)
    for k in (5, 10):
        fwd = np.mean([order_a[i, 0] in order_b[i, :k] for i in range(300)]) * 100
        rev = np.mean([order_b[i, 0] in order_a[i, :k] for i in range(300)]) * 100
        assert got[f"top1_in_top{k}"] == want[f"top1_in_top{k}"] == pytest.approx(fwd, abs=1e-12)
        assert got[f"q_top1_in_base_top{k}"] == want[f"q_top1_in_base_top{k}"] == pytest.approx(rev, abs=1e-12)
    assert 0 < rev < 100 and fwd != rev  # the two directions differ on these data
    with pytest.raises(ValueError, match="same per-token arrays"):  # log-probs alone carry neither
        acc.update(np.full(3, -1.0), np.full(3, -1.0), top1_in_top5=[1, 1, 0])


def test_errors_and_consistency():
    acc = ppldelta.Accumulator()
    with pytest.raises(ValueError, match="empty"):
        acc.report()
    acc.update([-1.0, -2.0], [-1.5, -2.5], kld=[0.1, 0.2])
    with pytest.raises(ValueError, match="same per-token arrays"):
        acc.update([-1.0], [-1.0])
    with pytest.raises(ValueError, match="NaN"):
        acc.update([-1.0, math.nan], [-1.0, -1.0], kld=[0, 0])
    with pytest.raises(ValueError, match="block sizes differ"):
        acc.merge(ppldelta.Accumulator(block_size=3))


@needs_torch
def test_distributed_all_reduce_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1
    o, q, kld, labels = data()
    assert r0["reference"] == ppldelta.perplexity_delta(o, q)
    one = ppldelta.Accumulator(block_size=64)
    for part in np.array_split(np.arange(o.size), 2):
        one.update(o[part], q[part], kld=kld[part], groups=labels[part])
    assert json.loads(json.dumps(one.report(seed=3).to_dict())) == r0


def test_groups_on_every_update_or_none():
    rng = np.random.default_rng(4)
    o = -rng.exponential(2.0, 1000)
    q = o - rng.normal(0.01, 0.05, 1000).clip(0)
    acc = ppldelta.Accumulator().update(o[:500], q[:500], groups=["a"] * 500)
    with pytest.raises(ValueError, match="the first had groups, this one none"):
        acc.update(o[500:], q[500:])
    assert acc.n == 500  # a refused update changes nothing
    plain = ppldelta.Accumulator().update(o[:500], q[:500])
    with pytest.raises(ValueError, match="the first had no groups"):
        plain.update(o[500:], q[500:], groups=["a"] * 500)
    with pytest.raises(ValueError, match="has groups and the other none"):
        plain.merge(acc)


def test_shared_between_threads_equals_one_shot():
    """Four threads updating one accumulator (the kernels release the GIL mid-update): the exact
    sums and the report equal the one-shot ones (they lost updates before its lock)."""
    import copy
    import pickle
    import threading

    from ppldelta.accumulate import exact_sum

    rng = np.random.default_rng(5)
    n, parts = 40_000, 40
    o = -rng.exponential(2.0, n)
    q = o - rng.normal(0.01, 0.05, n).clip(0)
    acc = ppldelta.Accumulator()
    chunks = np.array_split(np.arange(n), parts)

    def work(k):
        for c in chunks[k::4]:
            acc.update(o[c], q[c])
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert acc.n == n and acc.sums["lo"] == exact_sum(o) and acc.sums["lq"] == exact_sum(q)
    one = ppldelta.Accumulator().update(o, q).report(n_bootstrap=0)
    assert acc.report(n_bootstrap=0).reference == one.reference
    twin = pickle.loads(pickle.dumps(acc))  # the lock is not state
    assert twin.sums == acc.sums and copy.deepcopy(acc).update(o[:5], q[:5]).n == n + 5
