"""Write a converted directory atomically: everything goes into a hidden staging dir beside OUT_DIR,
which is renamed into place only when complete, so an interrupted conversion never leaves a loadable dir."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
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


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden dir beside OUT_DIR (same filesystem: the final rename is atomic); removed on failure.

    The dir is flock'ed while in use, so `remove_stale_staging` can tell it from one a killed conversion left."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=out_dir.parent))
        fd = os.open(staging, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if staging.is_dir():  # not removed as stale between mkdtemp and the lock
            break
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the published dir should look like a normal one
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(fd)  # releases the lock (also when the process dies)


def remove_stale_staging(out_dir: Path) -> list[tuple[Path, int]]:
    """Remove the staging dirs of OUT_DIR that no live conversion holds (a killed run leaves them, up to the size
    of the checkpoint). Returns (dir, bytes) of each one removed."""
    removed = []
    for stale in sorted(out_dir.parent.glob(_staging_prefix(out_dir) + "*")):
        if not stale.is_dir() or stale.is_symlink():
            continue
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a conversion into OUT_DIR is running in another process
            os.close(fd)
            continue
        try:
            size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(stale)
            removed.append((stale, size))
        finally:
            os.close(fd)
    return removed


def cast_weights(
    weights: dict[str, np.ndarray], dtype: str, on_tensor: Callable[[int], object] | None = None
) -> dict[str, mx.array]:
    """MLX arrays in `dtype`, except the float32-only buffers (FLOAT32_KEYS) and integer tensors.

    `on_tensor(nbytes)` is called after each tensor is read and cast (progress: the source bytes done)."""
    target = check_dtype(dtype)
    arrays = {}
    for name, value in weights.items():
        arr = mx.array(np.ascontiguousarray(value))
        if mx.issubdtype(arr.dtype, mx.floating):
            arr = arr.astype(mx.float32 if name in FLOAT32_KEYS else target)
        arrays[name] = arr
        if on_tensor is not None:
            mx.eval(arr)  # do the cast now, so progress follows the work (saving evaluates it otherwise)
            on_tensor(value.nbytes)
    return arrays


def write_weights(directory: Path, arrays: dict[str, mx.array], name: str = WEIGHTS_FILE) -> None:
    mx.save_safetensors(str(directory / name), arrays, metadata={"format": "mlx"})


# numpy dtype of a tensor as written -> safetensors dtype code (bfloat16 is written from its uint16 bits)
_ST_CODES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64",
             np.dtype("int32"): "I32", np.dtype("uint32"): "U32"}  # fmt: skip


def stream_weights(
    directory: Path,
    tensors: dict[str, np.ndarray],
    dtype: str,
    name: str = WEIGHTS_FILE,
    after_each: Callable[[np.ndarray], None] | None = None,
) -> int:
    """Write `tensors` (numpy arrays or views, e.g. of a memory-mapped checkpoint) as one safetensors file, one
    tensor at a time: floats cast to `dtype` (FLOAT32_KEYS stay float32), integers kept, the same bytes MLX's
    `save_safetensors` writes for `cast_weights(tensors, dtype)`. Memory stays at one tensor; `after_each(value)`
    runs after each is written (to drop its pages). Returns the bytes of tensor data written."""
    target = check_dtype(dtype)
    plan, offset = [], 0
    for key, value in tensors.items():
        floating = np.issubdtype(value.dtype, np.floating)
        out = (mx.float32 if key in FLOAT32_KEYS else target) if floating else None
        if out is None:
            code, itemsize = _ST_CODES[value.dtype], value.dtype.itemsize
        else:
            code, itemsize = {mx.float32: ("F32", 4), mx.float16: ("F16", 2), mx.bfloat16: ("BF16", 2)}[out]
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * itemsize
        plan.append((key, value, out, code, nbytes, offset))
        offset += nbytes
    header = {"__metadata__": {"format": "mlx"}}
    header |= {k: {"dtype": c, "shape": list(v.shape), "data_offsets": [o, o + n]} for k, v, _, c, n, o in plan}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writers do
    with open(directory / name, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, value, out, _, nbytes, _ in plan:
            data = _as_written(value, out)
            assert data.nbytes == nbytes
            f.write(memoryview(data).cast("B"))
            if after_each is not None:
                after_each(value)
    return offset


def _as_written(value: np.ndarray, out: mx.Dtype | None) -> np.ndarray:
    """One tensor's bytes in the output dtype (contiguous); bfloat16 cast by MLX, as `cast_weights` does."""
    if out is None:
        return np.ascontiguousarray(value)
    if out == mx.float32:
        return np.ascontiguousarray(value, dtype=np.float32)
    if out == mx.float16:
        return np.ascontiguousarray(value, dtype=np.float32).astype(np.float16)
    return np.array(mx.array(np.ascontiguousarray(value, dtype=np.float32)).astype(mx.bfloat16).view(mx.uint16))


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
