"""Resolve a MODEL spec (converted dir, `.nemo` file, or Hugging Face repo id) to a converted directory.

`.nemo` files are converted once into a cache dir keyed by the file's identity and the output dtype; an fcntl
lock per target plus the converter's atomic rename let several processes resolve the same model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .config import FORMAT_VERSION
from .errors import ConversionError
from .write import CONFIG_FILE, check_dtype

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_PATTERNS = ["*.nemo", "*.json", "*.md"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CANARY_CACHE_DIR") or Path.home() / ".cache" / "canary-server")


def cache_key(nemo: Path, dtype: str) -> str:
    """Short hash of what makes a conversion unique: the file (path, size, mtime), dtype, output format."""
    st = nemo.stat()
    ident = f"{nemo.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{FORMAT_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_cached(nemo: Path, cache_dir: Path, dtype: str, name: str | None = None) -> Path:
    from . import convert_nemo  # the package imports this module's siblings; avoid a cycle

    target = cache_dir / f"{name or nemo.stem}-{cache_key(nemo, dtype)}"
    if (target / CONFIG_FILE).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{target.name}.lock"):
        if (target / CONFIG_FILE).is_file():  # another process finished it while we waited
            return target
        # Staging dirs of a conversion that was killed; only lock holders create them, so none is live.
        for stale in cache_dir.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log.info("converting %s into %s (first use)", nemo, target)
        # A target without config.json can only be foreign debris (publishing is atomic): replace it.
        convert_nemo(nemo, target, dtype=dtype, overwrite=True)
    return target


def _hub_cache_dir() -> str | None:
    """huggingface_hub reads HF_HUB_CACHE / HF_HOME once at import; read them now so later changes count."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_nemo(repo_id: str) -> Path:
    """The single `.nemo` of a Hugging Face repo, from the local hub cache or downloaded (not when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = _offline()
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                allow_patterns=HUB_PATTERNS,
                cache_dir=_hub_cache_dir(),
                local_files_only=offline,
            )
        )
    except LocalEntryNotFoundError as e:
        where = _hub_cache_dir() or "the default Hugging Face cache"
        how = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ConversionError(f"{repo_id}: not in {where} and {how}; download it first") from e
    except HFValidationError as e:
        raise ConversionError(f"{repo_id}: not a valid Hugging Face repo id: {e}") from e
    except OSError as e:  # includes requests/httpx errors and RepositoryNotFoundError (an HTTP error)
        raise ConversionError(f"{repo_id}: could not download from the Hugging Face Hub: {e}") from e
    nemos = sorted(snapshot.glob("*.nemo"))
    if len(nemos) != 1:
        found = ", ".join(p.name for p in nemos) or "none"
        raise ConversionError(f"{repo_id}: expected exactly one .nemo file in the repo, found {found}")
    return nemos[0]


def resolve_model(spec: str, cache_dir: Path | None = None, dtype: str = "float32") -> Path:
    """A converted directory for MODEL `spec`: a converted dir, a `.nemo` file, or a Hugging Face repo id.

    `.nemo` files (local or downloaded) are converted once into `cache_dir` (default `$CANARY_CACHE_DIR` or
    `~/.cache/canary-server`) and reused while the file is unchanged.
    """
    check_dtype(dtype)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConversionError(f"{path}: directory has no {CONFIG_FILE}; not a converted model directory")
        return path
    if path.is_file():
        if path.suffix != ".nemo":
            raise ConversionError(f"{path}: not a .nemo file or a converted model directory")
        return _convert_cached(path, cache_dir, dtype)
    if path.suffix == ".nemo" or not _REPO_ID.match(spec):
        raise ConversionError(f"{spec}: no such file or directory (and not a Hugging Face repo id)")
    nemo = download_nemo(spec)
    # Hub files are symlinks into blobs/; name the cache entry after the repo file, key it by the blob.
    return _convert_cached(nemo.resolve(), cache_dir, dtype, name=nemo.stem)
