"""Audio decoding: every container the OpenAI SDK documents, any rate, mono or stereo, to 16 kHz mono."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

import hostile_files as hostile
from canary_server.model import containers
from canary_server.model.audio import DecodeLimits, load_audio, pad_to_min_duration, resample
from canary_server.model.errors import AudioDecodeError, AudioTooCostly


def _tone(rate: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def _soundfile_bytes(wave: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _av_bytes(wave: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave[None, :].astype(np.float32), format="flt", layout="mono")
        frame.rate = rate
        for chunk in (frame, None):
            for packet in stream.encode(chunk):
                out.mux(packet)
    return buf.getvalue()


def _dominant_hz(wave: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.argmax(spectrum) * rate / wave.shape[0])


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", None), ("OGG", "VORBIS"), ("MP3", None)]
)
def test_soundfile_containers_decode_to_16k_mono(fmt, subtype):
    data = _soundfile_bytes(_tone(44100), 44100, fmt, subtype)
    wave = load_audio(data)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.shape[0] - 16000) < 1200  # lossy codecs add encoder delay / padding
    assert _dominant_hz(wave) == pytest.approx(440, abs=2)


@pytest.mark.parametrize(("container", "codec"), [("mp4", "aac"), ("ipod", "aac"), ("webm", "libopus")])
def test_pyav_containers_decode_to_16k_mono(container, codec):
    rate = 48000
    data = _av_bytes(_tone(rate), rate, container, codec)
    wave = load_audio(data)
    assert wave.dtype == np.float32 and abs(wave.shape[0] - 16000) < 1600
    assert _dominant_hz(wave) == pytest.approx(440, abs=2)


def test_stereo_is_downmixed_and_8k_is_upsampled():
    stereo = _tone(8000, channels=2)
    stereo[:, 1] = 0.0  # mean of the channels halves the amplitude
    wave = load_audio(_soundfile_bytes(stereo, 8000, "WAV", "FLOAT"))
    assert wave.shape == (16000,)
    assert np.abs(wave[2000:14000]).max() == pytest.approx(0.15, rel=0.02)


def test_16k_mono_wav_is_read_bit_exactly(tmp_path):
    wave = _tone(16000)
    path = tmp_path / "a.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), wave)
    np.testing.assert_array_equal(resample(wave, 16000), wave)


@pytest.mark.parametrize("data", [b"", b"not audio at all" * 100, b"RIFF\x00\x00\x00\x00WAVEfmt "])
def test_undecodable_bytes_raise_a_clear_error(data):
    with pytest.raises(AudioDecodeError):
        load_audio(data)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AudioDecodeError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_short_arrays_are_padded_like_nemos_in_memory_path_and_files_like_its_file_path():
    x = np.ones(8001, dtype=np.float32)  # odd pad: 7999 samples
    y = pad_to_min_duration(x, 16000)  # arrays: left = pad // 2 (TranscriptionTensorDataset._pad_audio)
    assert y.shape == (16000,)
    assert y[:3999].sum() == 0 and y[3999] == 1 and y[12000 - 1] == 1 and y[12000:].sum() == 0
    z = pad_to_min_duration(x, 16000, from_file=True)  # files: left = ceil(pad / 2) (lhotse rounds half up)
    assert z.shape == (16000,) and z[:4000].sum() == 0 and z[4000] == 1 and z[12000] == 1 and z[12001:].sum() == 0
    assert pad_to_min_duration(np.ones(20000, np.float32), 16000).shape == (20000,)


# ---- only audio is opened (model/containers.py) ----------------------------------------------------------
@pytest.mark.parametrize(("container", "codec"), [("mpeg", "mp2"), ("adts", "aac"), ("mp3", "libmp3lame")])
def test_the_other_listed_containers_decode_too(container, codec):
    rate = 48000 if codec != "libmp3lame" else 44100
    wave = load_audio(_av_bytes(_tone(rate), rate, container, codec))
    assert abs(wave.shape[0] - 16000) < 1600
    assert _dominant_hz(wave) == pytest.approx(440, abs=2)


def test_an_id3_tag_before_the_audio_is_skipped():
    mp3 = _soundfile_bytes(_tone(44100), 44100, "MP3")
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 1, 0]) + b"\0" * 128  # a 128-byte ID3v2.4 tag (syncsafe size)
    assert containers.sniff(tag + mp3) is containers.MP3
    assert _dominant_hz(load_audio(tag + mp3)) == pytest.approx(440, abs=2)


ATTACKS = {
    "ffconcat naming a local file": hostile.ffconcat("memo.wav"),
    "sdp binding a UDP port": hostile.sdp(5004),
    "hls playlist": hostile.hls_playlist("/etc/hostname"),
    "concat: url": hostile.url_upload("concat:memo.wav|memo.wav"),
    "file: url": hostile.url_upload("file:memo.wav"),
    "subfile: url": hostile.url_upload("subfile,,start,0,end,0,,:memo.wav"),
    "an html page": b"<!DOCTYPE html><html><body>hi</body></html>",
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_what_is_not_audio_is_refused_before_any_decoder_opens_it(name, tmp_path, monkeypatch):
    sf.write(tmp_path / "memo.wav", _tone(16000), 16000)  # what the scripts name, where FFmpeg would find it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AudioDecodeError, match="not audio in a supported format; send one of: aac, flac") as err:
        load_audio(ATTACKS[name])
    assert "memo" not in str(err.value)


def test_ffmpeg_is_kept_to_the_sniffed_demuxer_and_no_protocol(tmp_path, monkeypatch):
    """Each of the two FFmpeg options alone stops a script that got past the sniffing: the demuxer whitelist refuses
    the concat demuxer, and the empty protocol list refuses the file it names even where both demuxers are allowed."""
    sf.write(tmp_path / "memo.wav", _tone(16000), 16000)
    monkeypatch.chdir(tmp_path)
    import av

    def read(options: dict[str, str]) -> int:
        with av.open(io.BytesIO(hostile.ffconcat("memo.wav")), format="concat", options=options) as c:
            return sum(frame.samples for frame in c.decode(c.streams.audio[0]))

    assert read({"format_whitelist": "concat,wav"}) == 16000  # what an upload could do without them
    with pytest.raises(av.error.FFmpegError):
        read(containers.av_options(containers.WAV))
    with pytest.raises(av.error.FFmpegError):
        read({"format_whitelist": "concat,wav", "protocol_whitelist": ""})


def test_a_wav_with_0_bits_per_sample_is_a_clear_error_without_ffmpeg_internals():
    with pytest.raises(AudioDecodeError) as err:
        load_audio(hostile.zero_bit_wav())
    message = str(err.value)
    assert message.startswith("could not decode the wav file") and "Errno" not in message and "<none>" not in message


def test_a_codec_off_the_allow_list_is_refused():
    with pytest.raises(AudioDecodeError, match="encoded as 'png'"):
        containers.check_codec("png")
    containers.check_codec("pcm_s24le")


# ---- the decode budget -------------------------------------------------------------------------------
def test_a_flac_claiming_384khz_8_channels_for_an_hour_is_refused_from_its_header():
    limits = DecodeLimits(max_samples=3600 * 96000 * 2)
    with pytest.raises(AudioTooCostly, match="384000 Hz x 8 channel"):
        load_audio(hostile.flac_bomb(), max_seconds=3600, limits=limits)


def test_a_file_of_unknown_length_stops_when_its_decoded_samples_pass_the_budget():
    data = hostile.flac_bomb(real_seconds=1.0, claimed=False)  # 3 M samples, header silent about its length
    with pytest.raises(AudioTooCostly, match="passed the limit of 1e"):
        load_audio(data, limits=DecodeLimits(max_samples=1e6))
    assert load_audio(data, limits=DecodeLimits(max_samples=4e6)).shape == (16000,)


@pytest.mark.parametrize("kind", ["wall_seconds", "cpu_seconds"])
def test_a_decode_past_its_deadline_stops_between_blocks(kind):
    data = _soundfile_bytes(_tone(48000, seconds=20.0), 48000, "FLAC")
    with pytest.raises(AudioTooCostly, match="decoding took more than"):
        load_audio(data, limits=DecodeLimits(**{kind: 1e-9}))
    assert load_audio(data, limits=DecodeLimits(**{kind: 60.0})).shape == (320000,)
