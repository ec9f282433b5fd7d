"""Read a `.nemo` archive (a POSIX tar, plain or gzip) safely, extracting only what conversion needs."""

from __future__ import annotations

import logging
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from convert.errors import ConversionError

log = logging.getLogger(__name__)

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
# canary-1b-v2 bundles an auxiliary CTC model for timestamps; not converted (yet), so never extracted.
IGNORED_PREFIX = "timestamps_asr_model"


@dataclass(frozen=True)
class WeightsLocation:
    """Where the PyTorch zip of the weights lives: a byte range of a file (in place for plain tars)."""

    path: Path
    offset: int
    size: int


@dataclass
class NemoArchive:
    config: dict
    weights: WeightsLocation
    tokenizer_files: dict[str, Path]  # member name ("<hash>_tokenizer.model") -> extracted file
    ignored: list[str] = field(default_factory=list)


def _member_name(member: tarfile.TarInfo) -> str:
    """Validate one member and return its normalised name ("./a/b" -> "a/b"); refuse anything unsafe."""
    name = member.name
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute():
        raise ConversionError(f"unsafe .nemo archive: absolute member path {name!r}")
    if ".." in path.parts:
        raise ConversionError(f"unsafe .nemo archive: member path with '..' {name!r}")
    if member.issym() or member.islnk():
        raise ConversionError(f"unsafe .nemo archive: link member {name!r} -> {member.linkname!r}")
    if not (member.isfile() or member.isdir()):
        raise ConversionError(f"unsafe .nemo archive: special member {name!r} (device, fifo or unknown type)")
    return "/".join(p for p in path.parts if p != ".")


def _open_tar(path: Path) -> tuple[tarfile.TarFile, bool]:
    """Open as a plain tar (what NeMo writes), else gzip (pre-1.7 archives). Returns (tar, compressed)."""
    errors = []
    for mode, compressed in (("r:", False), ("r:gz", True)):
        try:
            return tarfile.open(path, mode), compressed
        except (tarfile.TarError, EOFError, OSError) as e:
            errors.append(f"{'tar.gz' if compressed else 'tar'}: {e}")
    raise ConversionError(f"{path}: truncated or not a .nemo archive ({'; '.join(errors)})")


def _index(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    try:
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ConversionError(f"{path}: truncated or corrupt .nemo archive: {e}") from e
    index: dict[str, tarfile.TarInfo] = {}
    for m in members:
        name = _member_name(m)
        if m.isfile():
            if name in index:
                raise ConversionError(f"{path}: duplicate member {name!r} in .nemo archive")
            index[name] = m
    return index


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, path: Path) -> None:
    """Copy one regular member to `dest` (a name we chose, so nothing can land elsewhere)."""
    try:
        src = tar.extractfile(member)
        if src is None:
            raise ConversionError(f"{path}: member {member.name!r} is not a regular file")
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if dest.stat().st_size != member.size:
            raise ConversionError(f"{path}: member {member.name!r} is truncated")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ConversionError(f"{path}: truncated or corrupt .nemo archive reading {member.name!r}: {e}") from e


def _check_in_place(member: tarfile.TarInfo, path: Path) -> None:
    if member.offset_data + member.size > path.stat().st_size:
        raise ConversionError(f"{path}: truncated .nemo archive: {member.name!r} extends past the end of the file")


def read_nemo(path: Path, workdir: Path) -> NemoArchive:
    """Read config, locate weights and extract tokenizer models of `path` into `workdir` (which must exist).

    A plain tar's weights are read in place (a byte range of the `.nemo`); a gzip tar's are extracted.
    """
    from convert.config import tokenizer_members  # config parsing lives in config.py

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such .nemo file")
    tar, compressed = _open_tar(path)
    with tar:
        index = _index(tar, path)
        ignored = sorted(n for n in index if PurePosixPath(n).name.startswith(IGNORED_PREFIX))
        if ignored:
            log.info("ignoring bundled timestamps model members (not converted yet): %s", ", ".join(ignored))
        for required in (CONFIG_MEMBER, WEIGHTS_MEMBER):
            if required not in index:
                raise ConversionError(f"{path}: .nemo archive has no {required} (members: {sorted(index)})")

        _extract(tar, index[CONFIG_MEMBER], workdir / CONFIG_MEMBER, path)
        try:
            config = yaml.safe_load((workdir / CONFIG_MEMBER).read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: {CONFIG_MEMBER} is not valid YAML: {e}") from e
        if not isinstance(config, dict):
            raise ConversionError(f"{path}: {CONFIG_MEMBER} is not a mapping")

        tokenizer_files: dict[str, Path] = {}
        for i, member in enumerate(tokenizer_members(config)):
            if member not in index:
                raise ConversionError(f"{path}: tokenizer file {member!r} named in the config is not in the archive")
            dest = workdir / f"tokenizer_{i}.model"
            _extract(tar, index[member], dest, path)
            tokenizer_files[member] = dest

        wmember = index[WEIGHTS_MEMBER]
        if compressed:
            dest = workdir / WEIGHTS_MEMBER
            _extract(tar, wmember, dest, path)
            weights = WeightsLocation(dest, 0, wmember.size)
        else:
            _check_in_place(wmember, path)
            weights = WeightsLocation(path, wmember.offset_data, wmember.size)
    return NemoArchive(config=config, weights=weights, tokenizer_files=tokenizer_files, ignored=ignored)
