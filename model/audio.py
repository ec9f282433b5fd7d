"""Audio decoding: WAV/FLAC/OGG/MP3 through soundfile, other containers (m4a, mp4, webm, mpeg) through PyAV;
downmix to mono and resample to 16 kHz with soxr. Returns float32 numpy arrays. Only audio is opened: the container
is identified from its magic bytes first (model/containers.py) and the decoders are told that one format.

Decoding streams: blocks are downmixed and resampled as they are read (soxr's streaming resampler gives the same
samples, bit for bit, as resampling the whole file at once), so with `max_seconds` memory stays bounded by that
limit: a file whose header says it is longer is refused before any decoding, and one whose header lies is refused
as soon as more than the limit has been decoded. `DecodeLimits` bounds the work the same way (samples at the file's
own rate x channels, from the header and as decoded) and the time (wall-clock and CPU, checked between blocks)."""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import soxr

from .containers import Container, av_options, check_codec, sniff
from .errors import AudioDecodeError, AudioTooCostly, AudioTooLong, CanaryError

log = logging.getLogger("canary.audio")

SAMPLE_RATE = 16000
MIN_AUDIO_SECONDS = 1.0  # NeMo 3.0.0 transcribe(pad_min_duration=1.0, pad_direction="both")
# Sample rates outside this range are not audio anyone records speech at; a tiny rate in a lying header turns a
# few KB into hours of 16 kHz samples.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000
# Samples beyond the int32 range (float audio is nominally within +-1; some tools write float files at integer
# scale) are refused: far larger values overflow the log-mel features to NaN (about 1e19 in float32).
MAX_SAMPLE_MAGNITUDE = 2.0**31
BLOCK_VALUES = 1 << 18  # samples (frames x channels) decoded per block
UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX frames when the header does not say
AudioSource = str | os.PathLike | bytes | bytearray | memoryview | io.IOBase


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one file may cost (None: no limit). `max_samples` counts samples at the file's own rate
    times its channels (a 384 kHz x 8 channel hour is 11 G of them, minutes of CPU, yet small as FLAC); the
    deadlines count from the start of the decode."""

    max_samples: float | None = None
    wall_seconds: float | None = None
    cpu_seconds: float | None = None  # of the decoding thread (time.thread_time)


def load_audio(
    source: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    limits: DecodeLimits | None = None,
) -> np.ndarray:
    """Decode a file path or in-memory bytes into mono float32 at `sample_rate`.

    `max_seconds`: refuse longer audio (AudioTooLong) from the header or, for a header that lies, as soon as
    decoding passes it; memory then stays within about `max_seconds` of output samples. `limits`: refuse a file
    that implies more work, or stop one that takes longer (AudioTooCostly)."""
    data = _read_bytes(source)
    if not data:
        raise AudioDecodeError("the audio file is empty")
    container = sniff(data)  # before any decoder sees a byte
    limits = limits or DecodeLimits()
    budget = _Budget(limits)
    if container.soundfile:
        try:
            _decode_soundfile(data, out := _Output(sample_rate, max_seconds, budget))
            return out.samples()
        except CanaryError:
            raise  # the file opened: its rate, length or samples are the problem, not the container
        except Exception as exc:
            log.debug("libsndfile could not read the %s upload: %s", container.name, _short(exc))
            budget.values = 0  # FFmpeg starts over; the time already spent still counts
    try:
        _decode_av(data, container, out := _Output(sample_rate, max_seconds, budget))
    except CanaryError:
        raise
    except Exception as exc:
        # FFmpeg's own words name its internals ("[Errno 1094995529] ... '<none>'"): log them, tell the client less.
        log.debug("FFmpeg could not read the %s upload: %s", container.name, _short(exc))
        raise AudioDecodeError(
            f"could not decode the {container.name} file: it is damaged or its audio encoding is not supported"
        ) from None
    return out.samples()


def resample(samples: np.ndarray, rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(N,) or (N, C) at `rate` -> mono float32 (N',) at `sample_rate`."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioDecodeError(f"expected mono or multichannel audio, got shape {samples.shape}")
    if rate != sample_rate and samples.size:
        samples = soxr.resample(samples, rate, sample_rate, quality="HQ").astype(np.float32)
    check_samples(samples)
    return np.ascontiguousarray(samples, dtype=np.float32)


def check_samples(samples: np.ndarray) -> None:
    """Refuse NaN, infinite or absurdly large samples (they would reach the features as NaN)."""
    if samples.size == 0:
        return
    if not np.isfinite(samples).all():
        raise AudioDecodeError("audio contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise AudioDecodeError(
            f"audio samples reach {peak:.3g}; float audio must stay within +-{MAX_SAMPLE_MAGNITUDE:.0f} (nominally +-1)"
        )


def check_sample_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(
            f"the file says its sample rate is {rate} Hz; supported: {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )


@dataclass
class _Budget:
    """`DecodeLimits` being spent: samples decoded so far and the time since the decode began."""

    limits: DecodeLimits
    values: int = 0
    _wall: float = field(default_factory=time.monotonic)
    _cpu: float = field(default_factory=time.thread_time)

    def check_header(self, rate: int, channels: int, seconds: float | None) -> None:
        most = self.limits.max_samples
        if most is not None and seconds is not None and rate * channels * seconds > most:
            raise AudioTooCostly.samples(rate, channels, seconds, most)

    def spend(self, values: int) -> None:
        """Count decoded samples (frames x channels); stop a decode past any limit."""
        self.values += values
        limits = self.limits
        if limits.max_samples is not None and self.values > limits.max_samples:
            raise AudioTooCostly(f"decoding passed the limit of {limits.max_samples:.3g} samples (rate x channels)")
        if limits.wall_seconds is not None and time.monotonic() - self._wall > limits.wall_seconds:
            raise AudioTooCostly(f"decoding took more than {limits.wall_seconds:g} s")
        if limits.cpu_seconds is not None and time.thread_time() - self._cpu > limits.cpu_seconds:
            raise AudioTooCostly(f"decoding took more than {limits.cpu_seconds:g} s of CPU")


@dataclass
class _Output:
    """Mono blocks at the native rate in, resampled samples out, counted against the limit as they arrive."""

    sample_rate: int
    max_seconds: float | None
    budget: _Budget = field(default_factory=lambda: _Budget(DecodeLimits()))
    rate: int = 0
    _buf: np.ndarray | None = None
    _n: int = 0
    _stream: soxr.ResampleStream | None = None

    def start(self, rate: int, header_seconds: float | None, channels: int = 1) -> None:
        """The native rate, and the duration the header claims (None: it does not say)."""
        check_sample_rate(rate)
        if self.max_seconds is not None and header_seconds is not None and header_seconds > self.max_seconds:
            raise AudioTooLong(header_seconds, self.max_seconds)
        self.budget.check_header(rate, channels, header_seconds)
        self.rate = rate
        if rate != self.sample_rate:
            self._stream = soxr.ResampleStream(rate, self.sample_rate, 1, dtype="float32", quality="HQ")
        expected = (header_seconds or 0.0) * self.sample_rate + self.sample_rate  # grows if the header is short
        self._buf = np.empty(int(min(expected, self._limit() + 1)), dtype=np.float32)

    def _limit(self) -> float:
        return np.inf if self.max_seconds is None else self.max_seconds * self.sample_rate

    def add(self, mono: np.ndarray, last: bool = False) -> None:
        block = mono if self._stream is None else self._stream.resample_chunk(mono, last=last)
        check_samples(block)
        end = self._n + block.shape[0]
        if end > self._limit():
            raise AudioTooLong(end / self.sample_rate, self.max_seconds, at_least=True)
        if end > self._buf.shape[0]:
            grown = np.empty(int(min(max(end, 2 * self._buf.shape[0]), self._limit() + 1)), dtype=np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : end] = block
        self._n = end

    def finish(self) -> None:
        if self._stream is not None:
            self.add(np.zeros(0, dtype=np.float32), last=True)

    def samples(self) -> np.ndarray:
        if self._buf is None:
            return np.zeros(0, dtype=np.float32)
        if self._n < self._buf.shape[0] // 2:  # a header that overstated the length: don't keep the slack
            return self._buf[: self._n].copy()
        return self._buf[: self._n]


def _read_bytes(source: AudioSource) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, io.IOBase):
        return source.read()
    path = Path(source)
    if not path.is_file():
        raise AudioDecodeError(f"audio file not found: {path}")
    return path.read_bytes()


def _decode_soundfile(data: bytes, out: _Output) -> None:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        channels = f.channels
        known = f.samplerate > 0 and 0 <= f.frames < UNKNOWN_FRAMES  # e.g. a FLAC streamed out has no length
        out.start(f.samplerate, f.frames / f.samplerate if known else None, channels)
        # Not `f.blocks()`: it trusts the header's frame count and pads short reads of a truncated file (an MP3
        # cut short) with whatever its buffer held. Reads here stop at the data that is really there. The seek is
        # sf.read's: libsndfile's MP3 decoder gives (slightly) different samples without it, and also when the
        # file is read in several calls, so an MP3 is read in one call of its header's length (checked against
        # the limit above), as sf.read does; only data past that length comes in blocks.
        f.seek(0)
        size = max(1, BLOCK_VALUES // channels)
        first = f.frames if known and f.frames > 0 and f.format == "MP3" else size
        block = f.read(first, dtype="float32", always_2d=True)
        while block.shape[0]:
            out.budget.spend(block.size)
            out.add(block.mean(axis=1, dtype=np.float32))  # per frame: as resample() downmixes a whole file
            del block
            block = f.read(size, dtype="float32", always_2d=True)
        out.finish()


def _decode_av(data: bytes, kind: Container, out: _Output) -> None:
    import av

    # The one demuxer `sniff` named, no protocols (the input is memory): nothing to probe, nothing else to open.
    with av.open(io.BytesIO(data), mode="r", format=kind.demuxer, options=av_options(kind)) as container:
        if not container.streams.audio:
            raise AudioDecodeError(f"the {kind.name} file has no audio stream")
        stream = container.streams.audio[0]
        check_codec(stream.codec_context.codec.canonical_name)
        rate = stream.rate or stream.codec_context.rate
        channels = max(1, stream.codec_context.channels)
        out.start(rate, _av_duration(container, stream), channels)
        # Let FFmpeg downmix to mono float; keep the native rate, soxr resamples afterwards.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in container.decode(stream):
            out.budget.spend(frame.samples * channels)
            for block in resampler.resample(frame):
                out.add(block.to_ndarray().reshape(-1))
        for block in resampler.resample(None):
            out.add(block.to_ndarray().reshape(-1))
        out.finish()
    if out._n == 0:
        raise AudioDecodeError("the file contains no audio samples")


def _av_duration(container, stream) -> float | None:
    """Seconds the container or stream header claims, if it says."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


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
