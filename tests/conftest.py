import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ppldelta import _core  # noqa: E402

ISAS = _core.supported_simd()


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models run on one torch thread: as fast, and no fight with other jobs for the cores."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test once per SIMD path this CPU supports (restoring the default afterwards)."""
    before = _core.simd()
    _core._set_simd(request.param)
    yield request.param
    _core._set_simd(before)


# Hypothesis: derandomized by default, so that a run of the suite (CI's included) explores the
# same examples every time and a red run is reproducible; HYPOTHESIS_PROFILE=explore draws fresh
# examples on every run (for local bug hunting).
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
