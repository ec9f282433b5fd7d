"""What a Wyoming connection may hold and how long it may keep the server waiting.

Every limit here answers an `error {text, code}` event (`code` below); the handler decides whether the connection
closes at once (a broken frame, a deadline) or at the utterance's `audio-stop` (the client may still be sending).

- `HeldAudio`: one utterance's PCM exactly as it arrived (`width` bytes a sample at the client's rate: 8-bit 1 kHz
  costs 1 byte a byte, not the 64 of 16 kHz float32), capped in bytes, seconds and chunks; converted to the
  model's format only when it is submitted at `audio-stop`.
- `AudioBudget`: what all connections hold together, in bytes and seconds.
- `ReadDeadline`: one timer per connection that ends the pending read when the client has sent nothing for too
  long (idle between utterances, between chunks, or a frame half sent), or when its utterance has run past its
  wall-clock end (a client dripping one chunk just inside the chunk deadline); it is moved lazily, not re-armed
  per event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from canary_server.pipeline.errors import AudioTooLong
from canary_server.pipeline.live import LiveAudio

CONVERT_SLICE = 1 << 20  # bytes of held PCM converted at once (bounds the float32 temporaries)


class WyomingLimitError(Exception):
    """A Wyoming limit was passed; `code` is the error event's code."""

    code = "invalid_request"


class FrameError(WyomingLimitError):
    """A frame that is not a Wyoming event (bad JSON, a length that is not a small non-negative integer, ...)."""


class ReadTimeout(WyomingLimitError):
    code = "timeout"


class UtteranceTooSlow(ReadTimeout):
    """The utterance's wall-clock end passed before its audio-stop."""


class UtteranceTooLarge(WyomingLimitError):
    code = "audio_too_long"


class ServerBusy(WyomingLimitError):
    """The server's own caps (audio held by all connections, open connections): retry later."""

    code = "rate_limit_exceeded"


class AudioBudget:
    """Audio held by all connections together; `take()` past either cap raises ServerBusy."""

    def __init__(self, max_bytes: int, max_seconds: float) -> None:
        self.max_bytes, self.max_seconds = max_bytes, max_seconds
        self.bytes, self.seconds = 0, 0.0

    def take(self, nbytes: int, seconds: float) -> None:
        if self.bytes + nbytes > self.max_bytes or self.seconds + seconds > self.max_seconds:
            raise ServerBusy(
                f"the server holds too much audio of other connections ({self.bytes / 2**20:.0f} MiB, "
                f"{self.seconds:.0f} s); try again later"
            )
        self.bytes += nbytes
        self.seconds += seconds

    def give(self, nbytes: int, seconds: float) -> None:
        self.bytes = max(0, self.bytes - nbytes)
        self.seconds = max(0.0, self.seconds - seconds)


class HeldAudio:
    """One utterance's raw PCM in the format its `LiveAudio` validated; `add()` each chunk, `release()` always."""

    def __init__(self, live: LiveAudio, budget: AudioBudget, *, max_bytes: int, max_chunks: int) -> None:
        self.live, self.budget = live, budget
        self.max_bytes, self.max_chunks = max_bytes, max_chunks
        self.frame = live.width * live.channels
        self.data = bytearray()
        self.chunks = 0
        self.seconds = 0.0  # of whole frames held, charged to the budget

    def same_format(self, rate: object, width: object, channels: object) -> bool:
        return self.live.same_format(rate, width, channels)

    def add(self, pcm: bytes) -> None:
        """Hold a chunk; raises UtteranceTooLarge, AudioTooLong or ServerBusy (nothing of it is held then)."""
        self.chunks += 1
        if self.chunks > self.max_chunks:
            raise UtteranceTooLarge(f"more than {self.max_chunks} audio chunks in one utterance")
        size = len(self.data) + len(pcm)
        if size > self.max_bytes:
            raise UtteranceTooLarge(f"more than {self.max_bytes / 2**20:g} MiB of audio in one utterance")
        seconds = size // self.frame / self.live.rate
        if seconds > self.live.max_seconds:
            raise AudioTooLong(seconds, self.live.max_seconds)
        self.budget.take(len(pcm), seconds - self.seconds)
        self.data += pcm
        self.seconds = seconds

    def to_samples(self) -> np.ndarray:
        """The utterance as the model's mono float32 (through the pipeline's LiveAudio, in slices: run it on a
        worker thread, it is the one step here whose cost grows with the audio)."""
        view = memoryview(self.data)
        try:
            for start in range(0, len(view), CONVERT_SLICE):
                self.live.add(view[start : start + CONVERT_SLICE])
        finally:
            view.release()
        return self.live.finish()

    def release(self) -> None:
        """Give the bytes and seconds back to the budget (idempotent)."""
        self.budget.give(len(self.data), self.seconds)
        self.data = bytearray()
        self.seconds = 0.0


class ReadDeadline:
    """Calls `expire()` once nothing arrived for `limit()` seconds while the connection is read, or once the
    utterance's end (`end_at`) passed (`expired` is then the ReadTimeout to answer). The handler's `expire` stops
    reading and ends the read in progress.

    `pause()` while the handler works (a transcription is not the client's delay), `resume()` when it reads again
    and after every event; the one timer checks when it fires and moves itself to the new due time."""

    def __init__(self, limit: Callable[[], float], expire: Callable[[], None]) -> None:
        self._limit, self._expire = limit, expire
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self.reading = True
        self.end: float | None = None  # loop time the utterance must have ended by (None: not in one)
        self._utterance_seconds = 0.0
        self.expired: ReadTimeout | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self.last + limit(), self._check)

    def end_at(self, seconds: float | None) -> None:
        """An utterance began (`seconds`: how long it may take, wall clock, to its audio-stop) or ended (None)."""
        self.end = None if seconds is None else self._loop.time() + seconds
        self._utterance_seconds = seconds or 0.0
        self._move_earlier()

    def pause(self) -> None:
        self.reading = False

    def resume(self) -> None:
        self.last = self._loop.time()
        self.reading = True
        self._move_earlier()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self, now: float) -> float:
        if not self.reading:  # the handler is working: checked again once it reads (resume moves the timer)
            return now + self._limit()
        due = self.last + self._limit()
        return due if self.end is None else min(due, self.end)

    def _move_earlier(self) -> None:
        due = self._due(self._loop.time())
        if self._timer is not None and due < self._timer.when():  # a shorter limit now (an utterance began)
            self._timer.cancel()
            self._timer = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        due = self._due(now)
        if self.reading and now >= due:
            self._timer = None
            if self.end is not None and now >= self.end:
                self.expired = UtteranceTooSlow(
                    f"the utterance took longer than {self._utterance_seconds:g} s to its audio-stop; closing the "
                    "connection"
                )
            else:
                self.expired = ReadTimeout(f"nothing received for {self._limit():g} s; closing the connection")
            self._expire()
            return
        self._timer = self._loop.call_at(due, self._check)
