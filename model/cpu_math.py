"""exp-based activations (SiLU, sigmoid, softmax) for MLX's CPU backend.

MLX's CPU `exp` (and so `sigmoid`, `silu`, `softmax`) evaluates its Cephes polynomial one element at a time (its
x86-64 build has no SIMD width for it: mlx/backend/cpu/simd/base_simd.h): ~16 ns per value here (SiLU on 0.77 M
values: 12.5 ms, bench/encoder_ops.py), so the encoder's activations cost about as much as its matmuls. The same
polynomial written as whole-array MLX arithmetic (range reduction by the 1.5 * 2**23 rounding trick, 2**n built from
the exponent bits) runs ~2.5-5x faster on that backend and is as accurate (relative error of exp below 1e-6 for
|x| < 20 and never above MLX's kernel's; `tests/test_cpu_math.py`). GPU backends keep MLX's own kernels, which are
fast there. Which path runs is model/backend.py's switch (tests compare both).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import backend

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: float32 y + _ROUND rounds y to an integer n kept in the low mantissa bits
_ROUND_BITS = 0x4B400000  # the bits of _ROUND, so bits(y + _ROUND) - _ROUND_BITS == n
# exp2 on [-0.5, 0.5]: the Cephes coefficients of MLX's CPU exp (mlx/backend/cpu/simd/math.h)
_P = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
      2.402264791363012e-1, 6.931472028550421e-1, 1.0)  # fmt: skip


def enabled() -> bool:
    return backend.cpu_paths()


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)  # an astype is an op (a copy) even to its own dtype


def _as(y: mx.array, dtype: mx.Dtype) -> mx.array:
    return y if y.dtype == dtype else y.astype(dtype)


def _exp2(y: mx.array) -> mx.array:
    """2**y for float32 y (exp(x) is _exp2(x * log2(e)); callers fold a sign into that multiply)."""
    y = mx.clip(y, -126.0, 126.0)
    r = y + _ROUND
    f = y - (r - _ROUND)  # fractional part in [-0.5, 0.5]
    p = _P[0] * f + _P[1]
    for c in _P[2:]:
        p = p * f + c
    two_n = ((r.view(mx.int32) - (_ROUND_BITS - 127)) << 23).view(mx.float32)  # 2**n from the exponent field
    return two_n * p


def exp(x: mx.array) -> mx.array:
    """exp(x) in float32 from arithmetic only. Inputs below -87.3 give ~1e-38 instead of 0, above 87.3 ~8.5e37
    instead of inf: both are what every use here (1 + exp(-x), softmax over max-shifted scores) cannot tell apart."""
    return _exp2(_f32(x) * _LOG2E)


def sigmoid(x: mx.array) -> mx.array:
    if not enabled():
        return mx.sigmoid(x)
    return _as(1.0 / (1.0 + _exp2(_f32(x) * -_LOG2E)), x.dtype)


def silu(x: mx.array) -> mx.array:
    if not enabled():
        return nn.silu(x)
    x32 = _f32(x)
    return _as(x32 / (1.0 + _exp2(x32 * -_LOG2E)), x.dtype)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax computed in float32 (MLX's precise=True)."""
    if not enabled():
        return mx.softmax(x, axis=axis, precise=True)
    x32 = _f32(x)
    e = exp(x32 - mx.max(x32, axis=axis, keepdims=True))
    return _as(e / mx.sum(e, axis=axis, keepdims=True), x.dtype)
