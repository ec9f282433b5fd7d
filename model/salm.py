"""canary-qwen-2.5b (NeMo speechlm2 SALM) in MLX: our FastConformer, a projection into the LLM's embedding space,
and mlx-lm's Qwen3 (LoRA merged at conversion). The projected audio frames replace the prompt's audio locator tag
in the LLM's input embeddings (no cross-attention); greedy decoding to `<|im_end|>` (NeMo's `SALM.generate`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen3

from .audio import SAMPLE_RATE, AudioSource, load_audio, pad_batch
from .canary import Transcription
from .config import EncoderConfig, PreprocessorConfig, QuantizationConfig
from .conformer import ConformerEncoder, drain
from .cpu_layout import lay_out_linears, use_cpu_layout
from .features import Preprocessor
from .salm_decoder import SalmBatchDecoder
from .salm_prompt import SalmTokenizer


@dataclass(frozen=True)
class SalmConfig:
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    llm: dict[str, Any]  # mlx-lm qwen3.ModelArgs fields
    tokenizer: dict[str, Any]
    audio_locator_tag: str
    max_new_tokens: int = 128
    quantization: QuantizationConfig | None = None
    sample_rate: int = SAMPLE_RATE
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SalmConfig:
        q = d.get("quantization")
        return cls(
            preprocessor=PreprocessorConfig.from_dict(d["preprocessor"]),
            encoder=EncoderConfig.from_dict(d["encoder"]),
            llm=dict(d["llm"]),
            tokenizer=dict(d["tokenizer"]),
            audio_locator_tag=d["audio_locator_tag"],
            max_new_tokens=int(d.get("generation", {}).get("max_new_tokens", 128)),
            quantization=QuantizationConfig.from_dict(q) if q else None,
            sample_rate=int(d.get("sample_rate", SAMPLE_RATE)),
            raw=d,
        )

    prompt_format: str = "qwen"  # NeMo's QwenPromptFormatter (model/salm_prompt.py)

    @property
    def prompt_defaults(self) -> dict[str, Any]:
        return {"source_lang": "en", "target_lang": "en"}

    @property
    def frame_seconds(self) -> float:
        """Audio seconds per projected frame (one LLM input position): hop x subsampling."""
        return self.preprocessor.hop_length * self.encoder.subsampling_factor / self.sample_rate


def quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    """`--quantize` applies to the LLM's Linears only (the embedding is also the tied head; the encoder is small)."""
    return path.startswith("llm.") and isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


