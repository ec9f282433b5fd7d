# isort: skip_file
"""Decoder-step cost of the continuous-batching decoder at canary-1b-flash / 180m-flash decoder dimensions
(4 layers x 1024, 8 heads, vocab 5248; random weights), with and without step pipelining (mx.async_eval), against
its limit: the bytes one step must read (weights, self-attention K/V buffer, cross-attention K/V) over this machine's
memory bandwidth (a STREAM-like copy and triad in numpy and MLX), and the ops (graph primitives MLX dispatches) and
host synchronisations (device arrays read by the host) per step, for the CPU paths and the GPU paths forced
(model/backend.py: nn.Linear layout and a compiled step; on a CPU this only counts what the GPU would dispatch).

    .venv/bin/python bench/decoder_step.py [--steps 40] [--batches 1 4 16] [--enc-frames 375]

`--dims tiny` (2 layers of width 64) is for the smoke test of the bench scripts (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np

from canary_server import model  # noqa: F401  (loads OpenBLAS before MLX)
from canary_server import _blas  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from canary_server.model import backend, batch_decoder  # noqa: E402
from canary_server.model.batch_decoder import BatchDecoder, Sequence  # noqa: E402
from canary_server.model.canary import Canary  # noqa: E402
from canary_server.model.cpu_layout import PackedLinear, use_cpu_buffer_cache  # noqa: E402
from canary_server.model.quantize import DEFAULT_GROUP_SIZE, quantize  # noqa: E402
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


def build(cpu_layout: bool, decoder: DecoderConfig, bits: int = 0) -> Canary:
    """A model with only the decoder's real dims (1 encoder layer: the step never runs it)."""
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
    if bits:
        quantize(m.decoder, bits, DEFAULT_GROUP_SIZE)  # what `convert --quantize` stores
    mx.eval(m.parameters())
    if cpu_layout:
        m.use_cpu_layout()
        use_cpu_buffer_cache()
    return m


def decoder(m: Canary, batch: int, t_enc: int, compile: bool | None = None) -> BatchDecoder:
    bd = BatchDecoder(m, compile=compile)
    hidden = m.config.decoder.hidden_size
    bd.add([Sequence(mx.random.normal((t_enc, hidden)), t_enc, PROMPT, 10**6) for _ in range(batch)])
    return bd


def time_steps(m: Canary, batch: int, steps: int, pipelined: bool, t_enc: int = 375) -> float:
    bd = decoder(m, batch, t_enc, compile=False)
    step = bd.step if pipelined else (lambda: bd._collect(*bd._dispatch()))
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- the limit ------------------------------------------------------------------------------------------------
def bandwidth(mb: int = 256, repeats: int = 5) -> dict[str, float]:
    """STREAM-like copy (a = b: 2 x bytes moved) and triad (a = b + s * c: 3 x) in GB/s, best of `repeats`, on
    float32 arrays of `mb` MB each (far above any cache)."""
    n = (mb << 20) // 4
    use_cpu_buffer_cache()  # reuse the outputs' buffers: no page faults in the timed loop
    b, c = np.random.rand(n).astype(np.float32), np.random.rand(n).astype(np.float32)
    a = np.empty_like(b)
    out = {}

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    out["numpy copy"] = 2 * 4 * n / best(lambda: np.copyto(a, b)) / 1e9
    # numpy's triad is two passes (a = 3c; a += b): 5 arrays' bytes moved, counted as such
    out["numpy triad"] = 5 * 4 * n / best(lambda: (np.multiply(c, 3.0, out=a), np.add(a, b, out=a))) / 1e9
    mb_, mc = mx.array(b), mx.array(c)
    mx.eval(mb_, mc)
    triad = mx.compile(lambda x, y: x + 3.0 * y)  # one fused pass: reads 2 arrays, writes 1
    out["MLX copy"] = 2 * 4 * n / best(lambda: mx.eval(mb_ + 0.0)) / 1e9
    out["MLX triad"] = 3 * 4 * n / best(lambda: mx.eval(triad(mb_, mc))) / 1e9
    return out


