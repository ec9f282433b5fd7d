"""Frozen hyperparameter dataclasses built from a converted directory's config.json."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


class _FromDict:
    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        # Unknown keys are ignored (as mlx-lm's BaseModelArgs), so newer converters stay loadable.
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class PreprocessorConfig(_FromDict):
    features: int = 128
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    preemph: float = 0.97
    log_zero_guard_value: float = 2.0**-24
    mag_power: float = 2.0
    pad_to: int = 0
    pad_value: float = 0.0


@dataclass(frozen=True)
class EncoderConfig(_FromDict):
    feat_in: int = 128
    n_layers: int = 17
    d_model: int = 512
    n_heads: int = 8
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 9
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    pos_emb_max_len: int = 5000
    xscaling: bool = False
    use_bias: bool = True  # False: no bias in the layers' Linear / conv layers (canary-1b-v2's CTC aligner)

    @property
    def n_subsampling_convs(self) -> int:
        return {2: 1, 4: 2, 8: 3, 16: 4}[self.subsampling_factor]


@dataclass(frozen=True)
class DecoderConfig(_FromDict):
    num_layers: int = 4
    hidden_size: int = 1024
    inner_size: int = 4096
    num_attention_heads: int = 8
    max_sequence_length: int = 1024
    vocab_size: int = 5248


@dataclass(frozen=True)
class TokenizerConfig(_FromDict):
    type: str = "aggregate"  # "aggregate" (canary-1b, flash) | "unified" (canary-1b-v2)
    langs: tuple[tuple[str, str], ...] = ()  # aggregate: ((name, file), ...) in id order
    file: str | None = None  # unified: the single SentencePiece model

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        langs = tuple((x["name"], x["file"]) for x in d.get("langs", ()))
        return cls(type=d.get("type", "aggregate"), langs=langs, file=d.get("file"))


@dataclass(frozen=True)
class DecodingConfig(_FromDict):
    strategy: str = "beam"  # the checkpoint's: "beam" (NeMo's default, beam_size 1 = greedy), "greedy", "greedy_batch"
    beam_size: int = 1
    length_penalty: float = 0.0
    max_generation_delta: int = -1


@dataclass(frozen=True)
class QuantizationConfig(_FromDict):
    """MLX affine quantization of the linear layers (`convert --quantize`); see model/quantize.py."""

    bits: int = 8
    group_size: int = 64


@dataclass(frozen=True)
class CtcConfig:
    """canary-1b-v2's bundled timestamps model: FastConformer encoder + Conv1d k=1 head (blank = last class)."""

    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    vocab_size: int
    blank_id: int
    weights: str = "timestamps/model.safetensors"  # relative to the converted directory

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CtcConfig:
        return cls(
            preprocessor=PreprocessorConfig.from_dict(d.get("preprocessor", {})),
            encoder=EncoderConfig.from_dict(d["encoder"]),
            vocab_size=int(d["vocab_size"]),
            blank_id=int(d["blank_id"]),
            weights=d.get("weights", "timestamps/model.safetensors"),
        )


@dataclass(frozen=True)
class ModelConfig:
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    decoder: DecoderConfig
    tokenizer: TokenizerConfig
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    prompt_format: str = "canary2"
    prompt_defaults: dict[str, Any] = field(default_factory=dict)
    enc_dec_proj: bool = False
    sample_rate: int = 16000
    dtype: str = "float32"
    source: dict[str, Any] = field(default_factory=dict)
    quantization: QuantizationConfig | None = None  # None: full-precision weights
    timestamps_ctc: CtcConfig | None = None  # canary-1b-v2: the bundled CTC model for word timestamps
    languages: tuple[str, ...] | None = None  # the languages the model was trained on, where the tokenizer has more
    # NeMo's use_loss_mask_for_prompt was true: its language slot was never trained (no detection). Absent in
    # directories converted before it was read: those are NeMo's default, a trained slot.
    prompt_loss_masked: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"config.json format_version {version!r} is not {FORMAT_VERSION}: re-convert the model")
        return cls(
            preprocessor=PreprocessorConfig.from_dict(d.get("preprocessor", {})),
            encoder=EncoderConfig.from_dict(d["encoder"]),
            decoder=DecoderConfig.from_dict(d["decoder"]),
            tokenizer=TokenizerConfig.from_dict(d["tokenizer"]),
            decoding=DecodingConfig.from_dict(d.get("decoding", {})),
            prompt_format=d.get("prompt_format", "canary2"),
            prompt_defaults=dict(d.get("prompt_defaults", {})),
            enc_dec_proj=bool(d.get("enc_dec_proj", False)),
            sample_rate=int(d.get("sample_rate", 16000)),
            dtype=d.get("dtype", "float32"),
            source=dict(d.get("source", {})),
            quantization=QuantizationConfig.from_dict(d["quantization"]) if d.get("quantization") else None,
            timestamps_ctc=CtcConfig.from_dict(d["timestamps_ctc"]) if d.get("timestamps_ctc") else None,
            languages=tuple(d["languages"]) if d.get("languages") else None,
            prompt_loss_masked=bool(d.get("prompt_loss_masked", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        d["tokenizer"]["langs"] = [{"name": n, "file": f} for n, f in self.tokenizer.langs]
        return d


RELEASES = {  # (prompt format, tokenizer type, encoder layers, d_model, decoder layers) -> the released checkpoint
    ("canary2", "aggregate", 17, 512, 4): "canary-180m-flash",
    ("canary2", "aggregate", 32, 1024, 4): "canary-1b-flash",
    ("canary2", "unified", 32, 1024, 8): "canary-1b-v2",
    ("canary", "aggregate", 24, 1024, 24): "canary-1b",
}


def family(config: ModelConfig) -> str:
    """The release a converted model has the shape of ("canary-1b-flash"), else a description of its shape."""
    e, d = config.encoder, config.decoder
    key = (config.prompt_format, config.tokenizer.type, e.n_layers, e.d_model, d.num_layers)
    if key in RELEASES:
        return RELEASES[key]
    style = {"canary": "canary-1b", "canary2": "canary-1b-v2" if config.tokenizer.type == "unified" else "flash"}
    return f"{style.get(config.prompt_format, config.prompt_format)}-style"


def decoding_description(decoding: DecodingConfig, beam_size: int | None = None) -> str:
    """How a model decodes by default ("greedy", "beam search, beam 5"), with `beam_size` overriding."""
    beam = beam_size or decoding.beam_size
    return "greedy" if beam <= 1 else f"beam search, beam {beam}"
