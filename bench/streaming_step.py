# isort: skip_file
"""Per-chunk cost of streaming decoding (model/streaming.py): wall time of one `StreamingDecoder.step` that feeds
every stream its next chunk, at 1 / 4 / 16 concurrent streams, once the window is full (left + chunk + right).

The model: a random-weight model with real dimensions (bench/random_model.py; its head never emits <|endoftext|>,
so alignatt commits up to its per-chunk budget every step: an upper bound on decoder work), or a converted model
directory. Audio: seeded noise-like synthetic speech stand-in (the cost does not depend on the words).

    .venv/bin/python bench/streaming_step.py --model 180m-flash [--streams 1 4 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from canary_server import model  # noqa: F401  (loads OpenBLAS before MLX)
import numpy as np  # noqa: E402
from canary_server.model.stream_buffer import StreamingConfig  # noqa: E402
from canary_server.model.streaming import StreamingDecoder  # noqa: E402


def load(name: str):
    if Path(name).is_dir():
        return model.load(name)
    import random_model  # bench/random_model.py

    return model.load(random_model.build(name, random_model.DEFAULT_ROOT / name))


def run(m, n_streams: int, cfg: StreamingConfig, steps: int, prompt: list[int]) -> list[float]:
    dec = StreamingDecoder(m, cfg)
    rng = np.random.default_rng(0)
    window_steps = int(np.ceil((cfg.left_context_secs + cfg.chunk_secs) / cfg.chunk_secs))
    seconds = cfg.chunk_secs * (window_steps + steps) + cfg.right_context_secs
    streams = []
    for _ in range(n_streams):
        s = dec.open(prompt)
        s.append((0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32))
        streams.append(s)
    times = []
    for i in range(window_steps + steps):
        t0 = time.perf_counter()
        dec.step(streams)
        if i >= window_steps:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="180m-flash")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--policy", default="alignatt")
    ap.add_argument("--chunk", type=float, default=1.0)
    ap.add_argument("--left", type=float, default=10.0)
    ap.add_argument("--right", type=float, default=0.5)
    args = ap.parse_args()
    m = load(args.model)
    # random weights repeat themselves: without the detector every stream keeps decoding (the worst case)
    cfg = StreamingConfig(args.chunk, args.left, args.right, args.policy, hallucinations_detector=False)
    from canary_server.model.prompt import PromptSpec

    prompt = m.prompt_ids(PromptSpec("en", "en", pnc=True))
    print(f"model {args.model}, {cfg.policy} chunk {cfg.chunk_secs} s left {cfg.left_context_secs} s "
          f"right {cfg.right_context_secs} s; window full; median of {args.steps} steps")  # fmt: skip
    for n in args.streams:
        med = statistics.median(run(m, n, cfg, args.steps, prompt)) * 1000
        print(f"{n:3d} streams: {med:8.1f} ms per step  ({med / n:7.1f} ms per stream-chunk, "
              f"real-time factor {med / 1000 / cfg.chunk_secs:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
