"""Segment and cue times, the same from every front door (issue 12, item 7).

* A model without timestamps (the v1_agg fixture, canary-1b style; and a fake): responses that show times are decoded
  in pieces cut at pauses, at most `cue_seconds` (7 s) long, each one segment / cue with its real start and end.
* A model that advertises timestamps but emits none (the espeak model, never trained with <|timestamp|>): one
  segment per chunk and `words: []`, identically on the server and the command line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from canary_server.cli import main
from canary_server.pipeline.engine import Engine
from canary_server.pipeline.options import PipelineConfig
from canary_server.server.app import create_app
from canary_server.server.settings import Settings
from conftest import ESPEAK_CLIPS, ESPEAK_SERVER_CHUNK_SECONDS, FIXTURES
from server_fakes import SR, FakeCanary, fake_batcher, running_server, wait_ready, wav_bytes

CUE_SECONDS = PipelineConfig().cue_seconds


def _phrases(seconds: float, seed: int = 0) -> np.ndarray:
    """Tone 'phrases' of 1.0-1.6 s with 0.3-0.6 s pauses between them."""
    rng = np.random.default_rng(seed)
    parts, t = [], 0.0
    while t < seconds:
        n, gap = rng.uniform(1.0, 1.6), rng.uniform(0.3, 0.6)
        parts += [0.3 * np.sin(2 * np.pi * 220 * np.arange(int(n * SR)) / SR), np.zeros(int(gap * SR))]
        t += n + gap
    return np.concatenate(parts).astype(np.float32)


def _cues(subtitles: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue of an srt or vtt body."""

    def seconds(ts: str) -> float:
        h, m, s = ts.replace(",", ".").split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    out = []
    for block in subtitles.removeprefix("WEBVTT\n").strip().split("\n\n"):
        lines = block.split("\n")
        if "-->" not in lines[0]:  # srt's cue number
            lines = lines[1:]
        start, end = lines[0].split(" --> ")
        out.append((seconds(start), seconds(end), "\n".join(lines[1:])))
    return out


@pytest.fixture(scope="module")
def fake_url():
    settings = Settings(model="/models/fake-canary-1b", max_audio_seconds=120)
    with running_server(create_app(settings, engine=Engine(lambda: FakeCanary(), batcher=fake_batcher))) as url:
        wait_ready(url)
        yield url


def test_subtitles_of_a_model_without_timestamps_are_pause_cut_cues_of_at_most_7_s(fake_url):
    import httpx

    audio = _phrases(25.0)
    files = {"file": ("talk.wav", wav_bytes(audio), "audio/wav")}
    post = lambda **data: httpx.post(  # noqa: E731
        f"{fake_url}/v1/audio/transcriptions", files=files, data={"model": "whisper-1", **data}, timeout=60
    )
    cues = _cues(post(response_format="srt").text)
    assert len(cues) >= 4 and cues[0][0] == 0 and cues[-1][1] == pytest.approx(len(audio) / SR, abs=1e-3)
    for (_, end, _), (start, _, _) in zip(cues, cues[1:], strict=False):
        assert end == start  # contiguous: every sample in exactly one cue
    assert all(2.0 <= end - start <= CUE_SECONDS for start, end, _ in cues)
    # FakeCanary's text names the length of what it decoded: each cue is one piece decoded on its own
    assert [text for _, _, text in cues] == [f"hello world {end - start:.2f}" for start, end, _ in cues]
    body = post(response_format="verbose_json", **{"timestamp_granularities[]": "segment"}).json()
    assert [(s["start"], s["end"]) for s in body["segments"]] == [(s, e) for s, e, _ in cues]
    assert post(response_format="json").json()["text"] == f"hello world {len(audio) / SR:.2f}"  # decoded whole


def test_the_command_line_gives_the_servers_subtitles_for_a_model_without_timestamps(tmp_path, capsys):
    from canary_server.convert import convert_nemo

    model_dir = convert_nemo(FIXTURES / "v1_agg" / "model.nemo", tmp_path / "canary-1b-like")
    audio = _phrases(20.0, seed=1)
    (tmp_path / "talk.wav").write_bytes(wav_bytes(audio))
    with running_server(create_app(Settings(model=str(model_dir)))) as url:
        wait_ready(url)
        import httpx

        for fmt in ("srt", "vtt"):
            served = httpx.post(
                f"{url}/v1/audio/transcriptions",
                files={"file": ("talk.wav", (tmp_path / "talk.wav").read_bytes(), "audio/wav")},
                data={"model": "whisper-1", "response_format": fmt},
                timeout=60,
            ).text
            assert main(["transcribe", str(tmp_path / "talk.wav"), "--model", str(model_dir), "--format", fmt]) == 0
            assert capsys.readouterr().out == served
    cues = _cues(served)
    assert len(cues) >= 3 and all(end - start <= CUE_SECONDS for start, end, _ in cues)
    assert main(["transcribe", str(tmp_path / "talk.wav"), "--model", str(model_dir), "--format", "verbose_json",
                 "--timestamps"]) == 2  # fmt: skip
    assert "has no word timestamps" in capsys.readouterr().err


def test_a_model_that_emits_no_timestamps_gives_chunk_segments_and_no_words_on_server_and_cli(
    espeak_server, espeak_dir, tmp_path, capsys
):
    import httpx
    import soundfile as sf

    gap = np.zeros(int(1.5 * SR), np.float32)
    clips = [sf.read(ESPEAK_CLIPS / f"clip0{i}.wav", dtype="float32")[0] for i in range(3)]
    long = np.concatenate([clips[0], gap, clips[1], gap, clips[2]])  # > one 8 s chunk
    (tmp_path / "long.wav").write_bytes(wav_bytes(long))
    served = httpx.post(
        f"{espeak_server}/v1/audio/transcriptions",
        files={"file": ("long.wav", (tmp_path / "long.wav").read_bytes(), "audio/wav")},
        data={
            "model": "whisper-1",
            "response_format": "verbose_json",
            "timestamp_granularities[]": ["word", "segment"],
        },
        timeout=60,
    ).json()
    argv = ["transcribe", str(tmp_path / "long.wav"), "--model", str(espeak_dir), "--format", "verbose_json"]
    argv += ["--timestamps", "--chunk-seconds", str(ESPEAK_SERVER_CHUNK_SECONDS)]
    assert main(argv) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli.pop("file") == str(tmp_path / "long.wav")
    assert cli == served
    assert served["words"] == [] and len(served["segments"]) >= 2
    assert served["segments"][-1]["end"] == pytest.approx(len(long) / SR, abs=1e-3)
