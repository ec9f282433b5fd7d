"""Loading the model for the engine: resolving a MODEL spec, the plain facts front doors need about the loaded
model (`ModelInfo`), the scheduler built over it, and handing freed memory back to the system."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from canary_server.model.boosting import phrase_ids
from canary_server.pipeline.jobs import BatcherLike

log = logging.getLogger("canary.engine")


class ModelLike(Protocol):
    """What the engine needs from `model.Canary`."""

    languages: list[str]
    sample_rate: int
    config: Any


BatcherFactory = Callable[..., BatcherLike]  # (model, **scheduling settings) -> the batcher the engine drives


def default_batcher(model: ModelLike, **kwargs: Any) -> BatcherLike:
    if getattr(model.config, "prompt_format", None) == "qwen":  # canary-qwen-2.5b (model/salm.py): LLM rows
        from canary_server.pipeline.salm_batcher import SalmBatcher

        return SalmBatcher(model, **kwargs)
    from canary_server.pipeline.scheduler import ContinuousBatcher

    return ContinuousBatcher(model, **kwargs)


@dataclass(frozen=True)
class ModelInfo:
    """Plain facts about the loaded model, copied off the engine thread once."""

    languages: tuple[str, ...]
    sample_rate: int
    prompt_format: str
    supports_timestamps: bool = False  # word/segment times (flash models' timestamp tokens, v2's CTC aligner)
    default_language: str = "en"  # the model's prompt default source language
    family: str = ""  # the release it has the shape of ("canary-1b-flash"), else a description
    decoding: str = "greedy"  # how requests are decoded: "greedy" or "beam search, beam N" (settings included)
    timestamp_source: str | None = None  # "tokens" (flash), "ctc" (canary-1b-v2's aligner) or None
    detects_language: bool = True  # its language slot was trained (NeMo's use_loss_mask_for_prompt: false)
    max_chunk_seconds: float | None = None  # the longest piece the model takes at once (None: chunk_seconds rules)
    pads_short_audio: bool = True  # NeMo's AED transcribe pads files under 1 s; its SALM generate() does not
    # spell(phrase, lang): raises model.boosting.UnspellablePhrase (the tokenizer only: safe off the engine thread)
    spell: Callable[[str, str], object] | None = None

    @property
    def supports_context(self) -> bool:
        return self.prompt_format in ("canary2", "qwen")  # qwen: the prompt goes into the LLM's user turn


def model_info(model: ModelLike, beam_size: int) -> ModelInfo:
    return ModelInfo(
        languages=tuple(model.languages),
        sample_rate=int(model.sample_rate),
        prompt_format=str(getattr(model.config, "prompt_format", "canary")),
        supports_timestamps=bool(getattr(model, "supports_timestamps", False)),
        default_language=str(getattr(model.config, "prompt_defaults", {}).get("source_lang", "en")),
        family=_family(model.config),
        decoding="greedy" if beam_size <= 1 else f"beam search, beam {beam_size}",
        timestamp_source=getattr(model, "timestamp_source", None),
        detects_language=not getattr(model.config, "prompt_loss_masked", False),
        max_chunk_seconds=getattr(model, "max_chunk_seconds", None),
        pads_short_audio=bool(getattr(model, "pads_short_audio", True)),
        spell=_speller(model),
    )


def _speller(model: ModelLike) -> Callable[[str, str], object] | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    return lambda phrase, lang: phrase_ids(tokenizer, phrase, lang)


def _family(config: Any) -> str:
    from canary_server.model.config import ModelConfig, family

    if getattr(config, "prompt_format", None) == "qwen":
        return "canary-qwen-2.5b" if config.llm.get("num_hidden_layers") == 28 else "canary-qwen (SALM) layout"
    return family(config) if isinstance(config, ModelConfig) else ""


def load_model(spec: str, cache_dir: Any = None, dtype: str = "auto", decoder_bits: int = 0) -> ModelLike:
    """Resolve a MODEL spec (converting a .nemo on first use) and load it (`decoder_bits`: model.load's). Runs on
    the engine thread."""
    from canary_server import model
    from canary_server.convert.cache import resolve_model

    path = resolve_model(spec, cache_dir=cache_dir)
    log.info(
        "loading model from %s%s", path, f" (decoder weights quantized to {decoder_bits} bits)" * bool(decoder_bits)
    )
    return model.load(path, dtype=model.default_dtype() if dtype == "auto" else dtype, decoder_bits=decoder_bits)


def free_unreferenced_memory() -> None:
    """After the model was dropped: collect it, and give MLX's buffer cache and, on Linux, the C heap's free pages
    back to the system (model/memory.py)."""
    from canary_server.model.memory import release_memory as release

    release()


def release_memory(batcher: BatcherLike) -> None:
    """The model's own release of freed buffers (`Canary.release_memory`), when it has one."""
    release = getattr(getattr(batcher, "model", None), "release_memory", None)
    if release is not None:
        try:
            release()
        except Exception:  # noqa: BLE001 - an optimisation, never a reason to stop serving
            log.exception("releasing memory failed")


def active_rows(batcher: BatcherLike) -> int:
    """Decoder rows stepping now (a beam sequence counts beam_size rows); 0 for a batcher that does not say."""
    decoders = getattr(batcher, "decoders", None)
    return sum(len(d) for d in decoders.values()) if isinstance(decoders, dict) else 0


def memory_in_use() -> tuple[int, int] | None:
    """MLX's (active, peak) bytes (engine thread only: it owns MLX)."""
    from canary_server.model.memory import memory_in_use as in_use

    return in_use()
