"""Convert NeMo Canary `.nemo` checkpoints into MLX model directories, without PyTorch."""

from model.blas import preload_openblas

preload_openblas()

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import sentencepiece as spm  # noqa: E402

from convert import checkpoint, config, mapping, nemo, write  # noqa: E402
from convert.errors import ConversionError  # noqa: E402

__all__ = ["ConversionError", "convert_nemo"]

log = logging.getLogger(__name__)


def _piece_count(path: Path, member: str) -> int:
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"tokenizer {member}: not a readable SentencePiece model: {e}") from e


def convert_nemo(source: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a `.nemo` file into an MLX model directory (ARCHITECTURE.md) and return its path.

    Raises ConversionError for unsafe, corrupt or unsupported input; OUT_DIR is then absent or unchanged.
    """
    source, out_dir = Path(source), Path(out_dir).absolute()
    write.check_dtype(dtype)
    if not source.is_file():
        raise ConversionError(f"{source}: no such .nemo file")
    write.check_out_dir(out_dir, overwrite)
    with write.staging_dir(out_dir) as staging:
        work = staging / "_nemo"
        work.mkdir()
        archive = nemo.read_nemo(source, work)
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
        weights = mapping.map_state_dict(state, cfg)
        write.write_weights(staging, weights, dtype)
        del weights, state
        names = config.tokenizer_filenames(archive.config)
        write.copy_tokenizers(staging, {names[m]: p for m, p in archive.tokenizer_files.items()})
        write.write_config(staging, cfg)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        write.publish(staging, out_dir, overwrite)
    log.info("converted %s -> %s (%s)", source, out_dir, dtype)
    return out_dir
