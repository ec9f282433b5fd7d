"""Convert NeMo Canary `.nemo` checkpoints into MLX model directories, without PyTorch."""

import logging
import shutil
from pathlib import Path

import sentencepiece as spm

from canary_server.model.quantize import DEFAULT_GROUP_SIZE

from . import checkpoint, config, mapping, nemo, tokenizers, write
from .errors import ConversionError
from .progress import ProgressFactory, bytes_bar
from .quantize import check_quantization, quantize_weights

__all__ = ["ConversionError", "convert_nemo"]

log = logging.getLogger(__name__)


def _piece_count(path: Path, member: str) -> int:
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"tokenizer {member}: not a readable SentencePiece model: {e}") from e


CTC_HEAD = "decoder.decoder_layers.0.weight"


def _pieces(path: Path) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _convert_timestamps_model(archive: nemo.NemoArchive, staging: Path, dtype: str, sample_rate: int) -> dict:
    """canary-1b-v2's bundled CTC model -> `timestamps/model.safetensors`; returns config.json `timestamps_ctc`.

    Its tokenizer is its own archive member; it must have the main (unified) tokenizer's vocabulary, id for id
    (the bytes may differ), so the converted directory keeps one copy. Never quantized (it is small next to the
    main model and runs once per utterance)."""
    ts = archive.timestamps
    if len(archive.tokenizer_files) != 1:
        raise ConversionError("timestamps_asr_model: a bundled CTC model needs the unified (single) tokenizer")
    (main_tok,) = archive.tokenizer_files.values()
    (ctc_tok,) = ts.tokenizer_files.values()
    if _pieces(ctc_tok) != _pieces(main_tok):
        raise ConversionError("timestamps_asr_model.tokenizer: its vocabulary (id -> piece) differs from the main one")
    state, _ = checkpoint.load_state_dict(ts.weights)
    if CTC_HEAD not in state:
        raise ConversionError(f"timestamps model state dict: no {CTC_HEAD} (the CTC head)")
    ctc_cfg = config.build_ctc_config(
        ts.config,
        tokenizer_vocab=_piece_count(ctc_tok, "timestamps_asr_model"),
        head_rows=state[CTC_HEAD].shape[0],
        sample_rate=sample_rate,
    )
    mapped = mapping.map_ctc_state_dict(state, ctc_cfg)
    (staging / ctc_cfg["weights"]).parent.mkdir()
    write.stream_weights(staging, mapped, dtype, ctc_cfg["weights"], _release)
    log.info("timestamps CTC model: %d tensors -> %s", len(mapped), ctc_cfg["weights"])
    return ctc_cfg


def _release(value) -> None:
    checkpoint.release_pages([value])


def _remove_stale_staging(out_dir: Path) -> None:
    for stale, size in write.remove_stale_staging(out_dir):
        log.warning("removed %s (%.1f MB): the staging dir of an interrupted conversion", stale, size / 1e6)


def convert_nemo(
    source: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    quantize: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    timestamps_model: bool = True,
    progress: ProgressFactory | None = None,
) -> Path:
    """Convert a `.nemo` file into an MLX model directory (ARCHITECTURE.md) and return its path.

    `quantize` (8 or 4 bits): MLX affine quantization, in groups of `group_size`, of the linear layers whose
    input dim is a multiple of `group_size`; everything else stays in `dtype` (see model/quantize.py).

    `timestamps_model=False` leaves out canary-1b-v2's bundled CTC aligner (no word times); a bundled aligner that
    cannot be converted is left out the same way, with a warning, rather than failing the whole model.
    `progress` (a tqdm-like class, see convert/progress.py) reports the bytes of weights read and cast.

    Raises ConversionError for unsafe, corrupt or unsupported input; OUT_DIR is then absent or unchanged.
    """
    source, out_dir = Path(source), Path(out_dir).absolute()
    write.check_dtype(dtype)
    check_quantization(quantize, group_size)
    if not source.is_file():
        raise ConversionError(f"{source}: no such .nemo file")
    write.check_out_dir(out_dir, overwrite)
    _remove_stale_staging(out_dir)
    with write.staging_dir(out_dir) as staging:
        work = staging / "_nemo"
        work.mkdir()
        archive = nemo.read_nemo(source, work, timestamps_model)
        state, storage_types = checkpoint.load_state_dict(archive.weights)
        log.info("checkpoint: %d tensors, storages %s", len(state), sorted(set(storage_types.values())))
        if mapping.TIED_HEAD not in state:
            raise ConversionError(f"state dict: no {mapping.TIED_HEAD} (the output head)")
        cfg = config.build_config(
            archive.config,
            tokenizer_vocab=sum(_piece_count(p, m) for m, p in archive.tokenizer_files.items()),
            head_rows=state[mapping.TIED_HEAD].shape[0],
            source_file=source.name,
            dtype=dtype,
            enc_dec_proj_present="encoder_decoder_proj.weight" in state,
        )
        mapped = mapping.map_state_dict(state, cfg)
        del state
        bar = bytes_bar(progress, sum(v.nbytes for v in mapped.values()), f"converting {source.name}")

        def written(value) -> None:
            _release(value)
            bar.update(value.nbytes)

        try:
            if quantize is None:  # tensor by tensor from the memory map: peak memory stays far below the file size
                write.stream_weights(staging, mapped, dtype, after_each=written)
            else:  # quantizing builds the module: the whole model in memory once
                cfg["quantization"] = {"bits": quantize, "group_size": group_size}
                write.write_weights(staging, quantize_weights(write.cast_weights(mapped, dtype, bar.update), cfg))
        finally:
            bar.close()
        del mapped
        if archive.timestamps is not None:
            try:
                cfg["timestamps_ctc"] = _convert_timestamps_model(archive, staging, dtype, cfg["sample_rate"])
            except ConversionError as exc:
                shutil.rmtree(staging / "timestamps", ignore_errors=True)
                archive.timestamps_error = exc
        if archive.timestamps_error is not None:
            log.warning("%s: the bundled timestamps model was left out (%s); this model will have no word times",
                        source.name, archive.timestamps_error)  # fmt: skip
            cfg["notes"] = [f"bundled timestamps model left out: {archive.timestamps_error}"]
        elif archive.bundles_timestamps and not timestamps_model:
            cfg["notes"] = ["bundled timestamps model left out on purpose (--no-timestamps-model)"]
        names = tokenizers.tokenizer_filenames(archive.config)
        write.copy_tokenizers(staging, {names[m]: p for m, p in archive.tokenizer_files.items()})
        write.write_config(staging, cfg)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        write.publish(staging, out_dir, overwrite)
    log.info("converted %s -> %s (%s%s)", source, out_dir, dtype, f", {quantize}-bit" if quantize else "")
    return out_dir
