"""Build the optional Linux C helper (canary_server/_gemv_forward.c); everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and MLX uses OpenBLAS's sgemm for everything
(slower decoding at batch 1-12 on Linux CPUs, same results). Not built on macOS (MLX uses Accelerate and Metal there).
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "canary_server._gemv_forward",
            sources=["canary_server/_gemv_forward.c"],
            extra_compile_args=["-O2", "-pthread", "-Wno-psabi"],  # psabi: a note on 32-byte vector arguments
            extra_link_args=["-pthread"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
