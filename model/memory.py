"""Handing freed memory back to the system when the server goes idle.

After long files the process keeps what it allocated: MLX's buffer cache (raised to 512 MB on the CPU backend,
model/cpu_layout.py) and glibc's malloc arenas, which keep freed heap pages instead of unmapping them. Clearing the
cache and `malloc_trim` when the engine has gone idle brings the process back near its working set; the first
request after an idle period pays for faulting its pages in again, as the very first one does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys

import mlx.core as mx


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only; musl has none
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect garbage (cycles may hold MLX arrays), free MLX's cached buffers and return the heap's free pages to
    the system (glibc)."""
    gc.collect()
    mx.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def memory_in_use() -> tuple[int, int] | None:
    """MLX's (active, peak) bytes of arrays, or None where this MLX cannot say."""
    try:
        return int(mx.get_active_memory()), int(mx.get_peak_memory())
    except AttributeError:  # MLX before 0.24 kept these under mx.metal
        return None
