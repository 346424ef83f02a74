"""Single-thread memory read bandwidth of this machine, measured by a plain C read loop compiled
on the spot (the ceiling the reductions are compared with).  Falls back to NumPy's sum of
uint64 words when no C compiler is available."""
import ctypes
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

_SRC = r"""
#include <stddef.h>
#include <stdint.h>
uint64_t read_words(const uint64_t *p, size_t n) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) { a += p[i]; b += p[i + 1]; c += p[i + 2]; d += p[i + 3]; }
    for (; i < n; i++) a += p[i];
    return a + b + c + d;
}
"""
_lib = None


def _load():
    global _lib
    if _lib is None:
        d = tempfile.mkdtemp(prefix="ppldelta-probe-")
        src, so = os.path.join(d, "probe.c"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_SRC)
        cc = sysconfig.get_config_var("CC") or "cc"
        try:
            subprocess.run(cc.split() + ["-O3", "-shared", "-fPIC", src, "-o", so], check=True,
                           capture_output=True)
            _lib = ctypes.CDLL(so)
            _lib.read_words.restype = ctypes.c_uint64
            _lib.read_words.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        except (OSError, subprocess.CalledProcessError):
            print("(no C compiler: read bandwidth from NumPy instead)", file=sys.stderr)
            _lib = False
    return _lib


def read_seconds(arrays, repeat=5):
    """Best time to read every byte of the given contiguous arrays once."""
    lib = _load()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for a in arrays:
            words = a.view(np.uint8)[: a.nbytes // 8 * 8].view(np.uint64)
            if lib:
                lib.read_words(words.ctypes.data, words.size)
            else:
                words.sum()
        best = min(best, time.perf_counter() - t0)
    return best
