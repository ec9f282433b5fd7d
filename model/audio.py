"""Audio decoding: WAV/FLAC/OGG/MP3 through soundfile, other containers (m4a, mp4, webm, mpeg) through PyAV;
downmix to mono and resample to 16 kHz with soxr. Returns float32 numpy arrays."""

from __future__ import annotations

import io
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import soxr

from .errors import AudioDecodeError

SAMPLE_RATE = 16000
MIN_AUDIO_SECONDS = 1.0  # NeMo 3.0.0 transcribe(pad_min_duration=1.0, pad_direction="both")
AudioSource = str | os.PathLike | bytes | bytearray | memoryview | io.IOBase


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a file path or in-memory bytes into mono float32 at `sample_rate`."""
    data = _read_bytes(source)
    if not data:
        raise AudioDecodeError("the audio file is empty")
    try:
        samples, rate = _decode_soundfile(data)
    except Exception:
        try:
            samples, rate = _decode_av(data)
        except Exception as exc:
            raise AudioDecodeError(f"could not decode audio: {_short(exc)}") from None
    return resample(samples, rate, sample_rate)


def resample(samples: np.ndarray, rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(N,) or (N, C) at `rate` -> mono float32 (N',) at `sample_rate`."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioDecodeError(f"expected mono or multichannel audio, got shape {samples.shape}")
    if rate != sample_rate and samples.size:
        samples = soxr.resample(samples, rate, sample_rate, quality="HQ").astype(np.float32)
    if not np.all(np.isfinite(samples)):
        raise AudioDecodeError("audio contains NaN or infinite samples")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _read_bytes(source: AudioSource) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, io.IOBase):
        return source.read()
    path = Path(source)
    if not path.is_file():
        raise AudioDecodeError(f"audio file not found: {path}")
    return path.read_bytes()


def _decode_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, rate


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    chunks: list[np.ndarray] = []
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise AudioDecodeError("no audio stream in the file")
        stream = container.streams.audio[0]
        # Let FFmpeg downmix to mono float; keep the native rate, soxr resamples afterwards.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate or stream.codec_context.rate)
        rate = resampler.rate
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise AudioDecodeError("the file contains no audio samples")
    return np.concatenate(chunks), int(rate)


def _short(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def pad_to_min_duration(samples: np.ndarray, min_samples: int, from_file: bool = False) -> np.ndarray:
    """NeMo 3.0.0 transcribe(): audio shorter than 1 s is zero-padded on both sides to `min_samples`. Arrays
    (TranscriptionTensorDataset._pad_audio) get left = pad // 2; files (lhotse `CutSet.pad(direction="both")`,
    whose sample counts round half up) get left = ceil(pad / 2), right the rest."""
    pad = min_samples - samples.shape[0]
    if pad <= 0:
        return samples
    left = -(-pad // 2) if from_file else pad // 2
    return np.pad(samples, (left, pad - left))


def pad_batch(waves: list[np.ndarray]) -> tuple[mx.array, mx.array]:
    """Right-pad with zeros: (B, L_max) float32 and lengths (B,) int32."""
    longest = max(w.shape[0] for w in waves)
    batch = np.zeros((len(waves), longest), dtype=np.float32)
    for i, w in enumerate(waves):
        batch[i, : w.shape[0]] = w
    return mx.array(batch), mx.array([w.shape[0] for w in waves], dtype=mx.int32)
