"""Load a converted model directory: read config, build the module, load weights strictly."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import mlx.core as mx

from .canary import Canary
from .config import ModelConfig
from .cpu_layout import use_cpu_buffer_cache, use_cpu_layout
from .ctc import CtcTimestampsModel
from .errors import ModelLoadError
from .quantize import DEFAULT_GROUP_SIZE, quantize
from .tokenizer import load_tokenizer

WEIGHTS_FILE = "model.safetensors"
# Tensors that stay float32 whatever the checkpoint dtype (parity of features and positions).
FLOAT32_ONLY = ("preprocessor.", "decoder.embedding.position_embedding.")


def default_dtype() -> mx.Dtype:
    """float32 on every platform, Apple Silicon included: the only compute dtype that gave NeMo's tokens on every
    NeMo fixture (bench/dtype_eval.py: float16 missed 2 of 115 items, bfloat16 41 of 115; README "Compute dtype").
    float16 and bfloat16 are opt-in (`dtype=`), guarded against overflow (`Canary.float32()`)."""
    return mx.float32


DECODER_BITS = (0, 8)


def load(path: str | Path, dtype: mx.Dtype | str | None = None, decoder_bits: int = 0) -> Canary:  # or SALM
    """Load a directory written by `canary-server convert`. `dtype` overrides the stored weight dtype.

    `decoder_bits=8` quantizes the decoder's Linear layers to 8 bits (MLX affine, group 64) as it loads a model
    stored unquantized: the decoder step then reads a quarter of the bytes (on MLX's CPU backend through
    cpu_kernels.qmatmul8), the encoder keeps its weights. canary-qwen (SALM) models ignore it."""
    if decoder_bits not in DECODER_BITS:
        raise ValueError(f"decoder_bits must be one of {DECODER_BITS}, got {decoder_bits!r}")
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory} is not a converted Canary model (no config.json)")
    try:
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") == "salm":  # canary-qwen-2.5b: its own module (model/salm.py)
            from .salm import load_salm

            return load_salm(directory, raw, dtype)
        config = ModelConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: {exc}") from exc
    model = Canary(config, load_tokenizer(directory, config.tokenizer))
    if config.quantization is not None:  # same layers as the converter quantized, so loading stays strict
        try:
            quantize(model, config.quantization.bits, config.quantization.group_size)
        except ValueError as exc:
            raise ModelLoadError(f"{config_path}: {exc}") from exc
    model.load_weights(_read_weights(directory / WEIGHTS_FILE, dtype), strict=True)
    if decoder_bits and config.quantization is None:
        quantize(model.decoder, decoder_bits, DEFAULT_GROUP_SIZE)
    mx.eval(model.parameters())
    model.eval()
    if use_cpu_layout():
        model.use_cpu_layout()
        use_cpu_buffer_cache()
    if config.timestamps_ctc is not None:
        # Kept out of the module tree (as NeMo does), so the main model's weights stay one strict set.
        object.__setattr__(model, "timestamps_model", _load_ctc(directory, config, model.tokenizer, dtype))
    # Canary.float32(): the overflow fallback
    model.__dict__["_loader"] = functools.partial(load, directory, decoder_bits=decoder_bits)
    return model


def _load_ctc(directory: Path, config: ModelConfig, tokenizer, dtype: mx.Dtype | str | None) -> CtcTimestampsModel:
    """canary-1b-v2's timestamps CTC model (`timestamps/model.safetensors`); shares the unified tokenizer."""
    path = directory / config.timestamps_ctc.weights
    if not path.is_file():
        raise ModelLoadError(f"{directory}: config.json names a timestamps model but {path.name} is missing")
    ctc = CtcTimestampsModel(config.timestamps_ctc, getattr(tokenizer, "sp", None), config.sample_rate)
    ctc.load_weights(_read_weights(path, dtype), strict=True)
    mx.eval(ctc.parameters())
    ctc.eval()
    return ctc


def _read_weights(path: Path, dtype: mx.Dtype | str | None) -> list[tuple[str, mx.array]]:
    """A safetensors file's tensors, cast to `dtype` except float32-only buffers and packed quantized weights."""
    weights = mx.load(str(path))
    if dtype is not None:
        target = getattr(mx, dtype) if isinstance(dtype, str) else dtype
        weights = {k: v if _keeps_dtype(k, v) else v.astype(target) for k, v in weights.items()}
    return list(weights.items())


def _keeps_dtype(name: str, value: mx.array) -> bool:
    """float32-only buffers, and packed quantized weights (uint32), are never cast."""
    return name.startswith(FLOAT32_ONLY) or not mx.issubdtype(value.dtype, mx.floating)
