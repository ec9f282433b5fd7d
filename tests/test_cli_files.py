"""`canary-server transcribe` with several files (issue 18): a bad file fails alone and is named, text output names
each file, --output-dir never lets one input overwrite another's output, long files show progress, Ctrl-C stops
at once. Real `canary-server` processes where stderr or signals matter; the espeak-trained test model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import canary_server
from canary_server.cli import main
from canary_server.model.errors import CanaryError
from conftest import ESPEAK_CLIPS, log_message

CLI = str(Path(sys.executable).with_name("canary-server"))


def _files(tmp_path: Path) -> dict[str, Path]:
    """Two clips, a text file and a long file (the clips over and over with pauses) in tmp_path."""
    names = {"a.wav": "clip00.wav", "b.wav": "clip01.wav"}
    out = {}
    for name, clip in names.items():
        out[name] = tmp_path / name
        out[name].write_bytes((ESPEAK_CLIPS / clip).read_bytes())
    out["bad.txt"] = tmp_path / "bad.txt"
    out["bad.txt"].write_text("not audio\n")
    return out


def _long_wav(path: Path, seconds: float) -> Path:
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(ESPEAK_CLIPS.glob("clip0*.wav"))]
    pause = np.zeros(8000, np.float32)
    parts, n = [], 0
    while n < seconds * 16000:
        for clip in clips:
            parts += [clip, pause]
            n += len(clip) + len(pause)
    sf.write(path, np.concatenate(parts), 16000, subtype="PCM_16")
    return path


def _cli(args: list[str], tmp_path: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # nothing of the user's cache or settings
    env = {k: v for k, v in env.items() if not k.startswith("CANARY_")}
    return subprocess.Popen(
        [CLI, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if log_message(line) is None]


def test_a_bad_file_is_named_in_one_line_and_the_good_ones_are_still_transcribed(espeak_dir, tmp_path):
    _files(tmp_path)
    proc = _cli(["transcribe", "a.wav", "bad.txt", "b.wav", "--model", str(espeak_dir)], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    errors = _errors(err)
    assert len(errors) == 1 and errors[0].startswith("canary-server: error: bad.txt: the file is not audio"), err
    assert "Traceback" not in err and "never retrieved" not in err
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["a.wav", "b.wav"], out  # text output names each file
    assert all(len(line) > len("a.wav: ") for line in lines)


def test_one_file_prints_its_text_alone(espeak_dir, tmp_path, capsys):
    _files(tmp_path)
    assert main(["transcribe", str(tmp_path / "a.wav"), "--model", str(espeak_dir)]) == 0
    out = capsys.readouterr().out
    assert out.strip() and "a.wav" not in out


def test_output_dir_writes_the_good_files_and_names_the_bad_one(espeak_dir, tmp_path, capsys):
    files = _files(tmp_path)
    argv = ["transcribe", str(files["a.wav"]), str(files["bad.txt"]), str(files["b.wav"])]
    assert main([*argv, "--model", str(espeak_dir), "--output-dir", str(tmp_path / "out")]) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]
    assert f"canary-server: error: {files['bad.txt']}: " in capsys.readouterr().err


def test_two_inputs_that_would_write_the_same_output_are_refused_before_anything_runs(tmp_path, capsys):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.wav").write_bytes((ESPEAK_CLIPS / "clip00.wav").read_bytes())
    x1, x2, out = tmp_path / "one" / "x.wav", tmp_path / "two" / "x.wav", tmp_path / "out"
    # The model is never loaded (it does not even exist): the clash is found first.
    assert main(["transcribe", str(x1), str(x2), "--model", str(tmp_path / "absent"), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"canary-server: error: --output-dir: {x1} and {x2} would both be written to {out / 'x.txt'}; "\
        "rename one, or transcribe them with different --output-dir"  # fmt: skip
    assert not out.exists()


def test_a_long_file_shows_progress_on_stderr_unless_quiet(espeak_dir, tmp_path):
    seconds = sf.info(_long_wav(tmp_path / "long.wav", 60)).duration
    _files(tmp_path)
    args = ["transcribe", "long.wav", "a.wav", "--model", str(espeak_dir), "--chunk-seconds", "8"]
    proc = _cli(args, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    progress = [log_message(line) for line in err.splitlines() if "transcribing" in line]
    assert progress and all(m and m.startswith("transcribing long.wav: ") for m in progress), err
    assert f" s of {seconds:.1f} s (" in progress[0] and "(100%)" in progress[-1], progress
    assert out.startswith("long.wav: ") and "\na.wav: " in out  # progress never goes to stdout
    quiet = _cli([*args, "-q"], tmp_path)
    out, err = quiet.communicate(timeout=300)
    assert quiet.returncode == 0 and err == "" and out.count(".wav: ") == 2


def test_ctrl_c_stops_a_long_transcription_at_once(espeak_dir, tmp_path):
    _long_wav(tmp_path / "long.wav", 1800)
    proc = _cli(["transcribe", "long.wav", "--model", str(espeak_dir), "--chunk-seconds", "8"], tmp_path)
    first = proc.stderr.readline()  # the first piece is decoded: the work is under way
    assert "transcribing long.wav" in first, first
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert took < 5, f"exit {took:.1f} s after SIGINT"
    assert "Traceback" not in err and "never retrieved" not in err and "100%" not in err, err


def test_the_python_api_yields_each_files_error_in_place_and_transcribe_raises_it(espeak_dir, tmp_path):
    files = _files(tmp_path)
    with canary_server.load(espeak_dir) as m:
        each = list(m.transcribe_each([files["a.wav"], files["bad.txt"], files["b.wav"]]))
        assert isinstance(each[1], CanaryError) and "not audio in a supported format" in str(each[1])
        assert [r.text for r in (each[0], each[2])] == [r.text for r in m.transcribe([files["a.wav"], files["b.wav"]])]
        with pytest.raises(CanaryError, match="not audio in a supported format"):
            m.transcribe([files["a.wav"], files["bad.txt"]])
