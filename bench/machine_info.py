"""The machine a benchmark ran on, in one line to paste beside its numbers: OS, CPU, cores, memory, MLX and device.

Works on macOS and Linux without anything platform-specific being required: every probe is optional (sysctl on
macOS, /proc/cpuinfo on Linux, psutil or sysconf for memory) and a probe that fails is left out.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def cpu_name() -> str:
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (getrusage: kilobytes on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def mlx_device() -> str:
    """MLX's version, default device and, for a GPU, its name as MLX reports it."""
    import mlx.core as mx

    text = f"MLX {mx.__version__}, {mx.default_device()}"
    if mx.default_device() != mx.cpu:
        try:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            name = info.get("device_name") or info.get("architecture")
            if name:
                text += f" ({name})"
        except Exception:  # noqa: BLE001 - a probe only
            pass
    return text


def describe(with_mlx: bool = True) -> str:
    mem = memory_bytes()
    parts = [f"{platform.system()} {platform.release()} {platform.machine()}", cpu_name(), f"{os.cpu_count()} cores"]
    if mem:
        parts.append(f"{mem / 2**30:.0f} GiB")
    parts.append(f"Python {platform.python_version()}")
    if with_mlx:
        parts.append(mlx_device())
    return ", ".join(parts)
