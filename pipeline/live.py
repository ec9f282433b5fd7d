"""Raw PCM that arrives in pieces (Wyoming's `audio-chunk` events, a microphone): converted to the model's mono
float32 rate as it arrives, with the pipeline's `max_audio_seconds` enforced while it accumulates.

Samples are little-endian signed integers of `width` bytes (unsigned for width 1, as in WAV and Wyoming); channels
are interleaved and averaged to mono as the file decoder does; the rate is converted with soxr's streaming
resampler at the file decoder's quality. A piece may end mid-frame: the rest waits for the next piece.
"""

from __future__ import annotations

import numpy as np
import soxr

from canary_server.pipeline.errors import AudioTooLong, InvalidAudio

MAX_RATE = 384_000  # Hz
MAX_CHANNELS = 64
_SCALE = {1: 128.0, 2: 32768.0, 3: 8388608.0, 4: 2147483648.0}


class LiveAudio:
    """One utterance of raw PCM in the format given at the start. `add()` each piece, then `finish()`."""

    def __init__(self, rate: int, width: int, channels: int, *, sample_rate: int, max_seconds: float) -> None:
        for name, value, low, high in (("rate", rate, 1000, MAX_RATE), ("channels", channels, 1, MAX_CHANNELS)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidAudio(f"unsupported audio {name} {value!r}: expected an integer in [{low}, {high}]")
        if width not in _SCALE or isinstance(width, bool):
            raise InvalidAudio(f"unsupported sample width {width!r} bytes: expected 1, 2, 3 or 4")
        self.rate, self.width, self.channels = rate, width, channels
        self.max_seconds = max_seconds
        self._resampler = (
            soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ") if rate != sample_rate else None
        )
        self._pieces: list[np.ndarray] = []
        self._carry = b""  # a trailing partial frame
        self.frames = 0  # input frames so far

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def same_format(self, rate: int, width: int, channels: int) -> bool:
        return (rate, width, channels) == (self.rate, self.width, self.channels)

    def add(self, pcm: bytes | bytearray | memoryview) -> None:
        """Append a piece; raises AudioTooLong as soon as the utterance passes `max_seconds`."""
        data = self._carry + bytes(pcm)
        frame = self.width * self.channels
        usable = len(data) - len(data) % frame
        self._carry = data[usable:]
        n = usable // frame
        if not n:
            return
        if (self.frames + n) / self.rate > self.max_seconds:
            raise AudioTooLong((self.frames + n) / self.rate, self.max_seconds)
        self.frames += n
        samples = _to_float(data[:usable], self.width).reshape(n, self.channels)
        mono = samples[:, 0] if self.channels == 1 else samples.mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        self._pieces.append(np.ascontiguousarray(mono, dtype=np.float32))

    def take(self) -> np.ndarray:
        """The samples converted since the last `take()`, given away (a live stream feeds them to the engine as
        they arrive instead of holding the utterance twice); `finish()` then returns only what came after."""
        out = np.concatenate(self._pieces) if self._pieces else np.zeros(0, np.float32)
        self._pieces = []
        return out.astype(np.float32, copy=False)

    def finish(self) -> np.ndarray:
        """The whole utterance, mono float32 at the model's rate (a trailing partial frame is dropped)."""
        if self._resampler is not None:
            self._pieces.append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        out = np.concatenate(self._pieces) if self._pieces else np.zeros(0, np.float32)
        self._pieces = [out]
        self._resampler = None
        return out.astype(np.float32, copy=False)


def _to_float(data: bytes, width: int) -> np.ndarray:
    """Little-endian PCM -> float32 in [-1, 1), as soundfile reads WAV (x / 2**(8 * width - 1))."""
    if width == 1:
        ints = np.frombuffer(data, np.uint8).astype(np.float32) - 128.0
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)).astype(np.float32)
        ints[ints >= 8388608.0] -= 16777216.0  # sign of the 24-bit value
    else:
        ints = np.frombuffer(data, "<i2" if width == 2 else "<i4").astype(np.float32)
    return ints / np.float32(_SCALE[width])
