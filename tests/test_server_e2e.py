"""End to end: the real `openai` SDK against the server running a real converted model.

The model is the espeak-trained tiny one in ../shared/models: a small Canary-architecture network (canary2 prompt,
English only) trained with NeMo on espeak-ng speech. It is NOT a real Canary checkpoint; its transcripts are
imperfect, so the server's text is compared with NeMo's own transcripts of the same clips (nemo_transcripts.json).
"""

from __future__ import annotations

import asyncio
import difflib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import openai
import pytest
import soundfile as sf
import soxr
from openai import AsyncOpenAI

from conftest import ESPEAK_SERVER_CHUNK_SECONDS
from server_fakes import wav_bytes

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "models" / "espeak-tiny-en-clips"


@pytest.fixture(scope="module")
def nemo_text() -> dict[str, str]:
    if not (CLIPS / "nemo_transcripts.json").is_file():
        pytest.skip(f"the espeak test clips are not at {CLIPS}")
    return {k: v.strip() for k, v in json.loads((CLIPS / "nemo_transcripts.json").read_text()).items()}


def clip_file(name: str) -> tuple[str, bytes, str]:
    return (name, (CLIPS / name).read_bytes(), "audio/wav")


def av_encode(audio: np.ndarray, sr: int, container: str, codec: str, rate: int) -> bytes:
    audio = soxr.resample(audio, sr, rate).astype(np.float32) if rate != sr else audio
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def sf_encode(audio: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_json_text_matches_nemo_for_every_clip(espeak_client, nemo_text):
    for name, expected in nemo_text.items():
        assert espeak_client.audio.transcriptions.create(model="whisper-1", file=clip_file(name)).text == expected


def test_every_response_format_carries_the_nemo_text(espeak_client, nemo_text):
    expected, file = nemo_text["clip00.wav"], clip_file("clip00.wav")
    create = espeak_client.audio.transcriptions.create
    assert create(model="whisper-1", file=file, response_format="text") == expected + "\n"
    assert create(model="whisper-1", file=file, response_format="srt") == (
        f"1\n00:00:00,000 --> 00:00:04,789\n{expected}\n"
    )
    assert create(model="whisper-1", file=file, response_format="vtt") == (
        f"WEBVTT\n\n00:00:00.000 --> 00:00:04.789\n{expected}\n"
    )
    verbose = create(model="whisper-1", file=file, response_format="verbose_json")
    assert verbose.text == expected and verbose.language == "english"
    assert verbose.duration == pytest.approx(4.789, abs=1e-3) and len(verbose.segments) == 1
    assert verbose.segments[0].tokens and verbose.segments[0].text == expected
    events = list(create(model="whisper-1", file=file, stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == expected


def test_translation_endpoint_to_english(espeak_client, nemo_text):
    res = espeak_client.audio.translations.create(model="whisper-1", file=clip_file("clip03.wav"))
    assert res.text == nemo_text["clip03.wav"]
    verbose = espeak_client.audio.translations.create(
        model="whisper-1", file=clip_file("clip03.wav"), response_format="verbose_json"
    )
    assert verbose.text == nemo_text["clip03.wav"] and verbose.language == "english"


def test_prompt_is_used_as_decoder_context_without_error(espeak_client):
    res = espeak_client.audio.transcriptions.create(model="whisper-1", file=clip_file("clip03.wav"), prompt="moon")
    assert isinstance(res.text, str)


def test_languages_the_model_lacks_are_400_naming_english(espeak_client):
    with pytest.raises(openai.BadRequestError) as e:
        espeak_client.audio.transcriptions.create(model="whisper-1", file=clip_file("clip03.wav"), language="de")
    assert "supports: en" in e.value.response.json()["error"]["message"]


def test_containers_and_sample_rates_decode_to_the_same_text(espeak_client, nemo_text):
    audio, sr = sf.read(CLIPS / "clip00.wav", dtype="float32")
    files = {
        "clip.flac": sf_encode(audio, sr, "FLAC"),
        "clip.ogg": sf_encode(audio, sr, "OGG", "VORBIS"),
        "clip.mp3": sf_encode(audio, sr, "MP3"),
        "clip.mp4": av_encode(audio, sr, "mp4", "aac", 44100),
        "clip.webm": av_encode(audio, sr, "webm", "libopus", 48000),
        "clip-44k.wav": sf_encode(soxr.resample(audio, sr, 44100), 44100, "WAV"),
        "clip-48k.wav": sf_encode(soxr.resample(audio, sr, 48000), 48000, "WAV"),
        "clip-stereo.wav": sf_encode(np.stack([audio, audio], axis=1), sr, "WAV"),
    }
    for name, data in files.items():
        res = espeak_client.audio.transcriptions.create(model="whisper-1", file=(name, data))
        assert res.text == nemo_text["clip00.wav"], name


def test_lossy_m4a_and_8khz_audio_are_accepted_and_mostly_right(espeak_client, nemo_text):
    """AAC at 16 kHz and 8 kHz telephone audio change this brittle toy model's output a little."""
    audio, sr = sf.read(CLIPS / "clip00.wav", dtype="float32")
    files = {
        "clip.m4a": av_encode(audio, sr, "ipod", "aac", 16000),
        "clip-8k.wav": sf_encode(soxr.resample(audio, sr, 8000), 8000, "WAV"),
    }
    for name, data in files.items():
        text = espeak_client.audio.transcriptions.create(model="whisper-1", file=(name, data)).text
        assert difflib.SequenceMatcher(None, text.split(), nemo_text["clip00.wav"].split()).ratio() > 0.5, name


def test_long_audio_is_split_at_pauses_and_every_piece_is_decoded(espeak_client, nemo_text):
    names = ["clip00.wav", "clip01.wav", "clip02.wav", "clip03.wav"]
    gap = np.zeros(int(1.5 * 16000), np.float32)
    parts, onsets, t = [], [], 0.0
    for name in names:
        audio, _ = sf.read(CLIPS / name, dtype="float32")
        onsets.append(t + np.flatnonzero(audio)[0] / 16000)  # where its speech starts
        parts += [audio, gap]
        t += (len(audio) + len(gap)) / 16000
    long = np.concatenate(parts[:-1])  # 22 s with pauses; the window is 8 s
    res = espeak_client.audio.transcriptions.create(
        model="whisper-1", file=("long.wav", wav_bytes(long)), response_format="verbose_json"
    )
    segs = res.segments
    assert len(segs) == 4 and segs[0].start == 0 and segs[-1].end == pytest.approx(len(long) / 16000, abs=1e-3)
    for seg, nxt, onset in zip(segs, segs[1:], onsets[1:], strict=False):
        assert seg.end == nxt.start and onset - 0.2 < seg.end <= onset  # cut in the pause, before the speech
    assert all(s.end - s.start <= ESPEAK_SERVER_CHUNK_SECONDS for s in segs)
    assert segs[0].text == nemo_text["clip00.wav"]
    for seg, name in zip(segs, names, strict=True):  # the toy model is sensitive to the leading pause
        assert difflib.SequenceMatcher(None, seg.text.split(), nemo_text[name].split()).ratio() > 0.8
    assert res.text == " ".join(s.text for s in segs)
    srt = espeak_client.audio.transcriptions.create(
        model="whisper-1", file=("long.wav", wav_bytes(long)), response_format="srt"
    )
    assert srt.count(" --> ") == 4 and srt.startswith("1\n00:00:00,000 --> 00:00:0")


def test_concurrent_async_requests_each_get_their_own_text(espeak_server, nemo_text):
    names = sorted(nemo_text)

    async def main():
        async with AsyncOpenAI(base_url=f"{espeak_server}/v1", api_key="unused", max_retries=0) as c:
            calls = [c.audio.transcriptions.create(model="whisper-1", file=clip_file(n)) for n in names]
            return await asyncio.gather(*calls)

    assert [r.text for r in asyncio.run(main())] == [nemo_text[n] for n in names]


def test_concurrent_sync_clients_in_threads_each_get_their_own_text(espeak_client, nemo_text):
    names = sorted(nemo_text) * 2
    with ThreadPoolExecutor(8) as pool:
        texts = list(
            pool.map(
                lambda n: espeak_client.audio.transcriptions.create(model="whisper-1", file=clip_file(n)).text, names
            )
        )
    assert texts == [nemo_text[n] for n in names]


def test_models_list_names_the_converted_model_and_aliases(espeak_client, espeak_dir):
    ids = [m.id for m in espeak_client.models.list()]
    assert ids[0] == espeak_dir.name and "whisper-1" in ids


def test_the_model_list_says_what_the_loaded_model_is_and_how_it_decodes(espeak_client):
    card = espeak_client.models.retrieve("whisper-1")
    extra = card.model_extra
    assert extra["languages"] == ["en"] and extra["decoding"] == "greedy"
    assert extra["family"] == "flash-style" and extra["timestamps"] == "tokens"
