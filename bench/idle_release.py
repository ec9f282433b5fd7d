"""What handing memory back when idle costs the next request: latency right after another request vs after an idle
pause, with the engine's release after idle off and on.

Runs in process (the Python API, the same pipeline and engine as the server) on a random-weight model with the real
dimensions of canary-180m-flash (`bench/random_model.py 180m-flash`), with the decode length capped at
round(4 x seconds) tokens as bench/serve_capped.py does. Prints medians.

    .venv/bin/python bench/random_model.py 180m-flash --out /tmp/r180
    .venv/bin/python bench/idle_release.py /tmp/r180 [--seconds 30] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from serve_capped import force_decode_length  # imports canary_server first: OpenBLAS before MLX

import canary_server
from synth import speech_like


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--idle", type=float, default=3.0, help="pause before the 'after idle' request")
    ap.add_argument("--release-after", type=float, default=2.0, help="idle_release_seconds of the second row")
    args = ap.parse_args()
    force_decode_length()  # random weights never stop: 4 tokens per second of audio, as bench/run.py
    audio = speech_like(args.seconds, seed=1)
    with canary_server.load(args.model) as m:
        engine = m.pipeline.engine

        def run() -> float:
            began = time.perf_counter()
            m.transcribe(audio)
            return time.perf_counter() - began

        run(), run()  # warm-up
        print(f"\n| {args.seconds:g} s clip | back-to-back | after {args.idle:g} s idle |\n|---|---:|---:|")
        rows = [("memory kept (idle_release_seconds 0)", 0.0)]
        rows.append((f"released after {args.release_after:g} s idle", args.release_after))
        for label, release in rows:
            engine.release_after_idle = release
            warm, cold = [], []
            for _ in range(args.repeats):
                warm.append(run())
                time.sleep(args.idle)
                cold.append(run())
            print(f"| {label} | {statistics.median(warm):.3f} s | {statistics.median(cold):.3f} s |")


if __name__ == "__main__":
    main()
