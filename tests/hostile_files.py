"""Hostile audio files for the limit tests: lying headers, absurd rates, huge samples (all small on disk)."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf


def wav_claiming_rate(rate: int, samples: int = 32000) -> bytes:
    """A 16-bit mono WAV of silence whose header says `rate` Hz (1 Hz: 64 KB that 'lasts' 32000 s)."""
    data = np.zeros(samples, np.int16).tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack(
        "<I", len(data)
    ) + data  # fmt: skip


def flac_silence(seconds: float, rate: int = 48000, channels: int = 2, claimed_frames: int | None = None) -> bytes:
    """FLAC of silence; `claimed_frames` rewrites the STREAMINFO total-samples field (0: 'unknown length')."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(seconds * rate), channels), np.int16), rate, format="FLAC")
    data = bytearray(buf.getvalue())
    if claimed_frames is not None:
        # 'fLaC', a 4-byte block header, then STREAMINFO: the total sample count is the low 36 bits of bytes 10..17.
        at = 8 + 10
        value = int.from_bytes(data[at : at + 8], "big") & ~((1 << 36) - 1) | claimed_frames
        data[at : at + 8] = value.to_bytes(8, "big")
    return bytes(data)


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()
