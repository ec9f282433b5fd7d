"""One pipeline beneath every front door: the CLI, the Python API and the HTTP server give the same transcript of
a long file (cut at pauses into several pieces), in every response format.

The model is the espeak-trained tiny one in ../shared/models (a small Canary-architecture network trained with NeMo
on espeak-ng speech, NOT a real Canary). The file is its 12 held-out clips, four times over with pauses between them:
151 s, cut by the shared server's 8 s chunking into about twenty pieces.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import soundfile as sf

import canary_server
from canary_server.cli import main
from conftest import ESPEAK_CLIPS, ESPEAK_SERVER_CHUNK_SECONDS

SR = 16000


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory, espeak_dir) -> tuple[str, bytes]:
    rng = np.random.default_rng(7)
    pieces = []
    for _ in range(4):
        for i in range(12):
            clip, _ = sf.read(ESPEAK_CLIPS / f"clip{i:02d}.wav", dtype="int16")
            pieces += [clip, np.zeros(int(SR * rng.uniform(0.3, 1.2)), np.int16)]
    audio = np.concatenate(pieces)
    assert len(audio) / SR > 120
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, audio, SR, subtype="PCM_16")
    return str(path), path.read_bytes()


def _server(url: str, data: bytes, **fields) -> httpx.Response:
    form = {"model": "whisper-1", **fields}
    files = {"file": ("long.wav", data, "audio/wav")}
    response = httpx.post(f"{url}/v1/audio/transcriptions", data=form, files=files, timeout=300)
    response.raise_for_status()
    return response


def _cli(capsys, espeak_dir, path: str, *flags: str) -> str:
    argv = ["transcribe", path, "--model", str(espeak_dir), "--chunk-seconds", str(ESPEAK_SERVER_CHUNK_SECONDS)]
    assert main([*argv, *flags]) == 0
    return capsys.readouterr().out


def test_the_cli_gives_exactly_the_servers_text_and_segments_for_a_long_file(
    espeak_server, espeak_dir, long_wav, capsys
):
    path, data = long_wav
    server = _server(espeak_server, data, response_format="verbose_json").json()
    cli = json.loads(_cli(capsys, espeak_dir, path, "--format", "verbose_json"))
    assert cli.pop("file") == path
    assert cli == server
    assert len(server["segments"]) >= 15 and server["duration"] > 120  # really cut into many pieces
    text = _cli(capsys, espeak_dir, path)
    assert text == _server(espeak_server, data, response_format="text").text == server["text"] + "\n"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_the_cli_subtitles_equal_the_servers(espeak_server, espeak_dir, long_wav, capsys, fmt):
    path, data = long_wav
    assert _cli(capsys, espeak_dir, path, "--format", fmt) == _server(espeak_server, data, response_format=fmt).text


def test_word_times_from_the_cli_equal_the_servers(espeak_server, espeak_dir, long_wav, capsys):
    path, data = long_wav
    fields = {"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"]}
    server = _server(espeak_server, data, **fields).json()
    cli = json.loads(_cli(capsys, espeak_dir, path, "--format", "verbose_json", "--timestamps"))
    cli.pop("file")
    assert cli == server and "words" in server


def test_the_python_api_gives_the_servers_transcript(espeak_server, espeak_dir, long_wav):
    path, data = long_wav
    server = _server(espeak_server, data, response_format="verbose_json").json()
    with canary_server.load(espeak_dir, chunk_seconds=ESPEAK_SERVER_CHUNK_SECONDS) as m:
        result = m.transcribe(path)
        from_array = m.transcribe(sf.read(path, dtype="float32")[0])
    assert result.text == server["text"] == from_array.text
    assert [(s.text, round(s.start, 3), round(s.end, 3)) for s in result.segments] == [
        (s["text"], s["start"], s["end"]) for s in server["segments"]
    ]
    assert result.duration == pytest.approx(server["duration"], abs=1e-3)
