"""One Wyoming connection: Home Assistant's speech-to-text events in, the pipeline's transcript out.

    describe                                   -> info (the loaded model, its languages)
    transcribe {language?}                     (a code, or "auto"/none: detected, unless a default_language is set)
    audio-start {rate, width, channels}        (optional: the first audio-chunk's format is used without it)
    audio-chunk* (raw PCM payload)
      (with a known language: transcript-start, transcript-chunk* while the audio arrives, partials.py)
    audio-stop                                 -> [transcript-start, transcript-chunk* (the decoder's text as it
                                                  comes) when no partials were sent], transcript {text,
                                                  language}, transcript-stop
Any failure answers `error {text, code}` (the HTTP error codes: unsupported_language, audio_too_long,
invalid_audio, model_not_ready, rate_limit_exceeded, ...); the rest of that utterance is ignored and the
connection is closed at its audio-stop (older Home Assistant versions wait for a transcript otherwise). A frame
that is not an event (`invalid_request`) or a client silent past its deadline (`timeout`) is answered and closed
at once. The audio is held as it arrived (limits.py: `HeldAudio`) and converted when it is submitted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Describe, Info
from wyoming.server import AsyncEventHandler

from canary_server.model.errors import AudioDecodeError, CanaryError, UnsupportedLanguageError
from canary_server.pipeline import EngineBusy, EngineNotReady, Pipeline, TextDelta, TranscriptResult
from canary_server.pipeline.errors import AudioTooLong, InvalidAudio, LanguageDetectionUnavailable
from canary_server.pipeline.language import AUTO
from canary_server.wyoming_server.framing import read_event
from canary_server.wyoming_server.limits import (
    AudioBudget,
    FrameError,
    HeldAudio,
    ReadDeadline,
    WyomingLimitError,
)
from canary_server.wyoming_server.partials import Partials

log = logging.getLogger("canary.wyoming")

YIELD_EVERY = 16  # events read back to back (already buffered) before the event loop gets a turn
LINGER_BYTES = 1 << 20  # after a broken frame: what is read and dropped so the error event is not lost to a reset
LINGER_SECONDS = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits (WyomingConfig's, with the pipeline's max_audio_seconds enforced by LiveAudio)."""

    idle_seconds: float = 30.0  # no event between utterances (or a frame half sent) this long: closed
    chunk_seconds: float = 10.0  # within an utterance, the longest wait for its next event
    utterance_seconds: float = 7200.0  # wall clock from an utterance's first event to its audio-stop
    max_utterance_bytes: int = 32 * 2**20
    max_chunks: int = 50_000
    partials: str = "preview"  # transcript-chunks while the audio arrives: "off", "preview" or "final" (partials.py)


