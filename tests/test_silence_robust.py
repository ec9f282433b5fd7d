"""The silence-robust espeak test model (tests/fixtures/silence_robust: espeak-tiny-en fine-tuned with NeMo on
speech with silence and noise around and between utterances; NOT a real Canary): we reproduce NeMo's transcripts
of its held-out clips exactly (clips/nemo_transcripts.json: NeMo 3.0.0 transcribe(), greedy, batch_size 4),
including the empty text NeMo gives for silence and for noise alone."""

from __future__ import annotations

import json

import pytest

from canary_server import model
from conftest import SILENCE_ROBUST_CLIPS


@pytest.fixture(scope="module")
def nemo_transcripts() -> dict[str, str]:
    return json.loads((SILENCE_ROBUST_CLIPS / "nemo_transcripts.json").read_text())


@pytest.fixture(scope="module")
def robust(silence_robust_dir):
    return model.load(silence_robust_dir, dtype="float32")


def test_clips_transcribe_exactly_as_nemo_did(robust, nemo_transcripts):
    names = sorted(nemo_transcripts)
    got = robust.generate([str(SILENCE_ROBUST_CLIPS / n) for n in names], source_lang="en", batch_size=4)
    assert {n: g.text for n, g in zip(names, got, strict=True)} == {n: t.strip() for n, t in nemo_transcripts.items()}


def test_silence_and_noise_alone_give_empty_text(robust, nemo_transcripts):
    meta = json.loads((SILENCE_ROBUST_CLIPS / "clips_meta.json").read_text())
    empty = [n for n, m in meta.items() if m["kind"] in ("silence", "noise")]
    assert len(empty) == 2
    for name in empty:
        assert robust.generate(str(SILENCE_ROBUST_CLIPS / name), source_lang="en").text == ""


def test_padded_clips_are_heard_through_their_silence(nemo_transcripts):
    # the reason this model exists: espeak-tiny-en empties a transcript with 0.1 s of silence in front
    transcripts = json.loads((SILENCE_ROBUST_CLIPS / "transcripts.json").read_text())
    padded = [n for n in transcripts if "padded" in n or "concat" in n]
    assert padded and all(nemo_transcripts[n].strip() for n in padded)
