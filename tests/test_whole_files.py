"""Whole files, as NeMo takes them: by default audio up to 40 s is decoded in one piece (NeMo's transcribe() decodes a
file whole; the Canary models are trained on up to 40 s), longer audio is cut at pauses into pieces of at most 40 s
(NeMo's chunked inference uses 40 s). The same default at every front door."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import canary_server
from canary_server.cli import build_parser
from canary_server.pipeline.engine import Engine
from canary_server.pipeline.options import PipelineConfig
from canary_server.server.app import create_app
from canary_server.server.settings import Settings
from conftest import ESPEAK_CLIPS
from server_fakes import FakeCanary, fake_batcher, running_server, tone, wait_ready, wav_bytes


def test_forty_seconds_is_the_default_of_the_settings_the_pipeline_and_the_command_line(tmp_path):
    cli = build_parser().parse_args(["transcribe", "a.wav", "--model", str(tmp_path)])
    assert Settings(model="x").chunk_seconds == PipelineConfig().chunk_seconds == cli.chunk_seconds == 40.0


@pytest.fixture(scope="module")
def fake_url():
    """The fake model says how many seconds each piece it decoded was ("hello world 35.00")."""
    fake = FakeCanary()
    app = create_app(
        Settings(model="/models/fake-canary", default_language="en"),
        engine=Engine(lambda: fake, batcher=fake_batcher, batch_size=4),
    )
    with running_server(app) as url:
        wait_ready(url)
        yield url


def _pieces(url: str, seconds: float) -> list[float]:
    import httpx

    files = {"file": ("a.wav", wav_bytes(tone(seconds)), "audio/wav")}
    text = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files, timeout=60).json()
    return [float(x) for x in text["text"].split() if x[0].isdigit()]


def test_a_35_s_file_is_decoded_whole_and_a_100_s_one_in_pieces_of_at_most_40_s(fake_url):
    assert _pieces(fake_url, 35.0) == [35.0]
    assert _pieces(fake_url, 40.0) == [40.0]
    pieces = _pieces(fake_url, 100.0)
    assert len(pieces) == 3 and max(pieces) <= 40.0 and sum(pieces) == pytest.approx(100.0, abs=0.01)


@pytest.fixture(scope="module")
def file_35s(espeak_dir, tmp_path_factory):
    """English espeak clips joined by short pauses into one file of 35 s or more (never over 40 s)."""
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(ESPEAK_CLIPS.glob("clip*.wav"))]
    gap = np.zeros(4000, np.float32)  # 0.25 s
    audio = np.zeros(0, np.float32)
    for clip in clips * 3:
        if len(audio) >= 35 * 16000:
            break
        audio = np.concatenate([audio, clip, gap])
    assert 35 * 16000 <= len(audio) <= 40 * 16000
    path = tmp_path_factory.mktemp("long") / "35s.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")
    return path


def test_the_command_line_and_the_python_api_decode_a_35_s_file_as_nemos_whole_file_path(
    espeak_dir, espeak_model, file_35s, capsys
):
    from canary_server.cli import main

    whole = espeak_model.generate(str(file_35s), source_lang="en")  # NeMo's transcribe(), the parity reference
    assert main(["transcribe", str(file_35s), "--model", str(espeak_dir), "--format", "verbose_json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["text"] == whole.text and len(body["segments"]) == 1
    assert body["segments"][0]["tokens"] == whole.tokens
    with canary_server.load(espeak_dir, dtype="float32") as m:
        assert m.transcribe(str(file_35s)).text == whole.text
