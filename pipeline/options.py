"""What a caller asks of the pipeline: per request (`TranscribeOptions`) and per process (`PipelineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from canary_server.model.boosting import DEFAULT_ALPHA
from canary_server.pipeline.fairness import DEFAULT_SHARE
from canary_server.pipeline.language import AUTO, LanguageDetection
from canary_server.pipeline.speech import VadParams


@dataclass(frozen=True)
class TranscribeOptions:
    """A validated request: what to decode and how."""

    source_lang: str
    target_lang: str
    pnc: bool = True
    context: str | None = None  # decoder context (canary2 models; dropped for others)
    timestamps: bool = False  # ask the model for word/segment times (only when the caller shows them)
    # Times wanted from a model that has none: decode pieces of at most this many seconds, cut at pauses, so each
    # segment (subtitle cue) spans one piece with its real start and end instead of a whole chunk.
    cue_seconds: float | None = None
    # Detect the source language from the audio; source_lang / target_lang are then provisional (the fallback)
    detect: LanguageDetection | None = None
    keywords: tuple[str, ...] = ()  # phrases to boost (pipeline/keywords.py); empty: none
    vad: VadParams = VadParams()  # chunking_strategy's server_vad fields (pipeline/speech.py)

    @property
    def task(self) -> Literal["transcribe", "translate"]:
        return "transcribe" if self.source_lang == self.target_lang else "translate"


@dataclass(frozen=True)
class PipelineConfig:
    """Limits and scheduling of one pipeline (the server's settings of the same names)."""

    # Longest piece decoded at once: audio up to this long is decoded whole (as NeMo's transcribe() does), longer
    # audio cut at pauses into pieces of at most this (NeMo's chunked inference: 40 s, what Canary trains on).
    chunk_seconds: float = 40.0
    max_audio_seconds: float = 3600.0  # longer audio is refused, never truncated
    batch_size: int = 16  # most sequences decoded together
    encode_batch_seconds: float = 30.0  # most seconds of audio in one encoder batch
    max_queued_requests: int = 64  # requests accepted at once; more are refused (EngineBusy)
    beam_size: int | None = None  # None: the model's own decoding config
    length_penalty: float | None = None  # None: the model's
    long_request_share: float = DEFAULT_SHARE  # engine time kept by work deferred for shorter requests
    cue_seconds: float = 7.0  # longest piece (so segment, cue) when times are wanted from a model without them
    # Language of a request without one: "auto" detects it from the audio (pipeline/language.py), so a German clip
    # is never prompted as English; a code decodes every such request in that language (None: the model's prompt
    # default). `detect_language` detects even with a fixed code, which is then only the fallback below
    # `detect_threshold`. `language="auto"` always detects.
    default_language: str | None = AUTO
    detect_language: bool = False
    detect_languages: tuple[str, ...] = ()  # detection picks only among these (empty: all the model's)
    detect_threshold: float = 0.5  # below it (best candidate's probability), a fixed default_language is decoded
    # Silero VAD on every request (pipeline/speech.py): audio without speech gets empty text undecoded; audio longer
    # than chunk_seconds is cut in its pauses (False: the energy rule alone cuts, everything is decoded)
    vad: bool = True
    # A live stream (Realtime) without a language holds its first audio this long, detects the language from it,
    # then starts decoding in it (pipeline/live_stream.py); a turn that ends sooner is detected from what it has.
    live_detect_seconds: float = 1.5
    # Free the model after this long without requests (None: never); the next request reloads it. Frees memory only
    # when the engine's loader loads it (a path or repo id), not for a model object the caller keeps.
    idle_unload_seconds: float | None = None
    max_prompt_tokens: int = 224  # decoder context keeps its last N tokens (OpenAI's whisper-1 convention)
    max_concurrent_decodes: int = 2  # files decoded/resampled at once (each holds up to max_audio_seconds)
    # The decode budget of one file: samples at its own rate x channels (from the header, then as decoded; default
    # an hour of 96 kHz stereo), and the wall-clock and CPU seconds its decode may take (checked between blocks).
    max_decode_samples: float = 3600 * 96000 * 2.0
    max_decode_seconds: float = 120.0
    max_decode_cpu_seconds: float = 60.0
    max_queued_audio_seconds: float = 4 * 3600.0  # audio held by accepted requests; more are refused (EngineBusy)
    shutdown_grace_seconds: float = 30.0  # on shutdown, running requests get this long to finish
    idle_release_seconds: float = 2.0  # idle this long after work, the engine hands freed memory back (0: never)
    # Phrase boosting (NeMo's boosting tree): the list for requests without their own, and its weight
    keywords: tuple[str, ...] = ()
    boosting_tree_alpha: float = DEFAULT_ALPHA
