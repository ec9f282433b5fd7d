# isort: skip_file
"""Where the encoder's time goes on the MLX backend in use, and what the CPU-only paths change (model/cpu_math.py,
the shift-and-add depthwise convs, the buffer cache of model/cpu_layout.py), and what the cached position
projections (ConformerEncoder.projected_positions, both paths) save, and the fused CPU kernels on top of the CPU
paths (model/cpu_kernels.py: activations, LayerNorms, attention, subsampling convs, the packed matmul). Random
weights, float32.

    .venv/bin/python bench/encoder_ops.py [--model 180m-flash] [--repeats 7]

Prints Markdown tables: single ops (MLX kernel vs the CPU path), the encoder's Linear products through OpenBLAS's
sgemm and through each build of the packed matmul (`--linears`: only that one), whole-encoder time for one 5 s
clip, a 6 x 5 s batch and one 30 s clip with the GPU paths' MLX kernels, the CPU paths as MLX ops, and the CPU
paths with the CPU kernels, and one 5 s clip with the position projections computed every call vs cached
(interleaved pairs). The model directory is written by bench/random_model.py if missing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from canary_server import model  # noqa: E402, F401  (first: preloads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from canary_server.model import backend, cpu_kernels, cpu_math  # noqa: E402
from canary_server.model import conformer  # noqa: E402
from canary_server.model.conformer import _depthwise_shift_add, _depthwise_shift_add_1d  # noqa: E402
from canary_server.model.cpu_layout import CPU_CACHE_LIMIT, use_cpu_buffer_cache  # noqa: E402

DEFAULT_ROOT = Path.home() / ".cache" / "canary-bench"
MLX_CPU_DEFAULT_CACHE = 32 << 20


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` evaluated, in ms (one warm-up call)."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def with_math(enabled: bool, fn):
    def run():
        with backend.forced(backend.CPU if enabled else backend.GPU):
            return fn()

    return run


def ops_table(repeats: int) -> list[str]:
    h = mx.random.normal((6, 63, 2048)) * 3  # FF hidden of a 6 x 5 s batch at 180m dims
    scores = mx.random.normal((1, 8, 375, 375))  # attention scores of one 30 s clip
    sub = mx.random.normal((6, 250, 64, 256))  # subsampling activations of a 6 x 5 s batch
    conv = nn.Conv2d(256, 256, 3, stride=2, padding=1, groups=256)
    c5, c30 = mx.random.normal((1, 63, 1024)), mx.random.normal((1, 375, 1024))  # conv module input, 1b dims
    conv1d = nn.Conv1d(1024, 1024, 9, padding=4, groups=1024)
    mx.eval(h, scores, sub, conv.parameters(), c5, c30, conv1d.parameters())

    def depthwise_1d(x):
        return lambda: _depthwise_shift_add_1d(x, conv1d) if cpu_math.enabled() else conv1d(x)

    rows = [
        ("SiLU, 0.77 M values: MLX kernel -> cpu_math", lambda: cpu_math.silu(h)),
        ("sigmoid, 0.77 M values: MLX kernel -> cpu_math", lambda: cpu_math.sigmoid(h)),
        ("softmax, 1.1 M values: MLX kernel -> cpu_math", lambda: cpu_math.softmax(scores)),
        ("depthwise 3x3 s2 conv, 6 x 250 x 64 x 256: grouped conv -> shift-add", lambda: (
            _depthwise_shift_add(sub, conv) if cpu_math.enabled() else conv(sub))),
        ("depthwise conv1d k=9, 1 x 63 x 1024 (5 s, 1b dims): grouped conv -> shift-add", depthwise_1d(c5)),
        ("depthwise conv1d k=9, 1 x 375 x 1024 (30 s, 1b dims): grouped conv -> shift-add", depthwise_1d(c30)),
    ]  # fmt: skip
    out = ["| op | before (ms) | after (ms) |", "|---|---:|---:|"]
    use_cpu_buffer_cache()  # as model.load does on the CPU backend
    for name, fn in rows:
        mlx_ms, cpu_ms = timed(with_math(False, fn), repeats), timed(with_math(True, fn), repeats)
        out.append(f"| {name} | {mlx_ms:.1f} | {cpu_ms:.1f} |")
    cells = []
    for limit in (MLX_CPU_DEFAULT_CACHE, CPU_CACHE_LIMIT):
        mx.set_cache_limit(limit)
        mx.clear_cache()
        cells.append(timed(lambda: sub + 1.0, repeats))
    name = f"add over 98 MB: buffer cache 32 MB (MLX's) -> {CPU_CACHE_LIMIT >> 20} MB"
    out.append(f"| {name} | {cells[0]:.1f} | {cells[1]:.1f} |")
    x, w = mx.random.normal((6 * 63, 512)), mx.random.normal((512, 2048))  # an FF matmul of a 6 x 5 s batch
    ms = timed(lambda: x @ w, repeats)
    out += ["", f"FF matmul (378 x 512) @ (512 x 2048): {ms:.2f} ms = {2 * 378 * 512 * 2048 / ms / 1e6:.0f} GFLOP/s"]
    return out


def kernel_ops_table(repeats: int) -> list[str]:
    """The CPU paths' MLX compositions vs the fused CPU kernels, one op each (180m dims, a 6 x 5 s batch)."""
    if cpu_kernels.status() != "loaded":
        return [f"(CPU kernels: {cpu_kernels.status()})"]
    h = mx.random.normal((6, 63, 2048)) * 3
    x = mx.random.normal((6, 63, 512))
    ln = nn.LayerNorm(512)
    subsampling = conformer.ConvSubsampling(conformer.EncoderConfig(d_model=512))
    feats, lens = mx.random.normal((6, 501, 128)), mx.array([500] * 6)
    mx.eval(h, x, ln.parameters(), subsampling.parameters(), feats)
    rows = [
        ("SiLU, 0.77 M values", lambda: cpu_kernels.silu(h) if cpu_kernels.usable(h) else cpu_math.silu(h)),
        ("LayerNorm, 6 x 63 x 512", lambda: cpu_kernels.apply_layer_norm(ln, x)),
        ("dw_striding subsampling, 6 x 5 s", lambda: subsampling(feats, lens)[0]),
    ]
    # the attention after its projections (linear_out left out): 180m dims (8 heads of 64) and 1b dims (8 of 128),
    # the composition with rel_softmax vs rel_attention (AVX-512 or AVX2), whichever the CPU runs
    for b, t, d in ((1, 63, 512), (6, 63, 512), (1, 375, 512), (1, 63, 1024), (6, 63, 1024), (1, 375, 1024)):
        att = conformer.RelPositionMultiHeadAttention(d, 8)
        att.linear_out = nn.Identity()
        xa = mx.random.normal((b, t, d))
        pos = att.project_positions(conformer.rel_positional_encoding(t, d))
        valid = mx.ones((b, t), dtype=mx.bool_)
        mask = ~(valid[:, None, :, None] & valid[:, None, None, :])
        mx.eval(att.parameters(), xa, pos, mask)
        rows.append((f"relative attention, {b} x {t} frames, 8 heads of {d // 8}",
                     lambda att=att, xa=xa, pos=pos, mask=mask, valid=valid: att(xa, pos, mask, valid)))  # fmt: skip
    out = ["| op (CPU paths) | MLX ops (ms) | CPU kernel (ms) |", "|---|---:|---:|"]
    for name, fn in rows:
        cells = []
        for enabled in (False, True):
            previous = cpu_kernels.set_enabled(enabled)
            try:
                cells.append(timed(with_math(True, fn), repeats))
            finally:
                cpu_kernels.set_enabled(previous)
        out.append(f"| {name} | {cells[0]:.2f} | {cells[1]:.2f} |")
    return out


