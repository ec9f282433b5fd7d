# isort: skip_file
"""Decoder-step cost of the continuous-batching decoder at canary-1b-flash / 180m-flash decoder dimensions
(4 layers x 1024, 8 heads, vocab 5248; random weights), with and without step pipelining (mx.async_eval).

    .venv/bin/python bench/decoder_step.py [--steps 40] [--batches 1 4 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

from canary_server import model  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from canary_server.model.batch_decoder import BatchDecoder, Sequence  # noqa: E402
from canary_server.model.canary import Canary  # noqa: E402
from canary_server.model.cpu_layout import use_cpu_buffer_cache  # noqa: E402
from canary_server.model.config import (  # noqa: E402
    DecoderConfig,
    DecodingConfig,
    EncoderConfig,
    ModelConfig,
    PreprocessorConfig,
    TokenizerConfig,
)

PROMPT = [7, 4, 16, 62, 62, 5, 9, 11, 13]


class _Tok:
    eos_id, pad_id = 3, 2


def build(cpu_layout: bool) -> Canary:
    cfg = ModelConfig(
        preprocessor=PreprocessorConfig(),
        encoder=EncoderConfig(n_layers=1, d_model=512),
        decoder=DecoderConfig(),
        tokenizer=TokenizerConfig(),
        enc_dec_proj=True,
        decoding=DecodingConfig(max_generation_delta=50),
    )
    m = Canary(cfg, _Tok())
    m.head.bias = mx.where(mx.arange(cfg.decoder.vocab_size) < 5, -1e4, 0.0)  # never stop
    mx.eval(m.parameters())
    if cpu_layout:
        m.use_cpu_layout()
        use_cpu_buffer_cache()
    return m


def time_steps(m: Canary, batch: int, steps: int, pipelined: bool) -> float:
    bd = BatchDecoder(m, compile=False)
    t_enc = 375  # 30 s of audio
    bd.add([Sequence(mx.random.normal((t_enc, 1024)), t_enc, PROMPT, 10**6) for _ in range(batch)])
    step = bd.step if pipelined else (lambda: bd._collect(*bd._dispatch()))
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    layouts = [False, True] if mx.default_device() == mx.cpu else [False]
    print(f"device {mx.default_device()}, float32, decoder 4x1024, vocab 5248, cross-attention over 375 frames")
    print("| weights | batch | step, plain (ms) | step, pipelined (ms) | tokens/s pipelined |")
    print("|---|---|---|---|---|")
    for cpu_layout in layouts:
        m = build(cpu_layout)
        for b in args.batches:
            plain = time_steps(m, b, args.steps, pipelined=False)
            piped = time_steps(m, b, args.steps, pipelined=True)
            name = "pre-transposed (CPU layout)" if cpu_layout else "nn.Linear"
            print(f"| {name} | {b} | {plain * 1e3:.1f} | {piped * 1e3:.1f} | {b / piped:.0f} |")


if __name__ == "__main__":
    main()
