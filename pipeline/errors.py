"""Errors the pipeline raises for a request; every front door maps them to its own error shape.

Input errors subclass `canary_server.model.errors.CanaryError` (a ValueError), like the model's own
(`UnsupportedLanguageError`, `AudioDecodeError`), so "the caller's fault" is one class to catch.
"""

from __future__ import annotations

from canary_server.model.errors import AudioTooLong, CanaryError, PromptTooLong

__all__ = ["AudioTooLong", "EngineBusy", "EngineNotReady", "InvalidAudio", "PromptTooLong", "UnknownFormat"]


class InvalidAudio(CanaryError):
    """Empty, silent-by-construction or otherwise unusable audio (after it decoded)."""


class UnknownFormat(CanaryError):
    """A response format that is not one of OpenAI's (json, text, srt, vtt, verbose_json)."""


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine is shut down."""


class EngineBusy(RuntimeError):
    """Too many requests are queued; the caller should retry later."""
