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


def zero_bit_wav(samples: int = 16000) -> bytes:
    """A WAV whose header says 0 bits per sample (it used to answer with FFmpeg's internals)."""
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, 16000, 0, 0, 0)
    data = b"\0" * samples
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack(
        "<I", len(data)
    ) + data  # fmt: skip


def ffconcat(path: str) -> bytes:
    """An FFmpeg concat script naming a local file: probed, FFmpeg opened and decoded that file."""
    return f"ffconcat version 1.0\nfile '{path}'\n".encode()


def sdp(port: int) -> bytes:
    """A session description: probed, FFmpeg bound UDP `port` (and leaked the socket when port + 1 was taken)."""
    return (
        "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


def hls_playlist(path: str) -> bytes:
    """An HLS playlist whose one segment is a local file."""
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{path}\n#EXT-X-ENDLIST\n".encode()


def url_upload(url: str) -> bytes:
    """An upload whose bytes are a URL (`concat:`, `file:`, `subfile:`): it must stay bytes, never be opened."""
    return url.encode()


def flac_bomb(claimed_seconds: float = 3500.0, real_seconds: float = 0.05, claimed: bool = True) -> bytes:
    """384 kHz x 8 channels: the issue's 12 MB FLAC claimed 3500 s of it (236 s of CPU to decode). Here a short
    real file whose header claims `claimed_seconds` (or, `claimed=False`, says 'unknown length')."""
    rate = 384_000
    frames = int(claimed_seconds * rate) if claimed else 0
    return flac_silence(real_seconds, rate=rate, channels=8, claimed_frames=frames)
