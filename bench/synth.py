"""Seeded speech-like test audio and its WAV upload (numpy and the standard library only: shared by the bench
scripts and bench/nemo_baseline.py)."""

from __future__ import annotations

import io
import wave

import numpy as np

SR = 16000


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Harmonic 'syllables' (f0 90-220 Hz, 3-6 per second) with noise, and pauses between phrases."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    out = np.zeros(n, np.float32)
    pos = int(rng.uniform(0.05, 0.3) * SR)
    while pos < n:
        if rng.random() < 0.12:  # a pause between phrases (where the long-audio chunker may cut)
            pos += int(rng.uniform(0.25, 0.7) * SR)
            continue
        length = min(int(rng.uniform(0.12, 0.3) * SR), n - pos)
        t = np.arange(length) / SR
        f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        phase = 2 * np.pi * np.cumsum(f0) / SR
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
        noise = rng.standard_normal(length) * rng.uniform(0.02, 0.3)
        env = np.sin(np.pi * np.arange(length) / length) ** 2
        out[pos : pos + length] += (0.25 * env * (voiced * rng.uniform(0.3, 1.0) + noise)).astype(np.float32)
        pos += length + int(rng.uniform(0.01, 0.08) * SR)
    return np.clip(out + rng.standard_normal(n).astype(np.float32) * 0.003, -1, 1)


def wav_bytes(audio: np.ndarray) -> bytes:
    """A 16-bit mono WAV at SR: int16 samples as they are, float samples in [-1, 1] scaled by 32767."""
    pcm = audio if audio.dtype == np.int16 else (audio * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()
