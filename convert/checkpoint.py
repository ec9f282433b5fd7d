"""Read a PyTorch zip checkpoint (`torch.save(state_dict)`) into numpy arrays, without PyTorch.

The pickle is run by a restricted unpickler that knows only the handful of globals a state dict needs;
tensor bytes are memory-mapped from the zip members (stored uncompressed by torch), so a 3.5 GB checkpoint
is never read into memory twice.
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .errors import ConversionError
from .nemo import WeightsLocation

# torch storage class name -> numpy dtype of its elements (bfloat16 is read as uint16 bits).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    type: _StorageType
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(storage, _Storage):
        raise ConversionError("checkpoint: tensor built from something that is not a storage")
    ints = (storage_offset, *size, *stride)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
        raise ConversionError(f"checkpoint: bad tensor geometry size={size} stride={stride}")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, keys: set[str]):
        super().__init__(io.BytesIO(data))
        self._keys = keys

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ConversionError(
                f"checkpoint: refused pickle global {module}.{name} (only tensor-rebuild globals and "
                f"{', '.join(STORAGE_DTYPES)} are allowed)"
            ) from None

    def persistent_load(self, pid):
        # torch >= 1.6: ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ConversionError(f"checkpoint: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise ConversionError(f"checkpoint: malformed storage reference {pid!r}")
        if key not in self._keys:
            raise ConversionError(f"checkpoint: storage {key!r} is missing from the archive")
        return _Storage(stype, key, numel)


class _Window(io.RawIOBase):
    """A read-only file view of bytes [offset, offset+size) of a larger file (the ckpt inside a plain tar)."""

    def __init__(self, f, offset: int, size: int):
        self._f, self._offset, self._size, self._pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


def _data_offset(mm: mmap.mmap, base: int, info: zipfile.ZipInfo) -> int:
    """File offset of a stored member's data: after its local header (name and extra lengths vary)."""
    start = base + info.header_offset
    header = mm[start : start + 30]
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ConversionError(f"checkpoint: bad local header for {info.filename!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + 30 + name_len + extra_len


class _StorageReader:
    """Numpy arrays for storages: memory-mapped when stored uncompressed, decoded once (may be shared)."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, loc: WeightsLocation, mm: mmap.mmap):
        self._zf, self._prefix, self._loc, self._mm = zf, prefix, loc, mm
        self._cache: dict[str, np.ndarray] = {}

    def array(self, storage: _Storage) -> np.ndarray:
        if storage.key in self._cache:
            return self._cache[storage.key]
        dtype = STORAGE_DTYPES[storage.type.name]
        info = self._zf.getinfo(f"{self._prefix}data/{storage.key}")
        nbytes = storage.numel * dtype.itemsize
        if info.file_size < nbytes:
            raise ConversionError(f"checkpoint: storage {storage.key} has {info.file_size} bytes, needs {nbytes}")
        if info.compress_type == zipfile.ZIP_STORED:
            start = _data_offset(self._mm, self._loc.offset, info)
            if start + nbytes > len(self._mm):
                raise ConversionError(f"checkpoint: storage {storage.key} extends past the end of the file")
            arr = np.frombuffer(self._mm, dtype=dtype, count=storage.numel, offset=start)
        else:
            arr = np.frombuffer(self._zf.read(info), dtype=dtype, count=storage.numel)
        if storage.type.name == "BFloat16Storage":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of a float32
        self._cache[storage.key] = arr
        return arr

    def tensor(self, ref: _TensorRef) -> np.ndarray:
        flat = self.array(ref.storage)
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True)) + 1
        if all(n > 0 for n in ref.size) and extent > flat.size:
            raise ConversionError(f"checkpoint: tensor view exceeds storage {ref.storage.key}")
        base = flat[ref.offset :]
        strides = tuple(s * flat.itemsize for s in ref.stride)
        return np.lib.stride_tricks.as_strided(base, shape=ref.size, strides=strides, writeable=False)


def _prefix(zf: zipfile.ZipFile) -> str:
    pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ConversionError(f"checkpoint: expected one <prefix>/data.pkl, found {pkls}")
    prefix = pkls[0][: -len("data.pkl")]
    order = f"{prefix}byteorder"
    if order in zf.namelist() and zf.read(order).strip() != b"little":
        raise ConversionError(f"checkpoint: byteorder {zf.read(order)!r} is not supported")
    return prefix


def load_state_dict(loc: WeightsLocation) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict of read-only numpy arrays, storage type name per key); bf16 is widened to float32."""
    f = open(loc.path, "rb")  # noqa: SIM115 - kept open by the returned memory map's arrays
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            zf = zipfile.ZipFile(io.BufferedReader(_Window(f, loc.offset, loc.size)))
            prefix = _prefix(zf)
            keys = {n[len(prefix) + 5 :] for n in zf.namelist() if n.startswith(f"{prefix}data/")}
            obj = _RestrictedUnpickler(zf.read(f"{prefix}data.pkl"), keys).load()
        except (zipfile.BadZipFile, EOFError, OSError, struct.error) as e:
            raise ConversionError(f"checkpoint: truncated or corrupt model_weights.ckpt: {e}") from e
        except pickle.UnpicklingError as e:
            raise ConversionError(f"checkpoint: corrupt data.pkl: {e}") from e
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in obj.items()
        ):
            raise ConversionError("checkpoint: data.pkl is not a state dict of tensors")
        reader = _StorageReader(zf, prefix, loc, mm)
        try:
            state = {k: reader.tensor(v) for k, v in obj.items()}
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ConversionError(f"checkpoint: truncated or corrupt model_weights.ckpt: {e}") from e
        dtypes = {k: v.storage.type.name for k, v in obj.items()}
        return state, dtypes
    finally:
        f.close()  # the mmap keeps its own handle on the file


def release_pages(arrays) -> None:
    """Drop the resident pages of the memory maps behind `arrays` (read-only file maps: the data stays on disk and
    in the page cache, it just stops counting in this process's RSS). The streaming writer calls this after each
    tensor, so converting a 6 GB checkpoint never holds it all."""
    maps = {}
    for arr in arrays:
        node = arr
        while node is not None and not isinstance(node, mmap.mmap):
            node = node.obj if isinstance(node, memoryview) else getattr(node, "base", None)
        if node is not None:
            maps[id(node)] = node
    for mm in maps.values():
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED") and not mm.closed:
            mm.madvise(mmap.MADV_DONTNEED)
