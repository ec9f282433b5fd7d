"""Load OpenBLAS before MLX on Linux.

The `mlx[cpu]` wheel links a slow reference BLAS; a 1024x1024 fp32 matmul is ~20-40x slower than with
OpenBLAS. Loading Debian's `libopenblas.so.0` with RTLD_GLOBAL before `import mlx` makes MLX's cblas
calls resolve to it. Set CANARY_NO_OPENBLAS=1 to skip. No effect on macOS (MLX uses Accelerate/Metal).
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
_loaded: str | None = None


def preload_openblas() -> str | None:
    """Return the OpenBLAS path loaded (or None). Idempotent; warns once if MLX was imported first."""
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux") or os.environ.get("CANARY_NO_OPENBLAS"):
        return _loaded
    if "mlx.core" in sys.modules:
        warnings.warn("mlx was imported before model.blas: OpenBLAS preload skipped", RuntimeWarning, stacklevel=2)
        _loaded = ""
        return _loaded
    for name in _CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = name
        return _loaded
    _loaded = ""
    print(
        "canary-server: libopenblas.so.0 not found; fp32 matmuls will be slow (apt-get install libopenblas0-pthread)",
        file=sys.stderr,
    )
    return _loaded
