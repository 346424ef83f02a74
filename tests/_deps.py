"""Optional test dependencies: the NumPy-only core is tested without torch; CI installs it and
runs everything."""
import pytest

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
