# isort: skip_file
"""A live stream without a language (detected from its first `live_detect_seconds`) against the same stream with
its language named: seconds from the stream's start to its first delta, and from its end to the final text, on
three clips of the espeak-trained en/de/es/fr model (NOT a real Canary), fed in 0.25 s pieces paced in real time
through `Pipeline.open_stream` with the Realtime door's streaming defaults; 3 runs each.

    .venv/bin/python bench/live_detect_latency.py [--runs 3] [--clips de_00.wav fr_01.wav es_02.wav]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
CLIPS = SHARED / "espeak-tiny-multi-clips"
PIECE = 4000  # 0.25 s at 16 kHz

import canary_server  # noqa: E402, F401, I001  (first: preloads OpenBLAS before MLX)
from canary_server import model as canary  # noqa: E402
from canary_server.convert import convert_nemo  # noqa: E402
from canary_server.model.audio import load_audio  # noqa: E402
from canary_server.model.stream_buffer import StreamingConfig  # noqa: E402
from canary_server.pipeline import Pipeline  # noqa: E402
from canary_server.pipeline.options import PipelineConfig  # noqa: E402

CONFIG = StreamingConfig(1.0, 10.0, 0.5, "alignatt")  # the Realtime door's defaults


async def one(p: Pipeline, language: str | None, clip: str) -> tuple[float | None, float]:
    """(seconds from the start to the first delta, seconds from the end of the audio to the final text)."""
    audio = load_audio(CLIPS / clip)
    job = p.open_stream(p.options(language), CONFIG)
    first: list[float] = []

    async def read() -> float:
        async for u in job.updates():
            if u.delta and not first:
                first.append(time.perf_counter() - t0)
            if u.final:
                break
        return time.perf_counter()

    t0 = time.perf_counter()
    reader = asyncio.create_task(read())
    for i in range(0, len(audio), PIECE):
        job.feed(audio[i : i + PIECE])
        await asyncio.sleep(PIECE / 16000)  # real time
    job.end()
    end = time.perf_counter()
    return (first[0] if first else None), await reader - end


async def run(p: Pipeline, clips: list[str], runs: int) -> None:
    while not p.engine.ready:
        await asyncio.sleep(0.01)
    print("| clip | language | first delta, s | final after the end, s |\n|---|---|---|---|")
    for clip in clips:
        for language in (clip[:2], None):
            res = [await one(p, language, clip) for _ in range(runs)]
            firsts = ", ".join(f"{a:.2f}" if a is not None else "-" for a, _ in res)
            print(f"| {clip} | {language or 'detected'} | {firsts} | {', '.join(f'{b:.3f}' for _, b in res)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clips", nargs="+", default=["de_00.wav", "fr_01.wav", "es_02.wav"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        m = canary.load(convert_nemo(SHARED / "espeak-tiny-multi.nemo", Path(tmp) / "model"), dtype="float32")
    p = Pipeline(lambda: m, PipelineConfig(live_detect_seconds=1.5))
    p.engine.start()
    try:
        asyncio.run(run(p, args.clips, args.runs))
    finally:
        p.engine.close()


if __name__ == "__main__":
    main()
