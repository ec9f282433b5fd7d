"""Read a `.nemo` archive (a POSIX tar, plain or gzip) safely, extracting only what conversion needs."""

from __future__ import annotations

import logging
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from .errors import ConversionError

log = logging.getLogger(__name__)

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
# canary-1b-v2 bundles a FastConformer-CTC model used for word timestamps (NeMo's `__restore_timestamps_asr_model`
# in aed_multitask_models.py reads exactly these two members, and only when both are present).
TIMESTAMPS_CONFIG_MEMBER = "timestamps_asr_model_config.yaml"
TIMESTAMPS_WEIGHTS_MEMBER = "timestamps_asr_model_weights.ckpt"


@dataclass(frozen=True)
class WeightsLocation:
    """Where the PyTorch zip of the weights lives: a byte range of a file (in place for plain tars)."""

    path: Path
    offset: int
    size: int


@dataclass
class TimestampsModel:
    """The bundled timestamps CTC model: its own config and weights; tokenizer members as in `config`."""

    config: dict
    weights: WeightsLocation
    tokenizer_files: dict[str, Path] = field(default_factory=dict)  # member -> extracted file


@dataclass
class NemoArchive:
    config: dict
    weights: WeightsLocation
    tokenizer_files: dict[str, Path]  # member name ("<hash>_tokenizer.model") -> extracted file
    timestamps: TimestampsModel | None = None
    timestamps_error: ConversionError | None = None  # a bundled timestamps model that could not be read
    bundles_timestamps: bool = False  # the archive has timestamps model members (read or not)


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


def read_nemo(path: Path, workdir: Path, timestamps_model: bool = True) -> NemoArchive:
    """Read config, locate weights and extract tokenizer models of `path` into `workdir` (which must exist).

    A plain tar's weights are read in place (a byte range of the `.nemo`); a gzip tar's are extracted. A bundled
    timestamps model (canary-1b-v2) is read unless `timestamps_model` is False; one that cannot be read is reported
    in `timestamps_error` instead of failing the main model.
    """
    from .config import check_model_class  # config parsing lives in config.py
    from .tokenizers import tokenizer_members

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such .nemo file")
    tar, compressed = _open_tar(path)
    with tar:
        index = _index(tar, path)
        for required in (CONFIG_MEMBER, WEIGHTS_MEMBER):
            if required not in index:
                raise ConversionError(f"{path}: .nemo archive has no {required} (members: {sorted(index)})")
        config = _read_yaml(tar, index[CONFIG_MEMBER], workdir / CONFIG_MEMBER, path)
        check_model_class(config)  # before anything model-specific: another model class is one clear refusal
        tokenizer_files = _extract_tokenizers(tar, index, tokenizer_members(config), workdir, "tokenizer", path)
        weights = _weights(tar, index[WEIGHTS_MEMBER], workdir / WEIGHTS_MEMBER, path, compressed)
        archive = NemoArchive(config=config, weights=weights, tokenizer_files=tokenizer_files)
        archive.bundles_timestamps = TIMESTAMPS_CONFIG_MEMBER in index or TIMESTAMPS_WEIGHTS_MEMBER in index
        if timestamps_model:
            try:
                archive.timestamps = _timestamps_model(tar, index, workdir, path, compressed)
            except ConversionError as exc:
                archive.timestamps_error = exc
    return archive


def _timestamps_model(
    tar: tarfile.TarFile, index: dict[str, tarfile.TarInfo], workdir: Path, path: Path, compressed: bool
) -> TimestampsModel | None:
    """canary-1b-v2's bundled CTC model, or None. One member without the other is an error (NeMo would skip it)."""
    from .tokenizers import ctc_tokenizer_members

    present = [m for m in (TIMESTAMPS_CONFIG_MEMBER, TIMESTAMPS_WEIGHTS_MEMBER) if m in index]
    if not present:
        return None
    if len(present) == 1:
        raise ConversionError(f"{path}: .nemo archive has {present[0]} but not its pair (incomplete timestamps model)")
    config = _read_yaml(tar, index[TIMESTAMPS_CONFIG_MEMBER], workdir / TIMESTAMPS_CONFIG_MEMBER, path)
    members = ctc_tokenizer_members(config)
    tokenizer_files = _extract_tokenizers(tar, index, members, workdir, "timestamps_tokenizer", path)
    wmember = index[TIMESTAMPS_WEIGHTS_MEMBER]
    weights = _weights(tar, wmember, workdir / TIMESTAMPS_WEIGHTS_MEMBER, path, compressed)
    log.info("bundled timestamps CTC model found (%s, %d bytes of weights)", TIMESTAMPS_CONFIG_MEMBER, wmember.size)
    return TimestampsModel(config=config, weights=weights, tokenizer_files=tokenizer_files)


def _read_yaml(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, path: Path) -> dict:
    _extract(tar, member, dest, path)
    try:
        config = yaml.safe_load(dest.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: {member.name} is not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: {member.name} is not a mapping")
    return config


def _extract_tokenizers(
    tar: tarfile.TarFile, index: dict[str, tarfile.TarInfo], members: list[str], workdir: Path, stem: str, path: Path
) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for i, member in enumerate(members):
        if member not in index:
            raise ConversionError(f"{path}: tokenizer file {member!r} named in the config is not in the archive")
        dest = workdir / f"{stem}_{i}.model"
        _extract(tar, index[member], dest, path)
        files[member] = dest
    return files


def _weights(
    tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, path: Path, compressed: bool
) -> WeightsLocation:
    """A plain tar's checkpoint is read in place (a byte range of the `.nemo`); a gzip tar's is extracted."""
    if compressed:
        _extract(tar, member, dest, path)
        return WeightsLocation(dest, 0, member.size)
    _check_in_place(member, path)
    return WeightsLocation(path, member.offset_data, member.size)