def bytes_per_step(m: Canary, batch: int, t_enc: int, cap: int) -> dict[str, int]:
    """What one step must read: every decoder weight the step uses (not the token table's rows nor the positions:
    gathered; not the cross-attention K/V projections: run once per utterance), the output head (the tied
    embedding, V x H), and per row the self-attention K/V buffers (attention reads all `cap` positions, masked)
    and the cross-attention K/V."""
    dec = m.decoder
    item = m.dtype.size
    weights = 0
    for layer in dec.layers:
        for name, arr in _flat(layer.parameters()):
            if "second_sub_layer.key_net" in name or "second_sub_layer.value_net" in name:
                continue
            weights += arr.nbytes
    weights += sum(a.nbytes for _, a in _flat(dec.final_layer_norm.parameters()))
    weights += sum(a.nbytes for _, a in _flat(dec.embedding.layer_norm.parameters()))
    head = sum(a.nbytes for _, a in _flat(dec.embedding.token_embedding.parameters())) + m.head.bias.nbytes
    h, n_layers = m.config.decoder.hidden_size, m.config.decoder.num_layers
    return {"weights": weights, "head": head, "self K/V": batch * 2 * n_layers * cap * h * item,
            "cross K/V": batch * 2 * n_layers * t_enc * h * item}  # fmt: skip


def _flat(tree, prefix: str = ""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix)


def ops_per_step(bd: BatchDecoder) -> int:
    """Primitives in one step's graph (what MLX dispatches; a compiled step counts its fused kernels once)."""
    mx.eval(bd.last, bd.offsets, bd.self_k, bd.self_v, bd.cross_k, bd.cross_v, bd.cross_mask)  # the step's alone
    token, token_lp, k, v = bd._step_fn(bd.last, bd.offsets, bd.self_k, bd.self_v, bd.cross_k, bd.cross_v,
                                        bd.cross_mask)  # fmt: skip
    f = io.StringIO()
    mx.export_to_dot(f, token, token_lp, *k, *v)
    return f.getvalue().count("shape=rectangle")


class _CountingNumpy:
    """Stands in for numpy inside model/batch_decoder.py: counts the device arrays the host reads."""

    def __init__(self) -> None:
        self.reads = 0

    def array(self, x, *a, **kw):
        if isinstance(x, mx.array):
            self.reads += 1
        return np.array(x, *a, **kw)

    def __getattr__(self, name):
        return getattr(np, name)


def syncs_per_step(bd: BatchDecoder, steps: int = 10) -> float:
    counter = _CountingNumpy()
    batch_decoder.np, saved = counter, batch_decoder.np
    try:
        for _ in range(steps):
            bd.step()
    finally:
        batch_decoder.np = saved
    return counter.reads / steps


