"""CPU-backend tuning: the encoder's Linear weights stored for the CPU's matmul, and a larger MLX buffer cache.

With the CPU paths (model/backend.py) the loader swaps the encoder's nn.Linears and the encoder-decoder projection once
(`Canary.use_cpu_layout`):
* for `PackedLinear` where the CPU kernels are there with AVX-512 or AVX2 (model/cpu_kernels.py): the weight
  stored as panels of 32 output features for `cpu_kernels.packed_linear`, which packs nothing per call (sgemm packs
  the weight on every call) and runs 512-bit FMAs with AVX-512: on this project's Zen 5 machine ~2x OpenBLAS's
  sgemm on the encoder's shapes with AVX-512, 1.1-1.3x with AVX2;
* else for `TransposedLinear`: MLX's CPU matmul of `x @ W.T` (what nn.Linear computes) is 4-7% slower than
  `x @ Wt` with a contiguous pre-transposed `Wt` for encoder-sized inputs (63+ rows).
Either replaces the weight (no second copy). The decoder's Linears are packed too where the CPU has AVX-512
(`pack_linears`: as fast as sgemv for one row, 1.3-2.5x the few-row products from 9 rows); elsewhere they keep
nn.Linear's layout, whose rows OpenBLAS's sgemv (canary_server/_gemv_forward.c) reads fastest at batch 1 (the
AVX2 build of the packed matmul only ties the few-row kernel up to 9 rows). The math is the same; the GPU paths
keep MLX's own layout.

MLX keeps at most 32 MB of freed buffers for reuse on its CPU backend; every larger temporary (the encoder's
subsampling activations are ~100 MB for 30 s of audio) is then a fresh allocation whose pages fault in on first
touch, so an add over 98 MB took ~60 ms instead of ~8 ms (bench/encoder_ops.py). `use_cpu_buffer_cache` raises that
limit to `CPU_CACHE_LIMIT` = 512 MB (never lowers one set higher): the process keeps up to that much freed memory
for reuse instead of returning it between requests.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from . import backend, cpu_kernels

KERNEL_MAX_ROWS = 64  # QuantizedDecoderLinear: rows through the 8-bit kernel (more: mx.quantized_matmul)


class TransposedLinear(nn.Module):
    """y = x @ weight_t + bias with weight_t (in, out) contiguous."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight_t)
        return x @ self.weight_t


