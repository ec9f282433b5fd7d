"""pipeline/vad.py: Silero VAD v6 in numpy against the wheel's ONNX model (tests/fixtures/vad, made by
make_vad_fixture.py with onnxruntime), streamed equals whole, and the speech regions it gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from canary_server.pipeline import vad

FIXTURE = Path(__file__).parent / "fixtures" / "vad"


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, dict]:
    audio, rate = sf.read(FIXTURE / "clip.wav", dtype="float32")
    assert rate == vad.SAMPLE_RATE
    return audio, json.loads((FIXTURE / "onnx_probs.json").read_text())


def test_probabilities_match_silero_onnx(clip: tuple[np.ndarray, dict]) -> None:
    audio, ref = clip
    probs = vad.speech_probabilities(audio)
    assert probs.dtype == np.float32
    assert len(probs) == len(ref["probs"]) == -(-len(audio) // vad.WINDOW)
    np.testing.assert_allclose(probs, ref["probs"], atol=1e-4)


def test_stream_in_uneven_pieces_equals_whole(clip: tuple[np.ndarray, dict]) -> None:
    audio, _ = clip
    audio = audio[: len(audio) - len(audio) % vad.WINDOW]
    stream, got = vad.VadStream(), []
    cuts = [0, 1, 100, 611, 612, 5000, 20000, len(audio)]  # pieces shorter and longer than a window, one empty
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        got.append(stream.feed(audio[a:b]))
    np.testing.assert_allclose(np.concatenate(got), vad.speech_probabilities(audio), atol=1e-6)


def test_speech_region_covers_the_sentence_and_not_the_noise(clip: tuple[np.ndarray, dict]) -> None:
    audio, ref = clip
    regions = vad.speech_regions(vad.speech_probabilities(audio))
    assert len(regions) == 1  # the short gap inside the sentence is bridged; the pink noise after it is not speech
    start, end = regions[0]
    assert ref["speech_start_s"] - 0.1 <= start <= ref["speech_start_s"] + 0.2
    assert ref["speech_end_s"] - 0.6 <= end <= ref["speech_end_s"] + 0.1  # espeak's clip ends in a quiet tail


@pytest.mark.parametrize("kind", ["zeros", "white"])
def test_silence_and_steady_noise_have_no_speech(kind: str) -> None:
    rng = np.random.default_rng(0)
    audio = np.zeros(3 * vad.SAMPLE_RATE, np.float32)
    if kind == "white":
        audio = (rng.standard_normal(len(audio)) * 0.01).astype(np.float32)
    probs = vad.speech_probabilities(audio)
    assert probs.max() < 0.3
    assert vad.speech_regions(probs) == []


def test_speech_regions_hysteresis_bridging_and_minimum() -> None:
    step = vad.WINDOW / vad.SAMPLE_RATE
    probs = np.array([0.1] * 5 + [0.9] * 10 + [0.4] * 3 + [0.2] * 2 + [0.8] * 10 + [0.1] * 20 + [0.9] * 3 + [0.0] * 5)
    regions = vad.speech_regions(probs, min_silence_s=0.1, min_speech_s=0.25, pad_s=0.0)
    # 0.4 stays speech (above 0.5 - 0.15); the 2-window dip (64 ms) is bridged; 3 windows (96 ms) are too short
    assert regions == [(pytest.approx(5 * step), pytest.approx(30 * step))]
    padded = vad.speech_regions(probs[:20], pad_s=1.0)
    assert padded == [(0.0, pytest.approx(20 * step))]  # clamped to the audio
