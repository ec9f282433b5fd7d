"""One Wyoming connection: Home Assistant's speech-to-text events in, the pipeline's transcript out.

    describe                                   -> info (the loaded model, its languages)
    transcribe {language?}                     (a code, or "auto"/none: detected, unless a default_language is set)
    audio-start {rate, width, channels}        (optional: the first audio-chunk's format is used without it)
    audio-chunk* (raw PCM payload)
    audio-stop                                 -> transcript-start, transcript-chunk* (the decoder's text as it
                                                  comes), transcript {text, language}, transcript-stop
Any failure answers `error {text, code}` (the HTTP error codes: unsupported_language, audio_too_long,
invalid_audio, model_not_ready, rate_limit_exceeded, ...); the rest of that utterance is ignored and the
connection is closed at its audio-stop (older Home Assistant versions wait for a transcript otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.server import AsyncEventHandler

from canary_server.model.errors import AudioDecodeError, CanaryError, UnsupportedLanguageError
from canary_server.pipeline import EngineBusy, EngineNotReady, Pipeline, TextDelta, TranscriptResult
from canary_server.pipeline.errors import AudioTooLong, InvalidAudio, LanguageDetectionUnavailable
from canary_server.pipeline.language import AUTO
from canary_server.pipeline.live import LiveAudio

log = logging.getLogger("canary.wyoming")


def error_code(exc: BaseException) -> str:
    """The `code` of the error event: the same words as the HTTP error bodies' `code`."""
    if isinstance(exc, UnsupportedLanguageError):
        return "unsupported_language"
    if isinstance(exc, LanguageDetectionUnavailable):
        return "language_detection_unavailable"
    if isinstance(exc, AudioTooLong):
        return "audio_too_long"
    if isinstance(exc, AudioDecodeError | InvalidAudio):
        return "invalid_audio"
    if isinstance(exc, EngineNotReady):
        return "model_not_ready"
    if isinstance(exc, EngineBusy):
        return "rate_limit_exceeded"
    if isinstance(exc, CanaryError):
        return "invalid_request"
    return "internal_error"


class CanaryEventHandler(AsyncEventHandler):
    """Parses the events, validates, feeds the pipeline, writes what comes back (no pipeline step in here)."""

    def __init__(self, pipeline: Pipeline, info: Callable[[], Info], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline
        self.info = info  # the answer to describe
        self.busy = False  # transcribing (the server lets that finish when it stops)
        self._reset()

    def _reset(self) -> None:
        self.language: str | None = None  # from `transcribe`
        self.audio: LiveAudio | None = None
        self.failed = False  # an error was sent: ignore the rest of this utterance, then close

    async def handle_event(self, event: Event) -> bool:
        if AudioStop.is_type(event.type):
            if self.failed:  # its error was sent when it happened
                self._reset()
                return False
            try:
                return await self._finish()
            except Exception as exc:  # noqa: BLE001 - answered as an error event, then the connection closes
                await self._send_error(exc)
                return False
        try:
            if Describe.is_type(event.type):
                await self.write_event(self.info().event())
            elif Transcribe.is_type(event.type):
                self._reset()
                self.language = _language_code(Transcribe.from_event(event).language)
                self._options()  # validate now: a bad language is answered before the audio is sent
            elif AudioStart.is_type(event.type) and not self.failed:
                start = AudioStart.from_event(event)
                self.audio = self.pipeline.live_audio(start.rate, start.width, start.channels)
            elif AudioChunk.is_type(event.type) and not self.failed:
                self._add(AudioChunk.from_event(event))
            # other events (ping, select-program, ...) are not for a speech-to-text server
        except Exception as exc:  # noqa: BLE001 - answered as an error event
            # After a describe (e.g. while the model loads) the client may ask again; in an utterance the rest
            # of its audio is ignored and the connection closes at its audio-stop.
            self.audio, self.failed = None, not Describe.is_type(event.type)
            return await self._send_error(exc)
        return True

    def _options(self):
        return self.pipeline.options(self.language, None)

    def _add(self, chunk: AudioChunk) -> None:
        if self.audio is None:  # no audio-start: the chunks carry their format
            self.audio = self.pipeline.live_audio(chunk.rate, chunk.width, chunk.channels)
        elif not self.audio.same_format(chunk.rate, chunk.width, chunk.channels):
            a = self.audio
            raise InvalidAudio(
                f"audio format changed mid-utterance: {a.rate} Hz/{a.width} B/{a.channels} ch, then "
                f"{chunk.rate} Hz/{chunk.width} B/{chunk.channels} ch"
            )
        self.audio.add(chunk.audio)

    async def _finish(self) -> bool:
        """audio-stop: transcribe the utterance, streaming the text as it is decoded."""
        samples = self.audio.finish() if self.audio is not None else None
        options = self._options()
        self._reset()
        if samples is None or not len(samples):  # e.g. Home Assistant's VAD heard nothing
            await self._write_all([TranscriptStart(), Transcript(text=""), TranscriptStop()])
            return True
        self.busy = True
        try:
            await self._transcribe(samples, options)
        finally:
            self.busy = False
        return True

    async def _transcribe(self, samples, options) -> None:
        events = self.pipeline.stream(samples, options)
        try:
            first = await anext(events)  # bad audio, busy or loading raise here, before transcript-start
            language = None if options.detect else options.target_lang
            await self.write_event(TranscriptStart(language=language).event())
            event = first
            while isinstance(event, TextDelta):
                await self.write_event(TranscriptChunk(text=event.text).event())
                event = await anext(events)
            result: TranscriptResult = event
            log.info("wyoming: %.2f s of %s -> %d characters", result.duration, result.language, len(result.text))
            await self._write_all([Transcript(text=result.text, language=result.language), TranscriptStop()])
        finally:
            await events.aclose()  # a client that went away cancels the engine work

    async def _send_error(self, exc: BaseException) -> bool:
        """Answer an error event; False when the client is gone."""
        code = error_code(exc)
        if code == "internal_error":
            log.error("wyoming request failed", exc_info=exc)
        try:
            await self.write_event(Error(text=str(exc) or type(exc).__name__, code=code).event())
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _write_all(self, events) -> None:
        for e in events:
            await self.write_event(e.event())


def _language_code(language: str | None) -> str | None:
    """Home Assistant may send a locale ("de-DE"): the model's prompt takes the language part."""
    if not language:
        return None
    language = language.strip().replace("_", "-")
    return AUTO if language.lower() == AUTO else language.split("-")[0].lower()