def linears_table(model_dir: Path, repeats: int) -> list[str]:
    """The encoder's Linear products at this model's dims, for one 5 s clip (63 rows) and a 6 x 5 s batch (378):
    OpenBLAS's sgemm on the pre-transposed weight (TransposedLinear) against each build of the packed matmul this CPU
    runs (PackedLinear: AVX2, AVX-512), alternating, with GFLOP/s."""
    import json

    from canary_server import _blas

    enc = json.loads((model_dir / "config.json").read_text())["encoder"]
    d, ff = enc["d_model"], enc["d_model"] * enc.get("ff_expansion_factor", 4)
    shapes = [("q, k, v, out, pos", d, d), ("feed-forward in", d, ff), ("feed-forward out", ff, d),
              ("conv pointwise 1", d, 2 * d)]  # fmt: skip
    best = cpu_kernels.packed_isa()
    isas = list(cpu_kernels.PACKED_ISAS[: cpu_kernels.PACKED_ISAS.index(best) + 1]) if best else []
    head = f"OpenBLAS kernels: {_blas.openblas_core()}; packed matmul builds: " + (
        ", ".join(isas) if isas else f"none here ({cpu_kernels.status()})"
    )
    cols = "".join(f" packed, {i} (ms) | GFLOP/s | speed-up |" for i in isas)
    out = [head, "", f"| product (K -> N) | rows | sgemm (ms) | GFLOP/s |{cols}", "|---|---:|---:|---:|"
           + "---:|---:|---:|" * len(isas)]  # fmt: skip
    if isas:  # the first call starts the kernels' helper thread: not inside a timing
        mx.eval(cpu_kernels.packed_linear(mx.ones((63, d)), cpu_kernels.pack_weight(mx.ones((d, d))), None))
    try:
        for name, k, n in shapes:
            w, b = mx.random.normal((n, k)) * k**-0.5, mx.zeros((n,))
            w_t = mx.contiguous(w.T)
            wp = cpu_kernels.pack_weight(w)
            mx.eval(w_t, b, wp)
            for rows in (63, 378):
                x = mx.random.normal((rows, k))
                mx.eval(x)
                flop = 2 * rows * k * n
                runs: dict[str, list[float]] = {"sgemm": [], **{i: [] for i in isas}}
                for _ in range(3):
                    runs["sgemm"].append(timed(lambda x=x, w_t=w_t, b=b: mx.addmm(b, x, w_t), repeats))
                    for isa in isas:
                        cpu_kernels.set_packed_isa(isa)
                        runs[isa].append(timed(lambda x=x, wp=wp, b=b: cpu_kernels.packed_linear(x, wp, b), repeats))
                sg = min(runs["sgemm"])
                cells = "".join(f" {min(runs[i]):.3f} | {flop / min(runs[i]) / 1e6:.0f} | {sg / min(runs[i]):.2f}x |"
                                for i in isas)  # fmt: skip
                out.append(f"| {name} ({k} -> {n}) | {rows} | {sg:.3f} | {flop / sg / 1e6:.0f} |{cells}")
    finally:
        cpu_kernels.set_packed_isa(None)
    return out


