import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ppldelta import _core  # noqa: E402

ISAS = _core.supported_simd()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test once per SIMD path this CPU supports (restoring the default afterwards)."""
    before = _core.simd()
    _core._set_simd(request.param)
    yield request.param
    _core._set_simd(before)
