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
from .progress import ProgressFactory
from .write import CONFIG_FILE, check_dtype

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_PATTERNS = ["*.nemo", "*.json", "*.md"]
# canary-qwen-2.5b (a NeMo SALM) has no .nemo: its weights, and its LLM's config and tokenizer from that LLM's repo.
SALM_PATTERNS = ["config.json", "model.safetensors"]
LLM_PATTERNS = ["config.json", "tokenizer.json", "tokenizer_config.json"]


def default_cache_dir() -> Path:
    return expand(os.environ.get("CANARY_CACHE_DIR") or Path.home() / ".cache" / "canary-server")


def expand(path: str | Path) -> Path:
    """`~` and `$VARS` expanded (a path from a TOML file or an env var never went through a shell)."""
    return Path(os.path.expanduser(os.path.expandvars(str(path))))


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


def _convert_cached(
    nemo: Path,
    cache_dir: Path,
    dtype: str,
    name: str | None = None,
    progress: ProgressFactory | None = None,
    convert=None,
) -> Path:
    """`convert(out_dir)`: how to convert (default: `convert_nemo` of `nemo`, the file keying the cache entry)."""
    from . import convert_nemo  # the package imports this module's siblings; avoid a cycle

    if convert is None:

        def convert(target: Path) -> Path:
            return convert_nemo(nemo, target, dtype=dtype, overwrite=True, progress=progress)

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
        convert(target)
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


LOCAL_MODEL_HINT = "or point --model at a .nemo file or a converted directory"


def _how_to_download(repo_id: str) -> str:
    return (
        f"download it first, with a network and without HF_HUB_OFFLINE: `canary-server download {repo_id}` "
        f"(or `hf download {repo_id}`), {LOCAL_MODEL_HINT}"
    )


def _hub_cache_name() -> str:
    if _hub_cache_dir():
        return _hub_cache_dir()
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _snapshot(repo_id: str, patterns: list[str], progress: ProgressFactory | None) -> Path:
    """The repo's files matching `patterns`, from the local hub cache or downloaded (not when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _offline()
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=patterns,
                cache_dir=_hub_cache_dir(),
                local_files_only=offline,
                tqdm_class=progress,
            )
        )
    except LocalEntryNotFoundError as e:
        where = f"{repo_id}: not in {_hub_cache_name()}"
        if offline:
            raise ConversionError(f"{where} and HF_HUB_OFFLINE is set; {_how_to_download(repo_id)}") from e
        cause = e.__cause__ or e.__context__
        reason = f" ({type(cause).__name__}: {_first_line(cause)})" if cause is not None else ""
        raise ConversionError(
            f"{where} and the Hugging Face Hub could not be reached{reason}; check the network (HTTPS_PROXY, "
            f"HF_ENDPOINT) and retry, {LOCAL_MODEL_HINT}"
        ) from e
    except HFValidationError as e:
        raise ConversionError(f"{repo_id}: not a valid Hugging Face repo id: {e}") from e
    except RepositoryNotFoundError as e:
        raise ConversionError(
            f"{repo_id}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        ) from e
    except OSError as e:  # includes requests/httpx errors
        raise ConversionError(f"{repo_id}: could not download from the Hugging Face Hub: {_first_line(e)}") from e


def download_nemo(repo_id: str, progress: ProgressFactory | None = None) -> Path:
    """The single `.nemo` of a Hugging Face repo, from the local hub cache or downloaded (not when offline).

    `progress`: the tqdm class for the download's bars (None: huggingface_hub's own)."""
    return _single_nemo(repo_id, _snapshot(repo_id, HUB_PATTERNS, progress))


def _single_nemo(repo_id: str, snapshot: Path) -> Path:
    nemos = sorted(snapshot.glob("*.nemo"))
    if len(nemos) != 1:
        found = ", ".join(p.name for p in nemos) or "none"
        raise ConversionError(f"{repo_id}: expected exactly one .nemo file in the repo, found {found}")
    return nemos[0]


def _is_salm_config(path: Path) -> bool:
    from .salm import is_salm_config

    return is_salm_config(path)


def _salm_cached(
    source: Path, llm_dir: Path | None, cache_dir: Path, dtype: str, name: str, progress: ProgressFactory | None
) -> Path:
    """A SALM directory (config.json + model.safetensors) converted once into the cache, keyed by its weights."""
    from .salm import convert_salm

    def convert(target: Path) -> Path:
        return convert_salm(source, target, llm_dir=llm_dir, dtype=dtype, overwrite=True)

    weights = (source / "model.safetensors").resolve()  # hub files are symlinks into blobs/
    return _convert_cached(weights, cache_dir, dtype, name=name, progress=progress, convert=convert)


def _salm_from_hub(repo_id: str, cache_dir: Path, dtype: str, progress: ProgressFactory | None) -> Path:
    """canary-qwen-2.5b: its weights and config, then the LLM's config and tokenizer files from the LLM's repo
    (`pretrained_llm`, Qwen/Qwen3-1.7B): nothing else of either repo is fetched."""
    import json

    snapshot = _snapshot(repo_id, SALM_PATTERNS, progress)
    llm_repo = str(json.loads((snapshot / "config.json").read_text()).get("pretrained_llm"))
    if not _REPO_ID.match(llm_repo):
        raise ConversionError(f"{repo_id}: config.json pretrained_llm {llm_repo!r} is not a Hugging Face repo id")
    llm = _snapshot(llm_repo, LLM_PATTERNS, progress)
    return _salm_cached(snapshot, llm, cache_dir, dtype, repo_id.split("/")[-1], progress)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def resolve_model(
    spec: str | Path,
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
    progress: ProgressFactory | None = None,
) -> Path:
    """A converted directory for MODEL `spec`: a converted dir, a `.nemo` file, or a Hugging Face repo id.

    `.nemo` files (local or downloaded) are converted once into `cache_dir` (default `$CANARY_CACHE_DIR` or
    `~/.cache/canary-server`) and reused while the file is unchanged. `~` and `$VARS` in paths are expanded.
    `progress`: a tqdm-like class for the download and conversion (convert/progress.py); None: huggingface_hub's
    own bars for a download, nothing for a conversion.
    """
    check_dtype(dtype)
    spec = str(spec)
    cache_dir = expand(cache_dir) if cache_dir is not None else default_cache_dir()
    path = expand(spec)
    if path.is_dir() and _is_salm_config(path / CONFIG_FILE):  # a SALM release directory, not yet converted
        return _salm_cached(path, None, cache_dir, dtype, path.name, progress)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConversionError(f"{path}: directory has no {CONFIG_FILE}; not a converted model directory")
        return path
    if path.is_file():
        if path.suffix != ".nemo":
            raise ConversionError(f"{path}: not a .nemo file or a converted model directory")
        return _convert_cached(path, cache_dir, dtype, progress=progress)
    if path.suffix == ".nemo" or not _REPO_ID.match(spec):
        raise ConversionError(
            f"{spec}: no such file or directory (and not a Hugging Face repo id); a model is a .nemo file, a "
            "directory written by `canary-server convert`, or a repo id such as nvidia/canary-1b-flash"
        )
    snapshot = _snapshot(spec, HUB_PATTERNS, progress)
    if not any(snapshot.glob("*.nemo")) and _is_salm_config(snapshot / CONFIG_FILE):
        return _salm_from_hub(spec, cache_dir, dtype, progress)
    nemo = _single_nemo(spec, snapshot)
    # Hub files are symlinks into blobs/; name the cache entry after the repo file, key it by the blob.
    return _convert_cached(nemo.resolve(), cache_dir, dtype, name=nemo.stem, progress=progress)
