"""Errors the pipeline raises for a request; every front door maps them to its own error shape.

Input errors subclass `canary_server.model.errors.CanaryError` (a ValueError), like the model's own
(`UnsupportedLanguageError`, `AudioDecodeError`), so "the caller's fault" is one class to catch.
"""

from __future__ import annotations

from canary_server.model.errors import AudioTooLong, CanaryError, PromptTooLong

__all__ = [
    "AudioTooLong",
    "EngineBusy",
    "EngineNotReady",
    "InvalidAudio",
    "LanguageDetectionUnavailable",
    "PromptTooLong",
    "UnknownFormat",
]


class InvalidAudio(CanaryError):
    """Empty, silent-by-construction or otherwise unusable audio (after it decoded)."""


class UnknownFormat(CanaryError):
    """A response format that is not one of OpenAI's (json, text, srt, vtt, verbose_json)."""


class LanguageDetectionUnavailable(CanaryError):
    """Detection asked of a model whose language slot was never trained (`use_loss_mask_for_prompt`): its answer
    would be a guess, so the request must name its language."""

    def __init__(self, role: str = "language") -> None:
        self.role = role
        super().__init__(
            f"this model cannot detect the spoken language (it was trained with its prompt masked, so its "
            f"language slot means nothing): give {role} a language code"
        )


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine is shut down."""


class EngineBusy(RuntimeError):
    """Too many requests are queued; the caller should retry later."""
