"""Cutting long audio: the energy rule (pipeline/chunking.py) vs the VAD's pauses (pipeline/speech.py).

Long recordings are made of the espeak clips (../shared/models/espeak-tiny-en-clips, with NeMo's transcripts)
joined with pauses of 0.3-1.5 s, optionally in white noise; each is transcribed through the Pipeline (the server's
path) with `chunk_seconds` short enough that many cuts fall in every recording. Reported: word errors against the
joined NeMo transcripts of the clips (a word cut in two or dropped at a cut shows here), the number of cuts that fell
inside a clip (in speech), and the CPU the VAD takes per audio second. Model: the espeak-trained tiny English model
(NOT a real Canary; it fails on silence in front of speech, so pauses left at the start of a piece cost it words).

    .venv/bin/python bench/vad_cut_eval.py [--recordings 6] [--chunk-seconds 8] [--prefix-ms 30,300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from wer import word_errors  # noqa: E402

CLIPS = BENCH.parent.parent / "shared" / "models" / "espeak-tiny-en-clips"
NEMO = CLIPS.parent / "espeak-tiny-en.nemo"
SR = 16000


def recordings(n: int, noise_db: float | None, rng: np.random.Generator):
    """(audio, reference text, speech spans in samples) per recording: 8 clips each, pauses between."""
    names = sorted(json.loads((CLIPS / "nemo_transcripts.json").read_text()))
    refs = json.loads((CLIPS / "nemo_transcripts.json").read_text())
    out = []
    for _ in range(n):
        parts, spans, words, pos = [], [], [], 0
        for name in rng.choice(names, 8, replace=False):
            audio, _ = sf.read(CLIPS / name, dtype="float32")
            pause = np.zeros(int(rng.uniform(0.3, 1.5) * SR), np.float32)
            parts += [pause, audio]
            spans.append((pos + len(pause), pos + len(pause) + len(audio)))
            pos += len(pause) + len(audio)
            words.append(refs[name].strip())
        parts.append(np.zeros(int(0.5 * SR), np.float32))
        audio = np.concatenate(parts)
        if noise_db is not None:
            level = np.sqrt(np.mean(np.concatenate([audio[a:b] for a, b in spans]) ** 2)) / 10 ** (noise_db / 20)
            audio = audio + (level * rng.standard_normal(len(audio))).astype(np.float32)
        out.append((audio, " ".join(words), spans))
    return out


async def run(pipeline, recs, vad_params=None):
    from dataclasses import replace

    errors = words = cuts_in_speech = 0
    for audio, ref, spans in recs:
        options = pipeline.options("en")
        if vad_params is not None:
            options = replace(options, vad=vad_params)
        prepared = await pipeline.prepare(audio, options)
        for c in prepared.chunks[1:]:
            at = round(c.start * SR)
            cuts_in_speech += any(a < at < b for a, b in spans)
        result = await pipeline.transcribe(prepared, options)
        errors += word_errors(ref, result.text)
        words += len(ref.split())
    return errors / words, cuts_in_speech


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recordings", type=int, default=6)
    ap.add_argument("--chunk-seconds", type=float, default=8.0)
    ap.add_argument("--prefix-ms", default="30,300")
    ap.add_argument("--nemo", type=Path, default=NEMO, help="the .nemo model (default: espeak-tiny-en)")
    args = ap.parse_args()
    from canary_server.convert import convert_nemo
    from canary_server.model import load
    from canary_server.pipeline import Pipeline
    from canary_server.pipeline.options import PipelineConfig
    from canary_server.pipeline.speech import VadParams, speech_probabilities

    with tempfile.TemporaryDirectory() as tmp:
        model = load(convert_nemo(args.nemo, Path(tmp) / "m"), dtype="float32")
    print(f"{args.nemo.name}: {args.recordings} recordings of 8 espeak clips each, chunk {args.chunk_seconds:g} s\n")
    print("| audio | cutting | WER | cuts inside a clip |\n|---|---|---|---|")
    for noise in (None, 10.0):
        recs = recordings(args.recordings, noise, np.random.default_rng(0))
        label = "clean" if noise is None else f"white noise {noise:g} dB SNR"
        for use_vad in (False, True):
            pipeline = Pipeline(lambda: model, PipelineConfig(chunk_seconds=args.chunk_seconds, vad=use_vad))
            pipeline.start()
            try:
                while not pipeline.ready:
                    time.sleep(0.01)
                settings = (
                    [None] if not use_vad else [VadParams(prefix_padding_ms=int(p)) for p in args.prefix_ms.split(",")]
                )
                for params in settings:
                    wer, inside = asyncio.run(run(pipeline, recs, params))
                    name = "energy rule" if params is None else f"VAD, prefix {params.prefix_padding_ms} ms"
                    print(f"| {label} | {name} | {wer:.3f} | {inside} |")
            finally:
                pipeline.close()
    audio = recordings(1, None, np.random.default_rng(1))[0][0]
    began = time.process_time()
    speech_probabilities(audio, SR)
    cpu = (time.process_time() - began) / (len(audio) / SR)
    print(f"\nVAD CPU: {cpu * 1000:.1f} ms per audio second (one thread, process_time)")


if __name__ == "__main__":
    main()