def limit_table(d: DecoderConfig, batches: list[int], t_enc: int, steps: int) -> None:
    bw = bandwidth()
    print("memory bandwidth (GB/s, best of 5, 256 MB float32 arrays): "
          + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))  # fmt: skip
    peak = max(bw.values())
    print(f"\n| paths | batch | MB per step (weights + head + self K/V + cross K/V) | floor at {peak:.1f} GB/s (ms) "
          "| step, pipelined (ms) | step / floor | ops per step | host reads per step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for kind in (backend.CPU, backend.GPU):
        with backend.forced(kind):
            m = build(kind == backend.CPU, d)
            for b in batches:
                bd = decoder(m, b, t_enc)
                cap = bd.self_k[0].shape[2]
                by = bytes_per_step(m, b, t_enc, cap)
                total = sum(by.values())
                floor = total / (peak * 1e9)
                ops = ops_per_step(bd)
                syncs = syncs_per_step(bd)
                step = time_steps(m, b, steps, pipelined=True, t_enc=t_enc) if kind == backend.CPU else float("nan")
                parts = " + ".join(f"{v / 1e6:.1f}" for v in by.values())
                ratio = f"{step / floor:.2f}x" if step == step else "-"
                ms = f"{step * 1e3:.1f}" if step == step else "- (not timed: GPU paths on a CPU)"
                print(f"| {kind} | {b} | {total / 1e6:.1f} ({parts}) | {floor * 1e3:.1f} | {ms} | {ratio} | {ops} "
                      f"| {syncs:g} |")  # fmt: skip


def gemv_table(d: DecoderConfig, layouts: list[bool], batches: list[int], t_enc: int, steps: int, pairs: int) -> None:
    """sgemm only vs the forwarder (sgemv at batch 1, its few-row kernel at 2..12), interleaved in one process (a
    load change hits both sides alike)."""
    if not _blas.set_gemv_forward(True):
        print("\n(no sgemv forwarding in this install: canary_server/_gemv_forward.c was not built)")
        return
    print(f"\n| weights | batch | step, sgemm only (ms) | step, forwarder: sgemv / few-row kernel (ms) "
          f"| speed-up (median of {pairs} pairs) |\n|---|---|---|---|---|")  # fmt: skip
    for cpu_layout in layouts:
        m = build(cpu_layout, d)
        for b in batches:
            off, on = [], []
            for _ in range(pairs):
                for enabled, out in ((False, off), (True, on)):
                    _blas.set_gemv_forward(enabled)
                    out.append(time_steps(m, b, steps, pipelined=True, t_enc=t_enc))
            _blas.set_gemv_forward(True)
            name = "CPU layout" if cpu_layout else "nn.Linear"
            ratio = statistics.median(a / b_ for a, b_ in zip(off, on, strict=True))
            print(f"| {name} | {b} | {statistics.median(off) * 1e3:.1f} | {statistics.median(on) * 1e3:.1f} "
                  f"| {ratio:.2f}x |")  # fmt: skip


def matmul_table(d: DecoderConfig, batches: list[int], repeats: int = 15) -> None:
    """The step's Linear products alone (one per decoder Linear of the step, real shapes): float32 as the CPU paths
    compute them in nn.Linear's layout (sgemv / the forwarder's few-row kernel / sgemm) and packed (PackedLinear: what
    the CPU layout uses where the CPU has AVX-512), MLX's quantized matmul, the 8-bit CPU kernel."""
    from canary_server.model import cpu_kernels
    from encoder_ops import timed  # median ms of evaluated calls after a warm-up

    h, inner = d.hidden_size, d.inner_size
    shapes = [(h, h)] * 6 + [(inner, h), (h, inner)]  # self q/k/v/out, cross q/out, FF in/out (out, in)
    layers = []
    for _ in range(d.num_layers):
        for out_dim, in_dim in shapes:
            lin = nn.Linear(in_dim, out_dim)
            q = nn.QuantizedLinear.from_linear(lin, group_size=DEFAULT_GROUP_SIZE, bits=8)
            mx.eval(lin.parameters(), q.parameters())
            layers.append((lin, q))
    if cpu_kernels.status() != "loaded":
        print(f"\n(8-bit kernel not available: {cpu_kernels.status()})")
        isa_table([lin for lin, _ in layers], batches, repeats)
        return

    packed = None
    if cpu_kernels.packed_supported():
        packed = [PackedLinear(lin) for lin, _ in layers]
        mx.eval([p.parameters() for p in packed])
    print(f"\n| rows | {len(layers)} step products, float32 nn.Linear (ms) | packed, {cpu_kernels.packed_isa()} (ms) "
          "| MLX quantized matmul, 8-bit (ms) | cpu_kernels.qmatmul8 (ms) |\n|---:|---:|---:|---:|---:|")  # fmt: skip
    for b in batches:
        xs = {n: mx.random.normal((b, n)) for n in {h, inner}}
        mx.eval(xs)
        f32 = timed(lambda xs=xs: [lin(xs[lin.weight.shape[1]]) for lin, _ in layers], repeats)
        pk = float("nan")
        if packed is not None:
            pk = timed(lambda xs=xs: [p(xs[p.weight_p.shape[1]]) for p in packed], repeats)
        mlx_q = float("nan")
        if b <= 9:  # MLX's CPU quantized matmul takes ~40 ms per row here
            mlx_q = timed(lambda xs=xs: [q(xs[lin.weight.shape[1]]) for lin, q in layers], repeats)

        def kernel(xs=xs):
            return [cpu_kernels.qmatmul8(xs[lin.weight.shape[1]], q.weight, q.scales, q.biases, DEFAULT_GROUP_SIZE)
                    for lin, q in layers]  # fmt: skip

        kern = timed(kernel, repeats)
        print(f"| {b} | {f32:.1f} | {pk:.1f} | {mlx_q:.1f} | {kern:.1f} |")
    isa_table([lin for lin, _ in layers], batches, repeats)


def isa_table(layers: list[nn.Linear], batches: list[int], repeats: int) -> None:
    """The same float32 products through OpenBLAS's sgemm and through each build of the forwarder's few-row kernel
    this CPU runs (canary_server/_gemv_forward.c: generic, AVX2, AVX-512), alternating in this process."""
    from encoder_ops import timed

    best = _blas.small_m_isa()
    if best is None:
        print("\n(no few-row kernel: the sgemv forwarder is not built)")
        return
    isas = _blas.SMALL_M_ISAS[: _blas.SMALL_M_ISAS.index(best) + 1]
    print(f"\n| rows | {len(layers)} products: sgemm (ms) | " + " | ".join(f"few-row kernel, {i} (ms)" for i in isas)
          + " |\n|---:|---:|" + "---:|" * len(isas))  # fmt: skip
    try:
        for b in (b for b in batches if b > 1):  # one row goes to sgemv whatever the build
            xs = {n: mx.random.normal((b, n)) for n in {lin.weight.shape[1] for lin in layers}}
            mx.eval(xs)

            def products(xs=xs):
                return [lin(xs[lin.weight.shape[1]]) for lin in layers]

            _blas.set_gemv_forward(False)
            cells = [f"{timed(products, repeats):.1f}"]
            _blas.set_gemv_forward(True)
            for isa in isas:
                _blas.set_small_m_isa(isa)
                cells.append(f"{timed(products, repeats):.1f}" if b <= _blas.small_m_max() else "(sgemm)")
            print(f"| {b} | " + " | ".join(cells) + " |")
    finally:
        _blas.set_gemv_forward(True)
        _blas.set_small_m_isa(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--dims", choices=sorted(DIMS), default="real", help="real: the flash models' decoder")
    ap.add_argument("--enc-frames", type=int, default=375, help="cross-attention length (375: 30 s, 63: 5 s)")
    ap.add_argument("--limit-only", action="store_true", help="only the bandwidth / bytes / ops / syncs table")
    ap.add_argument("--bits", type=int, choices=(4, 8), help="also time the decoder quantized to BITS (group 64)")
    ap.add_argument("--gemv-pairs", type=int, default=0,
                    help="N interleaved pairs of pipelined steps with OpenBLAS sgemm only vs the forwarder "
                         "(canary_server/_gemv_forward.c: sgemv at batch 1, its own kernel at 2..12), per layout and "
                         "batch")  # fmt: skip
    ap.add_argument("--matmuls", action="store_true",
                    help="the step's Linear products alone: float32, MLX's 8-bit, the 8-bit CPU kernel")  # fmt: skip
    args = ap.parse_args()
    layouts = [False, True] if mx.default_device() == mx.cpu else [False]
    d = DIMS[args.dims]
    print(f"device {mx.default_device()}, float32, decoder {d.num_layers}x{d.hidden_size}, vocab {d.vocab_size}, "
          f"cross-attention over {args.enc_frames} frames")  # fmt: skip
    limit_table(d, args.batches, args.enc_frames, args.steps)
    if args.gemv_pairs:
        gemv_table(d, layouts, args.batches, args.enc_frames, args.steps, args.gemv_pairs)
    if args.matmuls:
        matmul_table(d, args.batches)
    if args.limit_only:
        return
    print("\n| weights | batch | step, plain (ms) | step, pipelined (ms) | tokens/s pipelined |")
    print("|---|---|---|---|---|")
    variants = [(cpu_layout, 0) for cpu_layout in layouts] + ([(layouts[-1], args.bits)] if args.bits else [])
    for cpu_layout, bits in variants:
        m = build(cpu_layout, d, bits)
        for b in args.batches:
            plain = time_steps(m, b, args.steps, pipelined=False, t_enc=args.enc_frames)
            piped = time_steps(m, b, args.steps, pipelined=True, t_enc=args.enc_frames)
            name = "CPU layout" if cpu_layout else "nn.Linear"
            name = f"{bits}-bit decoder" if bits else name
            print(f"| {name} | {b} | {plain * 1e3:.1f} | {piped * 1e3:.1f} | {b / piped:.0f} |")


if __name__ == "__main__":
    main()
