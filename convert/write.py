"""Write a converted directory atomically: everything goes into a hidden staging dir beside OUT_DIR,
which is renamed into place only when complete, so an interrupted conversion never leaves a loadable dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ConversionError
from .mapping import FLOAT32_KEYS

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def check_dtype(dtype: str) -> mx.Dtype:
    if dtype not in DTYPES:
        raise ConversionError(f"dtype: unsupported value {dtype!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to replace an existing non-empty OUT_DIR unless asked to."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ConversionError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise ConversionError(f"{out_dir}: directory exists and is not empty (pass overwrite=True to replace it)")


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden dir beside OUT_DIR (same filesystem: the final rename is atomic); removed on failure."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the published dir should look like a normal one
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def cast_weights(weights: dict[str, np.ndarray], dtype: str) -> dict[str, mx.array]:
    """MLX arrays in `dtype`, except the float32-only buffers (FLOAT32_KEYS) and integer tensors."""
    target = check_dtype(dtype)
    arrays = {}
    for name, value in weights.items():
        arr = mx.array(np.ascontiguousarray(value))
        if mx.issubdtype(arr.dtype, mx.floating):
            arr = arr.astype(mx.float32 if name in FLOAT32_KEYS else target)
        arrays[name] = arr
    return arrays


def write_weights(directory: Path, arrays: dict[str, mx.array], name: str = WEIGHTS_FILE) -> None:
    mx.save_safetensors(str(directory / name), arrays, metadata={"format": "mlx"})


def write_config(directory: Path, config: dict) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def copy_tokenizers(directory: Path, files: dict[str, Path]) -> None:
    """`files`: destination file name (from config.json) -> extracted source file."""
    for name, src in files.items():
        shutil.copyfile(src, directory / name)


def publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the complete staging dir to OUT_DIR; an old OUT_DIR (overwrite=True) is swapped out, removed."""
    check_out_dir(out_dir, overwrite)
    old = None
    if out_dir.exists() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "dir")
    os.replace(staging, out_dir)  # atomic; replaces an empty OUT_DIR too
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
