# isort: skip_file
"""Decoder-step cost of the continuous-batching decoder at canary-1b-flash / 180m-flash decoder dimensions
(4 layers x 1024, 8 heads, vocab 5248; random weights), with and without step pipelining (mx.async_eval).

    .venv/bin/python bench/decoder_step.py [--steps 40] [--batches 1 4 16]

`--dims tiny` (2 layers of width 64) is for the smoke test of the bench scripts (tests/test_bench_smoke.py).
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


DIMS = {"real": DecoderConfig(), "tiny": DecoderConfig(num_layers=2, hidden_size=64, inner_size=256, vocab_size=512)}


def build(cpu_layout: bool, decoder: DecoderConfig) -> Canary:
    cfg = ModelConfig(
        preprocessor=PreprocessorConfig(),
        encoder=EncoderConfig(n_layers=1, d_model=512),
        decoder=decoder,
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
    hidden = m.config.decoder.hidden_size
    bd.add([Sequence(mx.random.normal((t_enc, hidden)), t_enc, PROMPT, 10**6) for _ in range(batch)])
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
    ap.add_argument("--dims", choices=sorted(DIMS), default="real", help="real: the flash models' decoder")
    args = ap.parse_args()
    layouts = [False, True] if mx.default_device() == mx.cpu else [False]
    d = DIMS[args.dims]
    print(f"device {mx.default_device()}, float32, decoder {d.num_layers}x{d.hidden_size}, vocab {d.vocab_size}, "
          "cross-attention over 375 frames")  # fmt: skip
    print("| weights | batch | step, plain (ms) | step, pipelined (ms) | tokens/s pipelined |")
    print("|---|---|---|---|---|")
    for cpu_layout in layouts:
        m = build(cpu_layout, d)
        for b in args.batches:
            plain = time_steps(m, b, args.steps, pipelined=False)
            piped = time_steps(m, b, args.steps, pipelined=True)
            name = "pre-transposed (CPU layout)" if cpu_layout else "nn.Linear"
            print(f"| {name} | {b} | {plain * 1e3:.1f} | {piped * 1e3:.1f} | {b / piped:.0f} |")


if __name__ == "__main__":
    main()