def encoder_table(model_dir: Path, repeats: int) -> list[str]:
    m = model.load(model_dir)  # sets the CPU buffer cache and weight layout (packed Linears with AVX-512 / AVX2)
    previous = cpu_kernels.set_enabled(False)
    try:
        m_plain = model.load(model_dir)  # kernels off at load: TransposedLinear (the MLX-ops and GPU-paths columns)
    finally:
        cpu_kernels.set_enabled(previous)
    kernels = cpu_kernels.status() == "loaded"
    out = [
        "| encoder input (512 MB cache) | MLX kernels (ms) | CPU paths, MLX ops (ms) | CPU paths + CPU kernels (ms) "
        "| audio s / s, CPU kernels |",
        "|---|---:|---:|---:|---:|",
    ]
    for batch, seconds in ((1, 5), (6, 5), (1, 30)):
        frames = seconds * 100 + 1
        feats = mx.random.normal((batch, frames, 128))
        lens = mx.array([frames - 1] * batch)

        def run(feats=feats, lens=lens):
            return m.encoder(feats, lens)[0]

        def run_plain(feats=feats, lens=lens):
            return m_plain.encoder(feats, lens)[0]

        off = timed(with_math(False, run_plain), repeats)
        previous = cpu_kernels.set_enabled(False)
        try:
            on = timed(with_math(True, run_plain), repeats)
        finally:
            cpu_kernels.set_enabled(previous)
        fused = timed(with_math(True, run), repeats) if kernels else float("nan")
        best = fused if kernels else on
        out.append(
            f"| {batch} x {seconds} s | {off:.0f} | {on:.0f} | {fused:.0f} | {batch * seconds / best * 1e3:.1f} |"
        )
    if not kernels:
        out.append(f"(CPU kernels: {cpu_kernels.status()})")
    return out


def positions_table(model_dir: Path, repeats: int, pairs: int = 5) -> list[str]:
    """One 5 s clip through the whole encoder, position projections every call vs cached, interleaved."""
    m = model.load(model_dir)
    feats, lens = mx.random.normal((1, 501, 128)), mx.array([500])
    saved = conformer.POS_CACHE_MAX
    runs: dict[int, list[float]] = {0: [], saved: []}
    try:
        for _ in range(pairs):
            for limit in runs:
                conformer.POS_CACHE_MAX = limit  # 0: every length is projected directly
                runs[limit].append(timed(lambda: m.encoder(feats, lens)[0], repeats))
    finally:
        conformer.POS_CACHE_MAX = saved
    every, cached = statistics.median(runs[0]), statistics.median(runs[saved])
    return [
        "| encoder, 1 x 5 s | position projections every call (ms) | cached (ms) | saved |",
        "|---|---:|---:|---:|",
        f"| medians of {pairs} interleaved pairs | {every:.1f} | {cached:.1f} | {every - cached:.1f} ms |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="180m-flash", choices=["180m-flash", "1b-flash", "tiny"])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--linears", action="store_true",
                    help="only the encoder's Linear products: OpenBLAS's sgemm vs the packed kernel")  # fmt: skip
    args = ap.parse_args()
    model_dir = args.model_dir or DEFAULT_ROOT / args.model
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "random_model.py"), args.model, "--out", str(model_dir)],
                       check=True)  # fmt: skip
    print(f"device {mx.default_device()}, float32, medians of {args.repeats}")
    if args.linears:
        print(f"canary-{args.model} dims, the encoder's Linear products (best of 3 medians, alternating):")
        print("\n".join(linears_table(model_dir, args.repeats)))
        return
    print("\n".join(ops_table(args.repeats)))
    print()
    print("\n".join(kernel_ops_table(args.repeats)))
    print()
    print(f"canary-{args.model} dims, the encoder's Linear products (best of 3 medians, alternating):")
    print("\n".join(linears_table(model_dir, args.repeats)))
    print()
    print(f"canary-{args.model} dims, random weights:")
    print("\n".join(encoder_table(model_dir, args.repeats)))
    print()
    print("\n".join(positions_table(model_dir, args.repeats)))


if __name__ == "__main__":
    main()
