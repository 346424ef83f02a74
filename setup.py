"""Builds the C extension ppldelta._core (metadata lives in pyproject.toml).

Environment switches (all optional):
  PPLDELTA_WERROR=1    add -Werror (CI builds with it)
  PPLDELTA_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer build (see tests/reliability/)
No native-architecture flags: SIMD paths are chosen at run time (csrc/dispatch.c), so a wheel built here
runs on any x86-64.
"""
import os
import sys
from glob import glob

import numpy
from setuptools import Extension, setup

compile_args = []
link_args = []
if sys.platform != "win32":
    compile_args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-strict-aliasing", "-pthread"]
    link_args = ["-pthread"]
    if os.environ.get("PPLDELTA_WERROR"):
        compile_args.append("-Werror")
    if os.environ.get("PPLDELTA_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        compile_args += san + ["-O1", "-g"]
        link_args += san

setup(
    ext_modules=[
        Extension(
            "ppldelta._core",
            sources=sorted(glob("csrc/*.c")),
            depends=sorted(glob("csrc/*.h")),
            include_dirs=[numpy.get_include(), "csrc"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]
)
