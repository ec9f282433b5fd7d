"""pipeline/live.py: raw PCM pieces become exactly what the file decoder makes of the same samples, and the
pipeline's length limit holds while they arrive."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from canary_server.model.audio import load_audio
from canary_server.pipeline.errors import AudioTooLong, InvalidAudio
from canary_server.pipeline.live import LiveAudio


def _wav_and_pcm(frames: np.ndarray, rate: int, subtype: str) -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    sf.write(buf, frames, rate, format="WAV", subtype=subtype)
    wav = buf.getvalue()
    at = wav.index(b"data") + 8  # the RIFF data chunk: its size, then the samples (maybe a pad byte after)
    return wav, wav[at : at + int.from_bytes(wav[at - 4 : at], "little")]


@pytest.mark.parametrize(
    ("rate", "width", "channels", "subtype"),
    [(16000, 2, 1, "PCM_16"), (48000, 2, 2, "PCM_16"), (22050, 1, 1, "PCM_U8"), (44100, 3, 2, "PCM_24"),
     (8000, 4, 1, "PCM_32"), (16000, 3, 3, "PCM_24")],
)  # fmt: skip
def test_pieces_of_any_format_equal_the_file_decoder_on_the_same_samples(rate, width, channels, subtype):
    rng = np.random.default_rng(rate + width)
    frames = (0.3 * rng.standard_normal((int(1.3 * rate), channels))).clip(-1, 1).astype(np.float32)
    wav, pcm = _wav_and_pcm(frames, rate, subtype)
    live = LiveAudio(rate, width, channels, sample_rate=16000, max_seconds=60)
    for i in range(0, len(pcm), 997):  # pieces that end mid-frame
        live.add(pcm[i : i + 997])
    out = live.finish()
    np.testing.assert_array_equal(out, load_audio(wav))
    assert live.seconds == pytest.approx(len(frames) / rate)


def test_the_limit_is_enforced_while_the_audio_arrives():
    live = LiveAudio(16000, 2, 1, sample_rate=16000, max_seconds=1.0)
    live.add(b"\0\0" * 16000)  # exactly the limit
    with pytest.raises(AudioTooLong, match="at most 1 s"):
        live.add(b"\0\0")
    assert live.frames == 16000  # the piece that broke the limit was not kept


@pytest.mark.parametrize(
    ("rate", "width", "channels", "message"),
    [(0, 2, 1, "rate"), (10**7, 2, 1, "rate"), (16000, 5, 1, "width"), (16000, 2, 0, "channels"),
     (16000, 2, 1000, "channels"), ("16000", 2, 1, "rate"), (16000, True, 1, "width")],
)  # fmt: skip
def test_unusable_formats_are_invalid_audio(rate, width, channels, message):
    with pytest.raises(InvalidAudio, match=message):
        LiveAudio(rate, width, channels, sample_rate=16000, max_seconds=60)


def test_nothing_gives_an_empty_array():
    assert LiveAudio(44100, 2, 2, sample_rate=16000, max_seconds=60).finish().shape == (0,)
