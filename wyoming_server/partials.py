"""Live partial transcripts for one Wyoming utterance: its audio is fed to an engine live stream (NeMo's streaming
Canary decoding, pipeline/live_stream.py) as the `audio-chunk`s arrive, and the text the streaming decoder commits
goes out as `transcript-start` + `transcript-chunk` events while the user still speaks.

The partials are previews. The final `transcript` at `audio-stop` is, by default, the offline decode of the whole
utterance (NeMo-offline-exact text, the same as HTTP's; `wyoming_partials = "preview"`), or the streaming
decoder's own final text (`"final"`: less wait after `audio-stop`, not offline-exact; `"off"`: no partials).
BENCHMARKS.md "Wyoming partials" has the measurement behind the default.

A stream needs a source language: without one (language detection) the utterance gets no partials, only the
final transcript (detection runs on the whole utterance at `audio-stop`, as before).

Partials are for live audio. The float32 copy a stream holds in the engine (its context window and the audio not
yet decoded) is charged to the connections' `AudioBudget` as a fixed STREAM_HELD_SECONDS when it opens; a client
that sends faster than real time (more than AHEAD_SECONDS ahead of the clock since its audio-start: a file, a
flood) loses its stream, so what the engine holds stays bounded; its utterance is still answered at `audio-stop`
from the PCM held as sent (limits.py: `HeldAudio`). The engine's stream opens only once the first chunk and its
right context have arrived live (a flood never reaches the engine).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np
from wyoming.asr import TranscriptChunk, TranscriptStart
from wyoming.event import Event

from canary_server.model.stream_buffer import StreamingConfig
from canary_server.pipeline import Pipeline
from canary_server.pipeline.live import LiveAudio
from canary_server.pipeline.live_stream import LiveJob, LiveUpdate
from canary_server.pipeline.options import TranscribeOptions
from canary_server.wyoming_server.limits import AudioBudget, ServerBusy

log = logging.getLogger("canary.wyoming")

Send = Callable[[Event], Awaitable[None]]

# 1 s chunks with 0.5 s of right context (one of the settings the NeMo parity fixtures cover): the first text can
# come 1.5 s into an utterance. NeMo's example defaults (2 s + 2 s) would show nothing before 4 s, longer than most
# Home Assistant commands. Left context 10 s as NeMo's.
STREAM_CONFIG = StreamingConfig(chunk_secs=1.0, left_context_secs=10.0, right_context_secs=0.5, policy="alignatt")
START_SECONDS = STREAM_CONFIG.chunk_secs + STREAM_CONFIG.right_context_secs  # audio before the first step
AHEAD_SECONDS = 1.0  # audio this far ahead of the clock since audio-start is not live: the stream is dropped
# What one stream may hold in the engine: its window (left + chunk + right) and the audio not yet decoded
STREAM_HELD_SECONDS = 16.0


class Partials:
    """One utterance's live stream. `add()` each chunk's PCM, then `finish()` (the final update, or None when the
    stream was dropped or failed) or `close()`; `started` once `transcript-start` was sent."""

    def __init__(
        self, open_job: Callable[[], LiveJob], live: LiveAudio, send: Send, language: str, release: Callable[[], None]
    ) -> None:
        self.live, self.language = live, language
        self._open_job, self._send, self._release = open_job, send, release  # release: the budget back, once
        self._loop = asyncio.get_running_loop()
        self.began = self._loop.time()
        self.job: LiveJob | None = None  # opened once START_SECONDS arrived live
        self._waiting: list[np.ndarray] = []  # converted audio before that
        self._task: asyncio.Task | None = None
        self.closed = False
        self.started = False
        self.text = ""  # sent in transcript-chunks so far
        self.final: LiveUpdate | None = None

    @classmethod
    def open(
        cls, pipeline: Pipeline, options: TranscribeOptions, fmt: tuple[int, int, int], send: Send, budget: AudioBudget
    ) -> Partials | None:
        """A stream for this utterance, or None: no language to stream in (detection), the connections' budget
        is spent, or the audio format is refused (the utterance's own checks answer that)."""
        if options.detect is not None:
            return None
        held = int(STREAM_HELD_SECONDS * pipeline.info.sample_rate * 4)
        try:
            budget.take(held, STREAM_HELD_SECONDS)
        except ServerBusy:
            return None
        given = False

        def release() -> None:
            nonlocal given
            if not given:
                given = True
                budget.give(held, STREAM_HELD_SECONDS)

        def open_job() -> LiveJob:
            o, most = options, pipeline.config.max_audio_seconds
            return pipeline.engine.open_stream(o.source_lang, o.target_lang, o.pnc, STREAM_CONFIG, max_seconds=most)

        try:
            live = pipeline.live_audio(*fmt)  # its own converter: the held PCM stays for the offline decode
        except Exception:  # noqa: BLE001 - HeldAudio's converter refused it first
            release()
            return None
        return cls(open_job, live, send, options.target_lang, release)

    def add(self, pcm: bytes) -> None:
        """Convert and feed a chunk (its format and size were checked by HeldAudio first)."""
        if self.closed:
            return
        live = self.live
        seconds = live.seconds + len(pcm) / (live.width * live.channels * live.rate)  # checked before converting
        if seconds > self._loop.time() - self.began + AHEAD_SECONDS:
            log.debug("wyoming: audio sent faster than real time: no partials for this utterance")
            self.close()
            return
        live.add(pcm)
        samples = self.live.take()
        if self.job is None:
            self._waiting.append(samples)
            if self.live.seconds < START_SECONDS or not self._start():
                return
            samples = self._take_waiting()
        self._feed(samples)

    def _start(self) -> bool:
        """Open the engine's stream; False (and closed) when it cannot take one (loading, shutting down)."""
        try:
            self.job = self._open_job()
        except Exception as exc:  # noqa: BLE001 - partials are previews: the utterance goes on without them
            log.debug("wyoming: no partials for this utterance: %s", exc)
            self.close()
            return False
        self._task = asyncio.create_task(self._pump())
        return True

    def _take_waiting(self) -> np.ndarray:
        out = np.concatenate(self._waiting) if self._waiting else np.zeros(0, np.float32)
        self._waiting = []
        return out

    def _feed(self, samples: np.ndarray) -> None:
        if len(samples):
            self.job.feed(samples)

    async def _pump(self) -> None:
        """Write the committed text as it comes; the final update is kept for `finish()`."""
        try:
            async for update in self.job.updates():
                if update.final:
                    self.final = update
                    return
                if update.delta:
                    await self._send_chunk(update.delta)
        except Exception as exc:  # noqa: BLE001 - a failed preview (or a client gone: the handler sees it too)
            log.debug("wyoming: live stream ended: %s", exc)

    async def _send_chunk(self, text: str) -> None:
        if not self.started:
            self.started = True
            await self._send(TranscriptStart(language=self.language).event())
        self.text += text
        await self._send(TranscriptChunk(text=text).event())

    async def finish(self) -> LiveUpdate | None:
        """audio-stop: the rest of the audio in, the stream ended and decoded to its final update (None: the
        stream was dropped or failed). An utterance shorter than START_SECONDS is streamed whole now."""
        if self.closed or (self.job is None and not self._start()):
            self.close()
            return None
        self._feed(np.concatenate([self._take_waiting(), self.live.finish()]))
        self.job.end()
        try:
            await self._task
        finally:
            self.close()
        return self.final

    def close(self) -> None:
        """The stream leaves the engine (offline final, an error, the client left, not live); idempotent."""
        self.closed = True
        self._waiting = []
        if self.job is not None:
            self.job.close()
        if self._task is not None:
            self._task.cancel()
        self._release()
