"""Load OpenBLAS before MLX on Linux, with matrix-vector products sent to sgemv.

The `mlx[cpu]` wheel links a slow reference BLAS; a 1024x1024 fp32 matmul is ~20-40x slower than with
OpenBLAS. Loading Debian's `libopenblas.so.0` with RTLD_GLOBAL before `import mlx` makes MLX's cblas
calls resolve to it. Set CANARY_NO_OPENBLAS=1 to skip. No effect on macOS (MLX uses Accelerate/Metal).

Before OpenBLAS, the small C library built from `_gemv_forward.c` at install (when a C compiler was there) is
loaded the same way: its `cblas_sgemm` sends single-row and single-column products (the batch-1 decoder step) to
OpenBLAS's sgemv, ~1.5x faster there, and everything else to OpenBLAS's sgemm. `CANARY_NO_GEMV_FORWARD=1` turns it
off (bench/decoder_step.py compares both); without the built library MLX simply calls sgemm for everything. It
also computes products of 2..12 rows with nn.Linear weights itself (decoder steps at batch 2..12, the prompt
prefill, beam search) on two threads, reading each weight once instead of sgemm's pack-then-read.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path

_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
OPENBLAS_THREAD_TIMEOUT = 20  # log2 of the cycles an idle OpenBLAS thread spins before it sleeps (its default: 28)
_loaded: str | None = None
_forward: ctypes.CDLL | None = None


def preload_openblas() -> str | None:
    """Return the OpenBLAS path loaded (or None). Idempotent; warns once if MLX was imported first."""
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux") or os.environ.get("CANARY_NO_OPENBLAS"):
        return _loaded
    if "mlx.core" in sys.modules:
        warnings.warn("mlx was imported before model.blas: OpenBLAS preload skipped", RuntimeWarning, stacklevel=2)
        _loaded = ""
        return _loaded
    # OpenBLAS's idle threads spin for 2**28 cycles (~0.1 s) after each call before they sleep; on 2 cores that
    # spinning starves the few-row kernel's helper thread right after an encoder matmul (a 1b-dims prompt prefill:
    # 28 -> 66 ms). 2**20 cycles (~0.3 ms) keeps them awake between back-to-back calls (same sgemm and sgemv
    # times: bench/decoder_step.py, bench/encoder_ops.py). Read once, when OpenBLAS loads; a value set by the
    # user wins; not left in the environment of child processes.
    timeout_set = "OPENBLAS_THREAD_TIMEOUT" not in os.environ
    if timeout_set:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(OPENBLAS_THREAD_TIMEOUT)
    try:
        name = _find_openblas()
    finally:
        if timeout_set:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    if name is None:
        _loaded = ""
        print(
            "canary-server: libopenblas.so.0 not found; fp32 matmuls will be slow "
            "(apt-get install libopenblas0-pthread)",
            file=sys.stderr,
        )
        return _loaded
    # The forwarder only once OpenBLAS is known to load (its sgemm calls OpenBLAS's), and before OpenBLAS joins the
    # global scope: MLX's cblas_sgemm must resolve to the forwarder's.
    forward = _load_forwarder()
    blas = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    _loaded = name
    _init_forwarder(forward, blas)
    return _loaded


def openblas_core() -> str | None:
    """The kernels the loaded OpenBLAS runs (its `openblas_get_corename()`: 'Haswell', 'SkylakeX', ...; chosen by
    CPU model, or by OPENBLAS_CORETYPE), or None when OpenBLAS is not loaded. Benches print it."""
    if not _loaded:
        return None
    try:
        fn = ctypes.CDLL(_loaded).openblas_get_corename
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode("ascii", "replace")


def _find_openblas() -> str | None:
    """The first candidate that loads, loaded privately (RTLD_LOCAL: none of its symbols visible yet)."""
    for name in _CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_LOCAL)
        except OSError:
            continue
        return name
    return None


def _load_forwarder() -> ctypes.CDLL | None:
    """The library built from _gemv_forward.c beside this file (editable or installed), loaded globally."""
    for path in sorted(Path(__file__).resolve().parent.glob("_gemv_forward*.so")):
        try:
            return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def _init_forwarder(forward: ctypes.CDLL | None, blas: ctypes.CDLL) -> None:
    global _forward
    if forward is None:
        return
    try:
        sgemm, sgemv = blas.cblas_sgemm, blas.cblas_sgemv
    except AttributeError:
        return
    enabled = 0 if os.environ.get("CANARY_NO_GEMV_FORWARD") else 1
    address = ctypes.cast(sgemm, ctypes.c_void_p), ctypes.cast(sgemv, ctypes.c_void_p)
    if forward.canary_gemv_forward_init(*address, enabled):
        _forward = forward


def gemv_counts() -> tuple[int, int] | None:
    """(matmuls sent to sgemv, matmuls sent to sgemm) so far, or None when the forwarder is not in use."""
    if _forward is None:
        return None
    _forward.canary_gemv_forwarded.restype = ctypes.c_ulong
    _forward.canary_gemv_passed.restype = ctypes.c_ulong
    return int(_forward.canary_gemv_forwarded()), int(_forward.canary_gemv_passed())


def small_m_count() -> int | None:
    """Matmuls of 2..`small_m_max()` rows computed by the library's own kernel so far, or None when it is not in
    use."""
    if _forward is None:
        return None
    _forward.canary_small_m_count.restype = ctypes.c_ulong
    return int(_forward.canary_small_m_count())


def small_m_max() -> int | None:
    """The most rows the library's own kernel computes on this CPU (64 with AVX2 or AVX-512, 12 without; more go to
    sgemm), or None when it is not in use."""
    if _forward is None:
        return None
    return int(_forward.canary_small_m_max())


SMALL_M_ISAS = ("generic", "avx2", "avx512")  # the few-row kernel's builds, by the library's numbering


def small_m_isa() -> str | None:
    """The instruction set the few-row kernel runs with ('avx512', 'avx2' or 'generic'), or None when not in use."""
    if _forward is None:
        return None
    return SMALL_M_ISAS[_forward.canary_small_m_isa(-2)]


def set_small_m_isa(name: str | None) -> str | None:
    """Run the few-row kernel's `name` build (tests and benches compare them) if this CPU has it, else its best;
    None: its best. Returns the previous one (None when the library is not in use)."""
    previous = small_m_isa()
    if previous is not None:
        _forward.canary_small_m_isa(-1 if name is None else SMALL_M_ISAS.index(name))
    return previous


def set_gemv_forward(enabled: bool) -> bool:
    """Turn the sgemv forwarding on or off at run time (benches compare both in one process). False when the
    forwarder is not in use (then nothing changes)."""
    if _forward is None:
        return False
    _forward.canary_gemv_forward_enable(1 if enabled else 0)
    return True
