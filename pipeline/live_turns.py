"""Turns of a live session: raw PCM arriving in pieces, converted to the model's rate, and (with turn detection)
split where Silero VAD (pipeline/vad.py) hears speech start and stop.

The front door (OpenAI Realtime, server/realtime.py) only maps its settings here. `LiveTurns.add()` returns what
happened in order: `TurnAudio` to feed the current turn's live stream, `TurnStart` (speech began: the audio of the
prefix padding comes right after it) and `TurnStop` (silence lasted `silence_ms`: the turn is over). Without turn
detection all audio is `TurnAudio` and the client ends turns itself (`flush()`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from canary_server.pipeline.errors import InvalidAudio
from canary_server.pipeline.live import _to_float
from canary_server.pipeline.vad import SAMPLE_RATE, WINDOW, VadStream

MIN_RATE, MAX_RATE = 8000, 48000
NEG_OFFSET = 0.15  # Silero's hysteresis: speech ends below threshold - 0.15


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD settings (OpenAI's `server_vad`): probability threshold, audio kept before speech starts, and
    the silence that ends a turn."""

    threshold: float = 0.5
    prefix_ms: int = 300
    silence_ms: int = 500

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, not {self.threshold}")
        if not 0 <= self.prefix_ms <= 5000:
            raise ValueError(f"prefix_padding_ms must be in [0, 5000], not {self.prefix_ms}")
        if not 0 < self.silence_ms <= 10000:
            raise ValueError(f"silence_duration_ms must be in (0, 10000], not {self.silence_ms}")


@dataclass(frozen=True)
class TurnAudio:
    samples: np.ndarray  # model-rate mono float32


@dataclass(frozen=True)
class TurnStart:
    ms: int  # session time where the turn's audio starts (prefix padding included)


@dataclass(frozen=True)
class TurnStop:
    ms: int  # session time where the turn ends (its trailing silence included)


TurnEvent = TurnAudio | TurnStart | TurnStop


class LiveTurns:
    """One live session's audio: 16-bit little-endian mono PCM at `rate` in, model-rate turns out."""

    def __init__(self, rate: int, detection: TurnDetection | None, sample_rate: int = SAMPLE_RATE) -> None:
        if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
            raise InvalidAudio(f"unsupported audio rate {rate!r}: expected an integer in [{MIN_RATE}, {MAX_RATE}]")
        if detection is not None and sample_rate != SAMPLE_RATE:
            raise InvalidAudio(f"turn detection needs {SAMPLE_RATE} Hz models, not {sample_rate}")
        self.rate, self.sample_rate, self.detection = rate, sample_rate, detection
        self._resampler = self._new_resampler()
        self._carry = b""  # an odd trailing byte
        self._vad = VadStream() if detection else None
        self._pending = np.zeros(0, np.float32)  # model-rate audio not yet judged by the VAD (< one window)
        self._prefix: list[np.ndarray] = []  # audio before speech, at most prefix_ms
        self.in_speech = False
        self._silence = 0  # samples of non-speech since speech was last heard
        self.position = 0  # model-rate samples judged so far (the session clock)

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.rate == self.sample_rate:
            return None
        return soxr.ResampleStream(self.rate, self.sample_rate, 1, dtype="float32", quality="HQ")

    def add(self, pcm: bytes) -> list[TurnEvent]:
        """Convert a piece of PCM; with turn detection, also find turns in it."""
        data = self._carry + pcm
        usable = len(data) - len(data) % 2
        self._carry = data[usable:]
        audio = _to_float(data[:usable], 2)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        return self._route(audio)

    def flush(self) -> list[TurnEvent]:
        """The client ends the turn (a commit): what the resampler and VAD still hold goes to it."""
        tail = np.zeros(0, np.float32)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self._resampler = self._new_resampler()
        if self._vad is None:
            return [TurnAudio(tail)] if len(tail) else []
        rest = np.concatenate([self._pending, tail])
        self._pending = np.zeros(0, np.float32)
        self.position += len(rest)
        out: list[TurnEvent] = [TurnAudio(rest)] if self.in_speech and len(rest) else []
        self._reset_turn()
        return out

    def clear(self) -> None:
        """Drop the audio of the turn in progress (the client cleared its buffer)."""
        self._carry, self._pending = b"", np.zeros(0, np.float32)
        self._resampler = self._new_resampler()
        self._reset_turn()

    def _reset_turn(self) -> None:
        self.in_speech, self._silence, self._prefix = False, 0, []

    def _route(self, audio: np.ndarray) -> list[TurnEvent]:
        if self._vad is None:
            self.position += len(audio)
            return [TurnAudio(audio)] if len(audio) else []
        audio = np.concatenate([self._pending, audio])
        whole = len(audio) - len(audio) % WINDOW
        self._pending = audio[whole:]
        probs = self._vad.feed(audio[:whole])
        out: list[TurnEvent] = []
        for k, p in enumerate(probs):
            out.extend(self._window(audio[k * WINDOW : (k + 1) * WINDOW], float(p)))
        return _joined(out)

    def _window(self, window: np.ndarray, p: float) -> list[TurnEvent]:
        """One VAD window's decision: Silero's hysteresis, prefix padding kept before speech."""
        det = self.detection
        assert det is not None
        start = self.position
        self.position += len(window)
        if not self.in_speech:
            self._prefix.append(window)
            keep = det.prefix_ms * self.sample_rate // 1000 + len(window)
            while sum(len(w) for w in self._prefix) > keep and len(self._prefix) > 1:
                self._prefix.pop(0)
            if p < det.threshold:
                return []
            self.in_speech, self._silence = True, 0
            prefix = np.concatenate(self._prefix)
            self._prefix = []
            begin = start + len(window) - len(prefix)
            return [TurnStart(self._ms(begin)), TurnAudio(prefix)]
        self._silence = self._silence + len(window) if p < det.threshold - NEG_OFFSET else 0
        out: list[TurnEvent] = [TurnAudio(window)]
        if self._silence >= det.silence_ms * self.sample_rate // 1000:
            out.append(TurnStop(self._ms(self.position)))
            self._reset_turn()
        return out

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.sample_rate


def _joined(events: list[TurnEvent]) -> list[TurnEvent]:
    """Consecutive audio pieces as one (one feed to the engine instead of one per 32 ms window)."""
    out: list[TurnEvent] = []
    for ev in events:
        if isinstance(ev, TurnAudio) and out and isinstance(out[-1], TurnAudio):
            out[-1] = TurnAudio(np.concatenate([out[-1].samples, ev.samples]))
        else:
            out.append(ev)
    return out