def error_code(exc: BaseException) -> str:
    """The `code` of the error event: the same words as the HTTP error bodies' `code`."""
    if isinstance(exc, WyomingLimitError):
        return exc.code
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

    def __init__(
        self,
        pipeline: Pipeline,
        info: Callable[[], Info],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        budget: AudioBudget,
        limits: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(reader, writer)
        self.pipeline = pipeline
        self.info = info  # the answer to describe
        self.budget = budget  # audio held by all connections
        self.limits = limits or ConnectionLimits()
        self.busy = False  # transcribing (the server lets that finish when it stops)
        self.audio: HeldAudio | None = None
        self.partials: Partials | None = None
        self.deadline: ReadDeadline | None = None  # while run() reads
        self._reset()

    def _reset(self) -> None:
        if self.audio is not None:
            self.audio.release()
        if self.partials is not None:
            self.partials.close()
        self.partials = None
        self.language: str | None = None  # from `transcribe`
        self.audio = None
        self.in_utterance = False  # audio-start or a chunk came: the chunk deadline applies
        self.failed = False  # an error was sent: ignore the rest of this utterance, then close
        self.ignored_chunks = 0  # chunks after the error, still bounded by max_chunks

    def _deadline(self) -> float:
        return self.limits.chunk_seconds if self.in_utterance else self.limits.idle_seconds

    async def run(self) -> None:
        """wyoming's loop, with a deadline on every read, frames checked before they are read, and a turn for the
        event loop every YIELD_EVERY events (a flood of tiny chunks arrives already buffered)."""
        self._is_running = True
        self.deadline = deadline = ReadDeadline(self._deadline, self._stop_reading)
        try:
            count = 0
            while self._is_running:
                problem: WyomingLimitError | None = None
                try:
                    event = await read_event(self.reader)
                except FrameError as exc:
                    event, problem = None, exc
                problem = deadline.expired or problem  # the deadline ended the read: that is what to answer
                if problem is not None:
                    await self._refuse(problem)
                    break
                if event is None:
                    break
                deadline.pause()
                if not await self.handle_event(event):
                    break
                deadline.resume()
                count += 1
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        finally:
            deadline.cancel()
            self._reset()
            await self.disconnect()
            self.writer.close()

    def _stop_reading(self) -> None:
        """The read deadline passed: no more bytes from the client (feed_data after EOF would be a bug), and the
        read in progress ends as if it had closed."""
        self.writer.transport.pause_reading()
        self.reader.feed_eof()

    async def _refuse(self, exc: WyomingLimitError) -> None:
        """A broken frame or a deadline: answer, end our side, drop what the client still sends for a moment
        (closing with unread data would reset the connection and lose the answer), then close."""
        log.debug("wyoming: closing a connection: %s", exc)
        if not await self._send_error(exc):
            return
        try:
            self.writer.write_eof()
            if isinstance(exc, FrameError):
                await asyncio.wait_for(self._drain_input(), LINGER_SECONDS)
        except (OSError, RuntimeError, asyncio.TimeoutError, WyomingLimitError):
            pass

    async def _drain_input(self) -> None:
        left = LINGER_BYTES
        while left > 0:
            data = await self.reader.read(min(left, 65536))
            if not data:
                return
            left -= len(data)

    async def write_event(self, event: Event) -> None:
        """Send an event; a client that stops reading for the idle deadline is dropped (ConnectionError)."""
        if self.writer.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        try:
            await asyncio.wait_for(async_write_event(event, self.writer), self.limits.idle_seconds)
        except asyncio.TimeoutError:
            self.writer.transport.abort()
            raise ConnectionResetError("the client stopped reading") from None

    async def handle_event(self, event: Event) -> bool:
        if AudioChunk.is_type(event.type):  # first: the one event that comes thousands of times
            return await self._chunk(event)
        if AudioStop.is_type(event.type):
            if self.deadline is not None:  # the utterance's wall-clock end: only audio-stop lifts it
                self.deadline.end_at(None)
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
                self.language = _language_code(event.data.get("language"))
                self._options()  # validate now: a bad language is answered before the audio is sent
            elif AudioStart.is_type(event.type) and not self.failed:
                self._start(event.data)
            # other events (ping, select-program, ...) are not for a speech-to-text server
        except Exception as exc:  # noqa: BLE001 - answered as an error event
            # After a describe (e.g. while the model loads) the client may ask again; in an utterance the rest
            # of its audio is ignored and the connection closes at its audio-stop.
            return await self._fail(exc, utterance=not Describe.is_type(event.type))
        return True

    async def _chunk(self, event: Event) -> bool:
        if self.failed:  # the rest of a failed utterance: dropped, counted
            self.ignored_chunks += 1
            return self.ignored_chunks <= self.limits.max_chunks
        try:
            data = event.data
            if self.audio is None:  # no audio-start: the chunks carry their format
                self._start(data)
            elif not self.audio.same_format(data.get("rate"), data.get("width"), data.get("channels")):
                a = self.audio.live
                raise InvalidAudio(
                    f"audio format changed mid-utterance: {a.rate} Hz/{a.width} B/{a.channels} ch, then "
                    f"{_fmt(data.get('rate'))} Hz/{_fmt(data.get('width'))} B/{_fmt(data.get('channels'))} ch"
                )
            self.audio.add(event.payload or b"")
            if self.partials is not None:
                self.partials.add(event.payload or b"")
        except Exception as exc:  # noqa: BLE001 - answered as an error event
            return await self._fail(exc, utterance=True)
        return True

    def _start(self, data: dict) -> None:
        """audio-start (or the first chunk without one): the format, validated by the pipeline's LiveAudio."""
        if self.audio is not None:
            self.audio.release()
            self.audio = None
        if self.partials is not None:
            self.partials.close()
            self.partials = None
        if self.deadline is not None and self.deadline.end is None:  # audio-start or transcribe again: not moved
            self.deadline.end_at(self.limits.utterance_seconds)
        self.in_utterance = True
        live = self.pipeline.live_audio(data.get("rate"), data.get("width"), data.get("channels"))
        self.audio = HeldAudio(
            live, self.budget, max_bytes=self.limits.max_utterance_bytes, max_chunks=self.limits.max_chunks
        )
        if self.limits.partials != "off":
            self.partials = self._open_partials(live)

    def _open_partials(self, live) -> Partials | None:
        try:
            options = self._options()
        except CanaryError:  # e.g. detection unavailable: answered at audio-stop, as without partials
            return None
        fmt = (live.rate, live.width, live.channels)
        return Partials.open(self.pipeline, options, fmt, self.write_event, self.budget)

    async def _fail(self, exc: BaseException, *, utterance: bool) -> bool:
        if self.audio is not None:
            self.audio.release()
        self.audio = None
        if self.partials is not None:
            self.partials.close()
            self.partials = None
        self.failed = self.failed or utterance
        return await self._send_error(exc)

    def _options(self):
        return self.pipeline.options(self.language, None)

    async def _finish(self) -> bool:
        """audio-stop: transcribe the utterance, streaming the text as it is decoded."""
        audio, options, partials = self.audio, self._options(), self.partials
        self.audio = self.partials = None  # the handler's reset no longer releases them: done below
        self._reset()
        self.busy = True
        try:
            if partials is not None and await self._final_from_stream(partials, audio):
                return True
        finally:
            self.busy = False
        try:
            samples = await asyncio.to_thread(audio.to_samples) if audio is not None else None
        finally:
            if audio is not None:
                audio.release()
        if samples is None or not len(samples):  # e.g. Home Assistant's VAD heard nothing
            await self._write_all([TranscriptStart(), Transcript(text=""), TranscriptStop()])
            return True
        self.busy = True
        try:
            await self._transcribe(samples, options, sent=partials.text if partials and partials.started else None)
        finally:
            self.busy = False
        return True

    async def _final_from_stream(self, partials: Partials, audio: HeldAudio | None) -> bool:
        """`partials = "final"`: the streaming decoder's final text is the transcript (True when it was sent).
        Otherwise (or when the stream failed) the stream stops here and the offline decode answers."""
        if self.limits.partials != "final":
            partials.close()
            return False
        try:
            final = await partials.finish()
        except Exception:
            partials.close()
            raise
        if final is None:
            return False
        if audio is not None:
            audio.release()
        events = [] if partials.started else [TranscriptStart(language=partials.language)]
        events += [TranscriptChunk(text=final.delta)] if final.delta else []
        log.info("wyoming: streamed utterance -> %d characters", len(final.text))
        await self._write_all([*events, Transcript(text=final.text, language=partials.language), TranscriptStop()])
        return True

    async def _transcribe(self, samples, options, *, sent: str | None = None) -> None:
        """The offline decode of the utterance. After live partials (`sent`: their text) the offline deltas are not
        sent again: one transcript-chunk with the rest of the text when the partials were its beginning (the chunks
        then add up to the transcript), else only the final transcript."""
        started = sent is not None
        events = self.pipeline.stream(samples, options)
        try:
            first = await anext(events)  # bad audio, busy or loading raise here, before transcript-start
            language = None if options.detect else options.target_lang
            if not started:
                await self.write_event(TranscriptStart(language=language).event())
            event = first
            while isinstance(event, TextDelta):
                if not started:
                    await self.write_event(TranscriptChunk(text=event.text).event())
                event = await anext(events)
            result: TranscriptResult = event
            if sent is not None and result.text.startswith(sent) and len(result.text) > len(sent):
                await self.write_event(TranscriptChunk(text=result.text[len(sent) :]).event())
            log.info("wyoming: %.2f s of %s -> %d characters", result.duration, result.language, len(result.text))
            await self._write_all([Transcript(text=result.text, language=result.language), TranscriptStop()])
        finally:
            await events.aclose()  # a client that went away cancels the engine work

    async def _send_error(self, exc: BaseException) -> bool:
        """Answer an error event; False when the client is gone. An unexpected error's text stays in the log."""
        if isinstance(exc, ConnectionError):  # the client went away or stopped reading: no one to answer
            return False
        code = error_code(exc)
        if code == "internal_error":
            log.error("wyoming request failed", exc_info=exc)
        text = "internal error (see the server log)" if code == "internal_error" else str(exc) or code
        try:
            await self.write_event(Error(text=text, code=code).event())
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _write_all(self, events) -> None:
        for e in events:
            await self.write_event(e.event())


def _fmt(value: object) -> str:
    """A client's format field in an error text: short, whatever it sent."""
    return repr(value)[:20]


def _language_code(language: object) -> str | None:
    """Home Assistant may send a locale ("de-DE"): the model's prompt takes the language part."""
    if language is not None and not isinstance(language, str):
        raise WyomingLimitError("transcribe: language must be a string")
    if not language:
        return None
    language = language.strip().replace("_", "-")
    return AUTO if language.lower() == AUTO else language.split("-")[0].lower()