class SALM(nn.Module):
    def __init__(self, config: SalmConfig, tokenizer: SalmTokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessor = Preprocessor(config.preprocessor)
        self.encoder = ConformerEncoder(config.encoder)
        self.proj = nn.Linear(config.encoder.d_model, config.llm["hidden_size"])
        self.llm = qwen3.Model(qwen3.ModelArgs.from_dict(config.llm))

    @property
    def dtype(self) -> mx.Dtype:
        return self.proj.bias.dtype

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    # What the pipeline asks of any model: English ASR only (translation and other languages are refused by the
    # pipeline's language check), no timestamp source (word times would have to be invented).
    languages = ["en"]  # read-only class facts
    supports_timestamps = False
    timestamp_source = None
    # canary-qwen-2.5b takes about 40 s per call (its model card; NeMo's max_total_tokens 1024 at 12.5 frames/s
    # leaves room for the prompt and 128 new tokens): longer audio is cut at pauses into pieces at most this long.
    max_chunk_seconds = 40.0
    pads_short_audio = False  # NeMo's SALM.generate() reads files with lhotse and pads nothing

    def quantize(self, bits: int, group_size: int) -> None:
        nn.quantize(
            self,
            group_size=group_size,
            bits=bits,
            mode="affine",
            class_predicate=lambda p, m: quantizable(p, m, group_size),
        )

    def encode(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """audio (B, L) float32 -> projected frames (B, T, H) and their lengths (B,)."""
        feats, valid = self.preprocessor(audio, lengths)
        enc, enc_lengths = drain(self.encoder.stages(feats.astype(self.dtype), valid, None))
        return self.proj(enc), enc_lengths

    def embed(self, ids: mx.array) -> mx.array:
        return self.llm.model.embed_tokens(ids)

    def input_embeddings(self, prompt: Sequence[int], frames: mx.array) -> mx.array:
        """One row's LLM input: the prompt's embeddings with its audio tag replaced by `frames` (T, H)
        (NeMo: `replace_placeholders_and_build_targets`; the tag's own embedding is never used)."""
        tag = self.tokenizer.audio_locator_id
        at = list(prompt).index(tag)
        emb = self.embed(mx.array(list(prompt), dtype=mx.int32))  # (P, H)
        return mx.concatenate([emb[:at], frames.astype(emb.dtype), emb[at + 1 :]], axis=0)

    def decoder(self) -> SalmBatchDecoder:
        return SalmBatchDecoder(self.llm, eos_id=self.tokenizer.eos_id)

    def generate(
        self,
        audio: AudioSource | Sequence[AudioSource],
        context: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
    ) -> Transcription | list[Transcription]:
        """NeMo's `SALM.generate` (greedy) on whole inputs, `batch_size` at a time (left-padded, masked)."""
        single = not isinstance(audio, (list, tuple))
        items = [a if isinstance(a, np.ndarray) else load_audio(a) for a in ([audio] if single else audio)]
        limit = max_new_tokens or self.config.max_new_tokens
        prompt = self.tokenizer.prompt_ids(context)
        out: list[Transcription] = []
        for start in range(0, len(items), batch_size):
            out += self._generate_batch(items[start : start + batch_size], prompt, limit)
        return out[0] if single else out

    def _generate_batch(self, batch: list[np.ndarray], prompt: list[int], limit: int) -> list[Transcription]:
        audio, lengths = pad_batch(batch)
        frames, frame_lengths = self.encode(audio, lengths)
        rows = [self.input_embeddings(prompt, frames[i, : int(n)]) for i, n in enumerate(frame_lengths.tolist())]
        dec = self.decoder()
        tokens = [[t] for t in dec.add(rows)]
        while len(tokens[0]) < limit and not all(t[-1] == dec.eos_id for t in tokens):
            for row, t in zip(tokens, dec.step(), strict=True):
                row.append(t)
        return [self.result(t, len(a) / self.sample_rate) for t, a in zip(tokens, batch, strict=True)]

    def result(self, generated: list[int], duration: float, logprobs: Sequence[float] = ()) -> Transcription:
        """Generated ids (eos and whatever follows dropped) -> text as NeMo decodes it (`raw_text`, HF
        `decode(skip_special_tokens=True)`: a cut-off UTF-8 sequence is U+FFFD); `text` without surrounding spaces."""
        eos = self.tokenizer.eos_id
        finished = eos in generated
        ids = generated[: generated.index(eos)] if finished else list(generated)
        raw = self.tokenizer.decode(ids)
        return Transcription(
            text=raw.strip(),
            tokens=ids,
            source_lang="en",
            target_lang="en",
            duration=duration,
            raw_text=raw,
            finished=finished,
            logprobs=list(logprobs[: len(ids)]),
            pieces=[self.tokenizer.decode([i]) for i in ids] if logprobs else [],
        )


def load_salm(directory: Path, config: dict[str, Any], dtype: mx.Dtype | str | None) -> SALM:
    """A converted SALM directory (config.json `model_type: "salm"`) -> SALM ready for inference."""
    cfg = SalmConfig.from_dict(config)
    model = SALM(cfg, SalmTokenizer.load(directory, cfg.tokenizer, cfg.audio_locator_tag))
    if cfg.quantization is not None:
        model.quantize(cfg.quantization.bits, cfg.quantization.group_size)
    weights = mx.load(str(directory / "model.safetensors"))
    if dtype is not None:
        target = getattr(mx, dtype) if isinstance(dtype, str) else dtype
        weights = {k: v if k.startswith("preprocessor.") or not mx.issubdtype(v.dtype, mx.floating)
                   else v.astype(target) for k, v in weights.items()}  # fmt: skip
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    del weights  # (else every weight the layout replaces would stay alive until this returns)
    if use_cpu_layout():
        # the encoder's Linears and the projection into the LLM laid out for the CPU's matmul, as Canary's
        # (model/cpu_layout.py); the LLM keeps nn.Linear's rows (packing it: BENCHMARKS, issue 23 round 5)
        lay_out_linears(model, skip=("llm",))
        mx.eval(model.encoder.parameters(), model.proj.parameters())
    return model
