# isort: skip_file
"""How much audio a live stream should hold before detecting its language (`live_detect_seconds`): the language-ID
slot's accuracy on the first N seconds of each of the 12 clips of the espeak-trained en/de/es/fr model in
../shared/models (NOT a real Canary), exactly as the engine detects a live stream (pipeline/live_stream.py:
`detect_language`: the held audio, padded to NeMo's 1 s minimum, one encoder pass, then the slot).

    .venv/bin/python bench/live_detect_seconds.py

Prints a Markdown table: seconds held, clips right, and the clips that were wrong.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
CLIPS = SHARED / "espeak-tiny-multi-clips"
SECONDS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, None)  # None: the whole clip

import canary_server  # noqa: E402, F401, I001  (first: preloads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from canary_server import model as canary  # noqa: E402
from canary_server.convert import convert_nemo  # noqa: E402
from canary_server.model.audio import MIN_AUDIO_SECONDS, load_audio, pad_to_min_duration  # noqa: E402


def detect(m, audio: np.ndarray) -> str:
    wave = pad_to_min_duration(audio, int(MIN_AUDIO_SECONDS * m.sample_rate))
    enc, lens = m.encode(mx.array(wave)[None], mx.array([wave.shape[0]]))
    lps = np.array(m.language_log_probs(enc, lens))[0]
    return m.languages[int(lps.argmax())]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says what it is
    with tempfile.TemporaryDirectory() as tmp:
        m = canary.load(convert_nemo(SHARED / "espeak-tiny-multi.nemo", Path(tmp) / "model"), dtype="float32")
    names = sorted(json.loads((CLIPS / "nemo_transcripts.json").read_text()))
    clips = {name: load_audio(CLIPS / name) for name in names}
    print("| seconds held | right (of 12) | wrong |\n|---|---|---|")
    for s in SECONDS:
        wrong = []
        for name, audio in clips.items():
            got = detect(m, audio if s is None else audio[: int(s * m.sample_rate)])
            if got != name[:2]:
                wrong.append(f"{name}->{got}")
        print(f"| {s or 'whole'} | {len(clips) - len(wrong)} | {', '.join(wrong)} |")


if __name__ == "__main__":
    main()
