"""ppldelta.hf._ref_torch (the torch twins of ppldelta.refstats) against the CPU functions: the
device code runs here on CPU tensors (float64, float32, bfloat16 logits)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ppldelta import refstats as rs  # noqa: E402
from ppldelta.hf import _ref_torch as rt  # noqa: E402


def _rows(seed, n, V):
    r = np.random.default_rng(seed)
    a = r.normal(size=(n, V)) * 3
    a[:, 5:30] = a[:, 5:6]              # ties across the top-K boundary
    a[:2, 40:60] = -np.inf              # -inf logits
    b = a + r.normal(size=(n, V)) * 0.3
    b[:, 40:60] = np.where(np.isfinite(b[:, 40:60]), b[:, 40:60], 0.0)
    b[2, 7] = -np.inf
    return a, b, r.integers(0, V, n)


@pytest.mark.parametrize("k", [4, 10, 32, 400])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_device_path_equals_cpu_functions(k, dtype):
    a, b, t = _rows(0, 50, 300)
    ta, tb = torch.tensor(a).to(dtype), torch.tensor(b).to(dtype)
    r_cpu = rs.summarize(ta, t, k)
    r_dev = rt._summarize_device(ta, torch.tensor(t), k)
    assert rs.n_probes(r_cpu) == rs.n_probes(r_dev) == rs.DEFAULT_PROBES
    for f in ("token", "lp", "ids", "lps", "pids", "plps"):
        assert np.array_equal(r_cpu[f], r_dev[f]), f
    for f in ("entropy", "tail", "lp_min"):
        np.testing.assert_allclose(r_dev[f], r_cpu[f], rtol=1e-13, atol=1e-13)
    o_cpu, o_dev = rs.compare(tb, r_cpu), rt._compare_device(tb, r_cpu)
    assert list(o_cpu) == list(o_dev) == list(rs.KEYS)
    for key, v in o_cpu.items():
        if v is None:
            assert o_dev[key] is None
        elif v.dtype == bool or key.endswith("log_probs") or key == "delta_p":
            assert np.array_equal(v, o_dev[key]), key
        else:
            np.testing.assert_allclose(o_dev[key], v, rtol=1e-12, atol=1e-12, err_msg=key)


def test_public_twins_route_cpu_tensors_to_the_cpu_functions():
    a, b, t = _rows(1, 20, 100)
    rec = rt.summarize_torch(torch.tensor(a), torch.tensor(t), 8)
    assert np.array_equal(rec, rs.summarize(a, t, 8))
    out = rt.compare_torch(torch.tensor(b), rec)
    ref = rs.compare(b, rec)
    assert all(np.array_equal(out[k], ref[k]) for k in rs.KEYS if ref[k] is not None)
