"""End to end on the espeak-trained tiny model in ../shared/models.

That model is a small Canary-architecture network trained with NeMo on espeak-ng English speech; it is NOT a
real Canary checkpoint and its transcripts are imperfect. What matters is that we reproduce NeMo's own output
for its held-out clips (nemo_transcripts.json: NeMo 3.0.0 transcribe(), greedy, batch_size 4) exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from canary_server.cli import main
from conftest import ESPEAK_CLIPS, ESPEAK_NEMO


def test_cli_transcribes_the_nemo_file_exactly_as_nemo_did(tmp_path, capsys, espeak_nemo_transcripts):
    names = sorted(espeak_nemo_transcripts)
    argv = ["transcribe", *[str(ESPEAK_CLIPS / n) for n in names], "--model", str(ESPEAK_NEMO)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--format", "json", "--batch-size", "4", "--language", "en"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [str(ESPEAK_CLIPS / n) for n in names]
    got = {n: line["text"] for n, line in zip(names, lines, strict=True)}
    assert got == {n: t.strip() for n, t in espeak_nemo_transcripts.items()}


def test_cli_reuses_the_converted_cache_on_the_second_run(tmp_path, capsys):
    argv = ["transcribe", str(ESPEAK_CLIPS / "clip03.wav"), "--model", str(ESPEAK_NEMO), "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    converted = [p for p in tmp_path.iterdir() if (p / "config.json").is_file()]
    assert len(converted) == 1
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.splitlines() == ["moon thought student only work got milk"] * 2


def test_cli_rejects_an_unsupported_language_listing_the_supported_ones(espeak_dir, capsys):
    argv = ["transcribe", str(ESPEAK_CLIPS / "clip03.wav"), "--model", str(espeak_dir), "--language", "de"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unsupported source language 'de'" in err and "supports: en" in err


def test_cli_text_format_prints_one_named_line_per_file_from_the_console_script(espeak_dir, espeak_nemo_transcripts):
    clips = ["clip07.wav", "clip09.wav"]
    script = [sys.executable, "-m", "canary_server", "transcribe", "--model", str(espeak_dir)]
    out = subprocess.run(
        script + [str(ESPEAK_CLIPS / c) for c in clips], check=True, capture_output=True, text=True
    ).stdout
    assert out.splitlines() == [f"{ESPEAK_CLIPS / c}: {espeak_nemo_transcripts[c].strip()}" for c in clips]


def test_arrays_and_paths_give_the_same_text(espeak_model, espeak_nemo_transcripts):
    import soundfile as sf

    name = "clip01.wav"
    wave, rate = sf.read(ESPEAK_CLIPS / name, dtype="float32")
    assert rate == 16000
    from_array = espeak_model.generate(wave, source_lang="en")
    from_path = espeak_model.generate(str(ESPEAK_CLIPS / name), source_lang="en")
    assert from_array.text == from_path.text == espeak_nemo_transcripts[name].strip()
    assert from_array.raw_text == espeak_nemo_transcripts[name]
    assert from_array.duration == pytest.approx(wave.shape[0] / 16000)


def test_batch_of_clips_equals_the_clips_one_by_one(espeak_model):
    names = ["clip00.wav", "clip04.wav", "clip08.wav", "clip11.wav"]
    paths = [str(ESPEAK_CLIPS / n) for n in names]
    batched = espeak_model.generate(paths, source_lang="en", batch_size=4)
    single = [espeak_model.generate(p, source_lang="en") for p in paths]
    assert [b.tokens for b in batched] == [s.tokens for s in single]


def test_audio_shorter_than_one_second_is_padded_like_nemo(espeak_model):
    import soundfile as sf

    wave, _ = sf.read(ESPEAK_CLIPS / "clip08.wav", dtype="float32")
    short = wave[:12000]  # 0.75 s
    manual = np.pad(short, (2000, 2000))  # NeMo pads to 1 s, left = pad // 2
    assert espeak_model.generate(short, source_lang="en").tokens == espeak_model.generate(manual).tokens


def test_cli_beam_search_and_timestamps_flags(espeak_dir, espeak_model, capsys):
    clip = str(ESPEAK_CLIPS / "clip06.wav")
    argv = [
        "transcribe",
        clip,
        "--model",
        str(espeak_dir),
        "--beam-size",
        "3",
        "--format",
        "verbose_json",
        "--timestamps",
    ]
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out)
    # This model was never trained with <|timestamp|>: it emits no timestamp tokens, so no words are invented.
    assert line["text"] == espeak_model.generate(clip, beam_size=3, timestamps=True).text
    assert line["words"] == [] and isinstance(line["segments"], list)
