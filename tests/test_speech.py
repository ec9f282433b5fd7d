"""One VAD for all (pipeline/speech.py, Silero v6 in numpy): silence and noise alone give empty text on every route
without decoding; long audio is cut in the pauses; OpenAI's `chunking_strategy` sets its parameters.

Real model: the espeak-trained tiny English model (../shared/models, NOT a real Canary). The fake model counts its
calls (nothing decoded). Wyoming's silence and noise: tests/test_wyoming_partials.py.
"""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from canary_server.cli import main
from canary_server.pipeline import Pipeline
from canary_server.pipeline.options import PipelineConfig
from canary_server.pipeline.speech import VadParams, pauses, speech_probabilities, split_at_pauses
from conftest import ESPEAK_CLIPS
from server_fakes import SR, FakeCanary, fake_engine

pytestmark = pytest.mark.vad
RNG = np.random.default_rng(0)
QUIET = {
    "silence": np.zeros(3 * SR, np.float32),
    "white noise": (0.05 * RNG.standard_normal(3 * SR)).astype(np.float32),
    "hum": (0.2 * np.sin(2 * np.pi * 50 * np.arange(3 * SR) / SR)).astype(np.float32),
}


def _wav(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _clip(name: str) -> np.ndarray:
    return sf.read(ESPEAK_CLIPS / name, dtype="float32")[0]


def _joined(names: list[str], pause: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clips with `pause` seconds of silence before each; their (start, end) seconds."""
    parts, spans, pos = [], [], 0
    for name in names:
        audio = _clip(name)
        parts += [np.zeros(int(pause * SR), np.float32), audio]
        spans.append(((pos + int(pause * SR)) / SR, (pos + int(pause * SR) + len(audio)) / SR))
        pos += int(pause * SR) + len(audio)
    return np.concatenate(parts), spans


# ---- the pipeline: no speech, nothing decoded --------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(QUIET))
def test_no_speech_gives_empty_text_without_decoding(kind):
    fake = FakeCanary()
    pipeline = Pipeline(engine=fake_engine(fake))
    pipeline.start()
    try:

        async def both():
            while not pipeline.ready:
                await asyncio.sleep(0.01)
            options = pipeline.options("en")
            result = await pipeline.transcribe(QUIET[kind], options)
            streamed = [e async for e in pipeline.stream(QUIET[kind], options)]
            return result, streamed

        result, streamed = asyncio.run(both())
    finally:
        pipeline.close()
    assert result.text == "" and result.segments == [] and result.duration == 3.0
    assert len(streamed) == 1 and streamed[0].text == ""
    assert fake.calls == []  # the model never saw it


def test_the_vad_setting_off_decodes_everything_as_before():
    fake = FakeCanary()
    pipeline = Pipeline(config=PipelineConfig(vad=False), engine=fake_engine(fake))
    pipeline.start()
    try:

        async def once():
            while not pipeline.ready:
                await asyncio.sleep(0.01)
            return await pipeline.transcribe(QUIET["hum"], pipeline.options("en"))

        assert asyncio.run(once()).text  # the fake's words: it was decoded
    finally:
        pipeline.close()
    assert fake.calls


# ---- cutting long audio ------------------------------------------------------------------------------------
def test_long_audio_is_cut_inside_the_pauses_between_speech():
    audio, spans = _joined(["clip00.wav", "clip01.wav", "clip02.wav", "clip03.wav", "clip06.wav"], pause=0.8)
    probs = speech_probabilities(audio, SR)
    chunks = split_at_pauses(audio, SR, 8.0, probs, VadParams())
    assert len(chunks) >= 3 and all(c.end - c.start <= 8.0 + 1e-6 for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(audio) / SR
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:], strict=False))  # no gap, no overlap
    assert sum(len(c.audio) for c in chunks) == len(audio)
    for c in chunks[1:]:
        assert not any(a < c.start < b for a, b in spans), (c.start, spans)  # never inside a clip
    assert len(pauses(probs, VadParams())) >= 3


def test_audio_up_to_the_chunk_length_is_one_piece():
    audio = _clip("clip00.wav")
    (chunk,) = split_at_pauses(audio, SR, 8.0, speech_probabilities(audio, SR), VadParams())
    assert chunk.start == 0 and len(chunk.audio) == len(audio)


def test_blockwise_probabilities_equal_the_whole_clip():
    from canary_server.pipeline import vad

    audio, _ = _joined(["clip00.wav", "clip01.wav"], pause=0.5)
    audio = np.tile(audio, 4)  # > one 30 s block
    np.testing.assert_allclose(speech_probabilities(audio, SR), vad.speech_probabilities(audio), atol=1e-5)


# ---- HTTP, SSE, chunking_strategy ----------------------------------------------------------------------------
def _post(url: str, audio: np.ndarray, **fields) -> httpx.Response:
    data = {"model": "whisper-1", "language": "en", **fields}
    return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", _wav(audio))}, data=data, timeout=120)


@pytest.mark.parametrize("kind", sorted(QUIET))
def test_http_and_sse_give_empty_text_for_silence_and_noise(espeak_server, kind):
    r = _post(espeak_server, QUIET[kind])
    assert r.status_code == 200 and r.json()["text"] == "", r.text
    r = _post(espeak_server, QUIET[kind], stream="true")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["transcript.text.done"] and events[0]["text"] == ""


@pytest.mark.parametrize(
    "fields",
    [
        {"chunking_strategy": "auto"},
        {"chunking_strategy": json.dumps({"type": "server_vad", "threshold": 0.4, "silence_duration_ms": 300})},
        {"chunking_strategy[type]": "server_vad", "chunking_strategy[prefix_padding_ms]": "100"},
    ],
)
def test_chunking_strategy_is_accepted_and_speech_is_transcribed_as_without_it(espeak_server, fields):
    clip = _clip("clip00.wav")
    plain = _post(espeak_server, clip)
    r = _post(espeak_server, clip, **fields)
    assert r.status_code == 200 and r.json()["text"] == plain.json()["text"] != ""


@pytest.mark.parametrize(
    "value",
    ["manual", '{"type": "semantic_vad"}', '{"type": "server_vad", "threshold": 2}', '{"type": "server_vad", "x": 1}'],
)
def test_a_bad_chunking_strategy_is_a_400_naming_it(espeak_server, value):
    r = _post(espeak_server, _clip("clip00.wav"), chunking_strategy=value)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "chunking_strategy" and error["type"] == "invalid_request_error" and error["message"]


# ---- CLI ------------------------------------------------------------------------------------------------------
def test_cli_prints_empty_text_for_noise(espeak_dir, tmp_path, capsys):
    path = tmp_path / "noise.wav"
    path.write_bytes(_wav(QUIET["white noise"]))
    assert main(["transcribe", str(path), "--model", str(espeak_dir), "--language", "en"]) == 0
    assert capsys.readouterr().out.strip() == ""