class PackedLinear(nn.Module):
    """y = x @ W.T + bias with W stored as `cpu_kernels.pack_weight`'s panels (`weight_p`, (N / 32, K, 32)),
    computed by `cpu_kernels.packed_linear`. Where the kernels cannot run (turned off after loading, a GPU stream)
    it computes the same product from an unpacked copy, made per call (slow, correct)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_p = cpu_kernels.pack_weight(linear.weight)
        if "bias" in linear:
            self.bias = linear.bias

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """A float32 nn.Linear whose output features come in whole panels, on a CPU the kernel runs on."""
        return type(layer) is nn.Linear and _packable(layer.weight)

    def __call__(self, x: mx.array) -> mx.array:
        return _packed_product(x, self.weight_p, self.get("bias"))


def _packable(weight: mx.array) -> bool:
    """A float32 weight (N, K) whose N rows come in whole panels, on a CPU the packed matmul runs on."""
    return weight.dtype == mx.float32 and weight.shape[0] % cpu_kernels.PANEL == 0 and cpu_kernels.packed_supported()


def _packed_product(x: mx.array, wp: mx.array, bias: mx.array | None) -> mx.array:
    """x @ W.T (+ bias) for W packed as `wp`: the packed matmul where it runs, else from an unpacked copy."""
    if x.ndim >= 1 and x.shape[-1] == wp.shape[1] and cpu_kernels.usable(x, wp):
        return cpu_kernels.packed_linear(x, wp, bias)  # leading dims kept: no reshape ops per call
    w_t = cpu_kernels.unpack_weight(wp)
    return x @ w_t if bias is None else mx.addmm(bias, x, w_t)


class PackedEmbedding(nn.Module):
    """The decoder's token embedding, whose table is also its tied output projection (`as_linear`, the logits),
    stored as `cpu_kernels.pack_weight`'s panels (`weight_p`, (V / 32, H, 32)) for the packed matmul: at batch 16 the
    logits take 0.41 ms against 1.06 through OpenBLAS's sgemm (which packs the 21.5 MB table on every call), the same
    at batch 1. A lookup reads its row across the panel (stride 32 floats): a step looks up one token per row. No
    second copy of the table."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight_p = cpu_kernels.pack_weight(embedding.weight)

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        return type(layer) is nn.Embedding and _packable(layer.weight)

    def __call__(self, ids: mx.array) -> mx.array:
        if ids.dtype in (mx.int32, mx.uint32) and cpu_kernels.usable(self.weight_p):
            return cpu_kernels.packed_rows(self.weight_p, ids)  # one op
        return self.weight_p[ids // cpu_kernels.PANEL, :, ids % cpu_kernels.PANEL]  # (*ids.shape, H)

    def as_linear(self, x: mx.array) -> mx.array:
        return _packed_product(x, self.weight_p, None)


class QuantizedDecoderLinear(nn.QuantizedLinear):
    """An 8-bit nn.QuantizedLinear of the decoder whose few-row products (the decoder step at batch 1-4) go through
    the CPU kernel `cpu_kernels.qmatmul8`: it reads the quantized bytes, a quarter of float32's weights, where
    MLX's CPU quantized matmul runs a scalar loop. Same parameters (names and arrays) as the layer it wraps; more
    rows, other bit widths or no kernel: mx.quantized_matmul as nn.QuantizedLinear computes it. A subclass, so code
    that asks whether a layer is quantized still sees it as such."""

    def __init__(self, layer: nn.QuantizedLinear) -> None:
        nn.Module.__init__(self)  # not QuantizedLinear's: that would quantize fresh random weights
        self.weight, self.scales = layer.weight, layer.scales
        if "biases" in layer:
            self.biases = layer.biases
        if "bias" in layer:
            self.bias = layer.bias
        self.group_size, self.bits, self.mode = layer.group_size, layer.bits, layer.mode

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if (
            self.bits == 8
            and self.mode == "affine"
            and "biases" in self
            and rows <= KERNEL_MAX_ROWS
            and cpu_kernels.usable(x, self.scales)
        ):
            y = cpu_kernels.qmatmul8(x.reshape(rows, -1), self.weight, self.scales, self.biases, self.group_size)
            y = y.reshape(*x.shape[:-1], -1)
        else:
            y = mx.quantized_matmul(
                x,
                self.weight,
                scales=self.scales,
                biases=self.get("biases"),
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            )
        return y + self.bias if "bias" in self else y


def _replace_layers(
    module: nn.Module, replacement: Callable[[nn.Module], nn.Module | None], skip: tuple[str, ...] = ()
) -> int:
    """Replace every layer below `module` (children and items of child lists, recursively; not the children named
    in `skip`, nor anything under them) for which `replacement(layer)` gives a module; returns how many were
    replaced."""
    count = 0
    for key, child in list(module.items()):
        if key in skip:
            continue
        slots = list(enumerate(child)) if isinstance(child, list) else [(None, child)]
        for i, item in slots:
            if not isinstance(item, nn.Module):
                continue
            new = replacement(item)
            if new is None:
                count += _replace_layers(item, replacement)
            elif i is None:
                module[key], count = new, count + 1
            else:
                child[i], count = new, count + 1
    return count


def wrap_quantized(module: nn.Module) -> int:
    """Replace every 8-bit affine nn.QuantizedLinear below `module` by a QuantizedDecoderLinear; returns how many."""
    return _replace_layers(
        module,
        lambda m: (
            QuantizedDecoderLinear(m) if type(m) is nn.QuantizedLinear and m.bits == 8 and m.mode == "affine" else None
        ),
    )


def lay_out_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace every plain nn.Linear below `module` (not quantized ones; none under its children named in `skip`)
    by a PackedLinear where it fits, else a TransposedLinear; returns how many were replaced."""
    return _replace_layers(
        module,
        lambda m: (PackedLinear(m) if PackedLinear.fits(m) else TransposedLinear(m)) if type(m) is nn.Linear else None,
        skip,
    )


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear below `module` that PackedLinear fits, and every nn.Embedding PackedEmbedding fits (the
    decoder's, whose table is the tied output projection); returns how many were replaced."""
    return _replace_layers(
        module,
        lambda m: PackedLinear(m) if PackedLinear.fits(m) else PackedEmbedding(m) if PackedEmbedding.fits(m) else None,
    )


def use_cpu_layout() -> bool:
    return backend.cpu_paths()


CPU_CACHE_LIMIT = 512 << 20


def use_cpu_buffer_cache(limit: int = CPU_CACHE_LIMIT) -> None:
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)
