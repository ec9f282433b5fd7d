# isort: skip_file
"""Where the engine's time goes under concurrency, without HTTP: the continuous batcher alone, in this process.

`clients` closed-loop clients (each submits its next 5 s clip when its last one completes, as bench/run.py's
concurrency clients do over HTTP) on a random-weight model with real dims (bench/random_model.py), decode length
forced to round(4 * seconds) tokens (bench/serve_capped.py). The batcher's time is split into encoding (every
stage, the last one included), the prefill of encoded items into the decoder (`_join`: cross K/V, the prompt, the
first token), decoder steps and the rest (scheduling, results). The last line is the bound that the encoder alone
puts on throughput: its audio seconds per second of encoding at the highest concurrency, as a multiple of the
first row's throughput (what concurrency N / concurrency 1 could reach if prefill and decoding were free).

    .venv/bin/python bench/engine_split.py --model 180m-flash [--concurrency 1 16] [--clips-per-client 5]

Prints a Markdown table. Timings depend on the machine's load: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from canary_server import model as model_pkg  # noqa: E402, F401  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from canary_server.model import load  # noqa: E402
from canary_server.model.batch_decoder import Sequence  # noqa: E402
from canary_server.model.prompt import PromptSpec  # noqa: E402
from canary_server.pipeline.encoding import WorkItem  # noqa: E402
from canary_server.pipeline.scheduler import ContinuousBatcher  # noqa: E402
from machine_info import describe  # noqa: E402
from serve_capped import force_decode_length  # noqa: E402
from stages import model_dir  # noqa: E402
from synth import speech_like  # noqa: E402

PARTS = ("encode", "prefill", "decoder steps")


class TimedBatcher(ContinuousBatcher):
    """The batcher with its encode stages, prefills (`_join`) and decoder steps timed (seconds)."""

    def __init__(self, model, encode_seconds: float) -> None:
        super().__init__(model, encode_seconds=encode_seconds)
        self.spent: Counter[str] = Counter()
        self.steps = self.rows = 0

    def _timed(self, part: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.spent[part] += time.perf_counter() - t0

    def _encode_step(self):
        return self._timed("encode", super()._encode_step)  # includes _join: taken out in `split()`

    def _join(self, items, seqs):
        # The encoder's last stage is returned, not yielded (pipeline/encoding.py), so it is still lazy here:
        # evaluated first, it counts as encoding (inside `_encode_step`'s time, outside the prefill's).
        mx.eval([s.enc for s in seqs if isinstance(s, Sequence)])
        return self._timed("prefill", super()._join, items, seqs)

    def _decoder_step(self, beam, decoder):
        self.steps += 1
        self.rows += len(decoder)
        return self._timed("decoder steps", super()._decoder_step, beam, decoder)

    def split(self) -> dict[str, float]:
        out = dict(self.spent)
        out["encode"] = out.get("encode", 0.0) - out.get("prefill", 0.0)
        return {p: out.get(p, 0.0) for p in PARTS}


def run(model, clips: list, clients: int, per_client: int, encode_seconds: float = 30.0) -> dict:
    """Closed-loop clients until each has had `per_client` clips transcribed; the batcher's split and the wall."""
    batcher = TimedBatcher(model, encode_seconds)
    spec = PromptSpec("en", "en")
    left = dict.fromkeys(range(clients), per_client)
    sent = 0

    def submit(client: int) -> None:
        nonlocal sent
        batcher.submit([WorkItem(clips[sent % len(clips)], spec, tag=client)])
        sent += 1
        left[client] -= 1

    t0 = time.perf_counter()
    for c in range(clients):
        submit(c)
    done = 0
    while len(batcher):
        for item in batcher.step():
            if item.error is not None:
                raise item.error
            done += 1
            if left[item.tag] > 0:
                submit(item.tag)
    wall = time.perf_counter() - t0
    return {"clients": clients, "clips": done, "wall": wall, "steps": batcher.steps, "rows": batcher.rows,
            **batcher.split()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="180m-flash", choices=("180m-flash", "1b-flash", "tiny"))
    ap.add_argument("--model-dir", type=Path, help="where the random model is (default: ~/.cache/canary-bench/...)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--clips-per-client", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="clip length")
    ap.add_argument("--encode-seconds", type=float, default=30.0, help="the server's encode_batch_seconds")
    args = ap.parse_args()

    force_decode_length()
    model = load(model_dir(args.model, args.model_dir))
    clips = [speech_like(args.seconds, seed=i) for i in range(32)]
    run(model, clips, min(4, max(args.concurrency)), 1)  # warm-up: shapes, buffers, the helper threads
    results = [run(model, clips, c, args.clips_per_client, args.encode_seconds) for c in args.concurrency]

    forced = round(4 * args.seconds)
    print(f"{args.model} dims, {args.seconds:g} s clips, {forced} tokens forced, float32, encode_batch_seconds "
          f"{args.encode_seconds:g}; {describe()}")  # fmt: skip
    print("| clients | clips | wall (s) | audio s / s | encode (s) | prefill (s) | decoder steps (s) | rest (s) "
          "| steps | rows / step |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rest = r["wall"] - sum(r[p] for p in PARTS)
        print(f"| {r['clients']} | {r['clips']} | {r['wall']:.2f} | {r['clips'] * args.seconds / r['wall']:.1f} | "
              f"{r['encode']:.2f} | {r['prefill']:.2f} | {r['decoder steps']:.2f} | {rest:.2f} | {r['steps']} | "
              f"{r['rows'] / max(r['steps'], 1):.1f} |")  # fmt: skip
    base, top = results[0], results[-1]
    base_rate = base["clips"] * args.seconds / base["wall"]
    top_rate = top["clips"] * args.seconds / top["wall"]
    encoder_rate = top["clips"] * args.seconds / max(top["encode"], 1e-9)
    print(f"\nconcurrency {top['clients']} / {base['clients']}: {top_rate / base_rate:.2f}x. The encoder alone at "
          f"concurrency {top['clients']}: {encoder_rate:.1f} audio s / s, {encoder_rate / base_rate:.2f}x "
          f"concurrency {base['clients']}'s throughput (the most batching could give if prefill and decoding were "
          "free).")  # fmt: skip


if __name__ == "__main__":
    main()
