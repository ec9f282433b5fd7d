"""pipeline/live_turns.py: PCM pieces to model-rate audio, and Silero turn detection (start with its prefix
padding, stop after the silence), as the Realtime door's server_vad uses them."""

from __future__ import annotations

import numpy as np
import pytest

from canary_server.model.audio import load_audio
from canary_server.pipeline.errors import InvalidAudio
from canary_server.pipeline.live_turns import LiveTurns, TurnAudio, TurnDetection, TurnStart, TurnStop
from conftest import ESPEAK_CLIPS


def _pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()


def _run(turns: LiveTurns, pcm: bytes, piece: int = 3001) -> list:
    out = []
    for i in range(0, len(pcm), piece):  # odd sizes: samples split across pieces
        out.extend(turns.add(pcm[i : i + piece]))
    return out


def test_without_detection_all_audio_is_the_turn_at_the_model_rate():
    pcm = _pcm(np.sin(np.arange(24000, dtype=np.float32) / 10) * 0.3)
    turns = LiveTurns(24000, None)
    events = _run(turns, pcm) + turns.flush()
    assert all(isinstance(e, TurnAudio) for e in events)
    assert sum(len(e.samples) for e in events) == pytest.approx(16000, abs=2)
    at_16k = LiveTurns(16000, None)
    (same,) = at_16k.add(_pcm(np.full(160, 0.25, np.float32)))
    assert np.allclose(same.samples, 0.25)


def test_detection_starts_with_the_prefix_and_stops_after_the_silence():
    speech = load_audio(ESPEAK_CLIPS / "clip00.wav")
    silence = np.zeros(16000, np.float32)
    pcm = _pcm(np.concatenate([silence, speech, silence]))
    turns = LiveTurns(16000, TurnDetection(0.5, prefix_ms=300, silence_ms=500))
    events = _run(turns, pcm)
    kinds = [type(e) for e in events]
    assert kinds.count(TurnStart) == 1 and kinds.count(TurnStop) == 1
    start, stop = events[kinds.index(TurnStart)], events[kinds.index(TurnStop)]
    assert 600 <= start.ms <= 1000  # speech at 1.0 s, 300 ms of padding before it
    end_of_speech = 1000 + len(speech) * 1000 // 16000
    assert end_of_speech <= stop.ms <= end_of_speech + 1000  # espeak's quiet tail already counts as silence
    fed = sum(
        len(e.samples) for e in events[kinds.index(TurnStart) : kinds.index(TurnStop)] if isinstance(e, TurnAudio)
    )
    assert fed == pytest.approx((stop.ms - start.ms) * 16, abs=512 + 16)
    assert not turns.in_speech


def test_silence_and_quiet_noise_start_no_turn():
    rng = np.random.default_rng(1)
    turns = LiveTurns(24000, TurnDetection())
    assert _run(turns, _pcm(rng.normal(0, 0.002, 24000 * 4).astype(np.float32))) == []


def test_bad_rates_and_settings_are_refused():
    with pytest.raises(InvalidAudio):
        LiveTurns(4000, None)
    for bad in ({"threshold": 1.5}, {"prefix_ms": -1}, {"silence_ms": 0}):
        with pytest.raises(ValueError):
            TurnDetection(**bad)
