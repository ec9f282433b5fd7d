"""Fused float32 kernels for MLX's CPU backend (the encoder's, a decoder step's attention): built at install, optional.

MLX's x86-64 CPU build runs every elementwise op as its own pass over memory and evaluates exp one element at a
time, so the encoder's activations, LayerNorms and attention softmax (model/cpu_math.py's MLX arithmetic: ~20
passes per SiLU) cost a quarter of a batched encode (bench/encoder_ops.py). `_cpu_kernels.cpp` computes each of
them as one vectorised loop inside an MLX primitive, so they stay in MLX's lazy graph; from 32 768 output values
the elementwise ones split their rows between the calling thread and the library's helper thread (MLX runs a
stream's ops on one thread: the other core would idle):

* `silu(x)`; `glu_mask(x, valid)`: GLU over the last axis, padded rows zeroed;
* `dwconv_affine_silu(x, taps, scale, shift, bias)`: the conformer's depthwise conv, its bias, the inference
  BatchNorm folded to a scale and shift per channel, and SiLU, in one pass;
* `layer_norm(x, weight, bias, eps)` (and `apply_layer_norm(norm, x)`, also used by the decoder's step: MLX's CPU
  backend runs mx.fast.layer_norm as 18 ops, a third of a batch-1 step's ops);
* `subsample_conv0(...)`, `depthwise_s2(...)`: the dw_striding subsampling's stride-2 convs with their bias, time
  masks and ReLUs (the 30 s subsampling activations are ~100 MB: one pass instead of ~20), and
  `subsample_conv0_dw(...)`: the first two in one pass, the first conv's output never in memory;
* `qmatmul8(x, weight, scales, biases, group_size)`: a few rows times an 8-bit affine-quantized weight, reading the
  bytes (a quarter of float32's) with the group's scale and bias applied to partial sums (MLX's CPU quantized
  matmul is a scalar loop: ~6x slower than float32 here); model/cpu_layout.py's QuantizedDecoderLinear uses it;
* `rel_attention(q, k, v, pos, pos_bias_u, pos_bias_v, valid)`: the conformer's relative-position attention after
  its projections, per batch row and head in one pass through the packed matmul's blocks (MLX's CPU backend makes
  one BLAS call per batch row and head for each of its three products: 3-4x at a 5 s clip, 2.6-7.5x at 30 s;
  bench/encoder_ops.py); on CPUs without AVX2, `rel_softmax(ac, bd, valid, sqrt_dk)`: the attention weights from
  the content scores and the un-shifted position scores (NeMo's rel_shift, scaling, masking and softmax);
* `packed_linear(x, wp, bias)`: x @ W^T + bias with W stored once, at load, as panels of 32 output features
  (`pack_weight`), by register-blocked AVX-512 or AVX2 kernels (`packed_isa()`; both give the same bits, x packed
  into 12-row tiles by in-register transposes with AVX-512): it does not pack W again on every
  call as sgemm does, and with AVX-512 it runs 512-bit FMAs where OpenBLAS may run its AVX2 kernels (Debian 12's
  0.3.21 does on AMD Zen 4 and 5 when told to, or when it does not know the CPU). On this project's Zen 5 machine the
  encoder's Linears run ~2x OpenBLAS's sgemm with AVX-512, 1.1-1.3x with AVX2 (bench/encoder_ops.py --linears).
  model/cpu_layout.py's PackedLinear uses it for the encoder's float32 Linears, and the decoder's with AVX-512,
  whose PackedEmbedding (the tied token table, packed) looks its rows up with `packed_rows(wp, ids)`;
* `greedy_pick(logits)`: a greedy decoder step's token per row and its log-softmax value (argmax and logsumexp in
  two vectorised passes; MLX's CPU exp is a scalar loop: ~0.9 ms of a batch-16 step at vocab 5248);
* `kv_write(cache, offsets, x)`: a decoder step's new keys or values into its self-attention buffers at each row's
  position, in place when the buffer is the step's alone (MLX's put_along_axis is a scalar loop);
* `decode_attention(q, k, v, mask, scale)`: a decoder step's attention (one query per row) in one pass, reading
  the K/V of unmasked positions only (MLX's CPU composition is two batched matmuls of one row, i.e. one BLAS call
  per row and head, plus the softmax: 9 ms of a 30 ms step at batch 16; it reads a self-attention cache to its
  capacity, this reads it to the row's position). `attention(...)` picks it or MLX's.

Same functions as the MLX compositions they replace (tests/test_cpu_kernels.py compares each, and the parity
tests run the encoder against NeMo's goldens with them). Used by model/conformer.py on the CPU paths for float32
models when the library is present, built for the MLX that is running, and passes a self-test at first use.

Built by `python -m canary_server.model.cpu_kernels_build` (scripts/setup.sh runs it on Linux): g++ compiles the
source with MLX's headers from its wheel and nanobind's sources (its version must be the one MLX was built with:
the types are shared), ~10 s, next to this file with a stamp of the MLX version and source hash. A different MLX
later (or no compiler at install) just means the MLX compositions run: same results, slower; `status()` says why.
`CANARY_NO_CPU_KERNELS=1` (or `set_enabled(False)`) turns them off.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
import sysconfig
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import backend

log = logging.getLogger(__name__)

ENV_OFF = "CANARY_NO_CPU_KERNELS"
SOURCE = Path(__file__).with_name("_cpu_kernels.cpp")
MODULE = "_cpu_kernels"


def library_path(directory: Path | None = None) -> Path:
    return (directory or SOURCE.parent) / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))


def stamp_path(directory: Path | None = None) -> Path:
    return (directory or SOURCE.parent) / (MODULE + ".stamp.json")


def expected_stamp() -> dict[str, str]:
    """What a usable library was built for: this MLX, this source, this Python ABI."""
    return {
        "mlx": mx.__version__,
        "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
    }


_module = None
_status = "not loaded yet"
_loaded = False
_enabled = True
_load_lock = threading.Lock()


def _load():
    """The kernels module, or None (and `_status` says why). Loaded once per process, on first use; a thread that
    asks meanwhile waits for that."""
    global _loaded
    if _loaded:
        return _module
    with _load_lock:
        if not _loaded:
            try:
                _load_once()
            finally:
                _loaded = True
    return _module


def _load_once():
    global _module, _status
    if os.environ.get(ENV_OFF, "").strip() not in ("", "0"):
        _status = f"off ({ENV_OFF} is set)"
        return None
    if not library_path().is_file():
        _status = "not built (python -m canary_server.model.cpu_kernels_build)"
        if sys.platform.startswith("linux"):
            log.info("CPU kernels %s: the encoder runs as plain MLX ops (same results, slower)", _status)
        return None
    try:
        stamp = json.loads(stamp_path().read_text())
    except (OSError, ValueError):
        stamp = {}
    want = expected_stamp()
    stale = [k for k, v in want.items() if stamp.get(k) != v]
    if stale:
        _status = f"built for another {'/'.join(stale)} ({stamp.get('mlx', '?')}): rebuild to use them"
        log.warning("CPU kernels not used: %s (python -m canary_server.model.cpu_kernels_build)", _status)
        return None
    try:
        module = importlib.import_module(f"{__package__}.{MODULE}")
        with mx.stream(mx.cpu):
            x = mx.array([-3.0, 0.0, 2.0])
            got = module.silu(x)
            ok = mx.allclose(got, x * mx.sigmoid(x), rtol=1e-5, atol=1e-6).item()
    except Exception as e:  # noqa: BLE001  (an ABI mismatch shows up as any error here)
        _status = f"failed to load: {type(e).__name__}: {e}"
        log.warning("CPU kernels not used: %s", _status)
        return None
    if not ok:
        _status = "failed the self-test"
        log.warning("CPU kernels not used: %s", _status)
        return None
    _module, _status = module, "loaded"
    return module


def status() -> str:
    """'loaded', or why the MLX compositions run instead."""
    _load()
    return _status if _enabled or _module is None else "off (set_enabled(False))"


def set_enabled(enabled: bool) -> bool:
    """Turn the kernels on or off for the whole process (tests and benches compare both); returns the previous."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def usable(*arrays: mx.array) -> bool:
    """Whether the kernels can compute on these arrays: on the CPU paths (model/backend.py) with MLX computing on
    its CPU, loaded and not turned off, float32."""
    if not _enabled or not backend.cpu_paths() or mx.default_device() != mx.cpu or _load() is None:
        return False
    return all(a.dtype == mx.float32 for a in arrays)  # (masks and lengths are passed as bool / int32 arrays)


def apply_layer_norm(norm: nn.LayerNorm, x: mx.array) -> mx.array:
    """norm(x), through the kernel where it can run (MLX's CPU backend runs mx.fast.layer_norm as ~18 ops)."""
    if "bias" in norm and usable(x, norm.weight):
        return _module.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)


def silu(x: mx.array) -> mx.array:
    return _module.silu(x)


def glu_mask(x: mx.array, valid: mx.array | None) -> mx.array:
    """x (..., 2C) -> (..., C): x[..., :C] * sigmoid(x[..., C:]), zero where `valid` (x.shape[:-1], bool) is False."""
    return _module.glu_mask(x, valid)


def dwconv_affine_silu(
    x: mx.array, taps: mx.array, scale: mx.array, shift: mx.array, bias: mx.array | None
) -> mx.array:
    """x (B, T, C): SiLU((depthwise conv over T with taps (K, C), zero 'same' padding, + bias) * scale + shift)."""
    return _module.dwconv_affine_silu(x, taps, scale, shift, bias)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    return _module.layer_norm(x, weight, bias, eps)


def subsample_conv0(x: mx.array, taps: mx.array, bias: mx.array, len_in: mx.array, len_out: mx.array) -> mx.array:
    """Features (B, T, F) -> (B, T1, F1, C): the subsampling's first 3x3 stride-2 conv (taps (3, 3, C), padding 1),
    + bias, ReLU; features at or past len_in (B,) int32 read as zero, frames at or past len_out are zero."""
    return _module.subsample_conv0(x, taps, bias, len_in, len_out)


def depthwise_s2(
    x: mx.array, taps: mx.array, bias: mx.array, len_in: mx.array, len_out: mx.array, relu_in: bool
) -> mx.array:
    """(B, T, F, C) -> (B, T2, F2, C): depthwise 3x3 stride-2 conv (taps (3, 3, C), padding 1) + bias, reading frames
    at or past len_in as zero (and the input through a ReLU with relu_in); frames at or past len_out are zero."""
    return _module.depthwise_s2(x, taps, bias, len_in, len_out, relu_in)


def subsample_conv0_dw(x: mx.array, taps0: mx.array, bias0: mx.array, taps1: mx.array, bias1: mx.array,
                       len_in: mx.array, len_mid: mx.array, len_out: mx.array) -> mx.array:  # fmt: skip
    """`subsample_conv0` then `depthwise_s2` (relu_in False) in one pass, without the first conv's output in memory:
    features (B, T, F) -> (B, T2, F2, C); len_mid (B,) the first conv's lengths. The same values."""
    return _module.subsample_conv0_dw(x, taps0, bias0, taps1, bias1, len_in, len_mid, len_out)


def qmatmul8(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """x (M, K) @ W^T for MLX's 8-bit affine quantization of W (N, K): weight (N, K / 4) uint32, scales and biases
    (N, K / group_size). Reads the weights as bytes, never dequantised into memory."""
    return _module.qmatmul8(x, weight, scales, biases, group_size)


def rel_softmax(ac: mx.array, bd: mx.array, valid: mx.array, sqrt_dk: float) -> mx.array:
    """Attention weights (B, H, T, T) from content scores ac (B, H, T, T), position scores before the relative
    shift bd (B, H, T, 2T-1) and the valid frames (B, T)."""
    return _module.rel_softmax(ac, bd, valid, sqrt_dk)


def decode_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, scale: float) -> mx.array:
    """softmax((q * scale) @ k^T + mask) @ v for q (B, H, 1, D), k and v (B, H, L, D), an additive float32 mask
    (B or 1, 1, 1, L) or None. Positions masked with NeMo's NEG_INF (mask <= -10000) get weight 0 and are not read."""
    return _module.decode_attention(q, k, v, mask, scale)


PANEL = 32  # output features per panel of a packed weight


def packed_supported() -> bool:
    """Whether `packed_linear` can run here: the library loaded (not turned off) and the CPU has AVX-512 or AVX2."""
    return _enabled and _load() is not None and bool(_module.packed_supported())


PACKED_ISAS = ("avx2", "avx512")  # the packed matmul's builds, lowest first


def packed_isa() -> str | None:
    """The build the packed matmul runs ('avx512' or 'avx2'), or None when it cannot run here."""
    return _module.packed_isa() if packed_supported() else None


def set_packed_isa(name: str | None) -> str | None:
    """Run the packed matmul's `name` build (tests and benches compare them) if this CPU has it, else its best;
    None: its best. Returns the previous one (None when the library is not loaded)."""
    if _load() is None:
        return None
    return _module.set_packed_isa(name or "") or None


def pack_weight(weight: mx.array) -> mx.array:
    """nn.Linear's weight (N, K), N a multiple of 32 -> panels (N / 32, K, 32): wp[p, k, j] = weight[32 p + j, k]."""
    n, k = weight.shape
    return mx.contiguous(weight.reshape(n // PANEL, PANEL, k).transpose(0, 2, 1))


def unpack_weight(wp: mx.array) -> mx.array:
    """`pack_weight`'s panels back to the transposed weight (K, N) (a strided view: copied when used)."""
    p, k, _ = wp.shape
    return wp.transpose(1, 0, 2).reshape(k, p * PANEL)


def packed_linear(x: mx.array, wp: mx.array, bias: mx.array | None) -> mx.array:
    """x (..., K) @ W^T + bias -> (..., N) for W packed by `pack_weight` (wp (N / 32, K, 32)); bias (N,) or None."""
    return _module.packed_linear(x, wp, bias)


def packed_rows(wp: mx.array, ids: mx.array) -> mx.array:
    """Rows `ids` (int32 or uint32, any shape; clamped to the table) of the table W (V, H) that `pack_weight` packed
    into wp (V / 32, H, 32): (*ids.shape, H), one op (the same values as W[ids])."""
    return _module.packed_rows(wp, ids)


def rel_attention_usable(d_k: int, *arrays: mx.array) -> bool:
    """Whether `rel_attention` can compute a conformer attention of head size d_k on these arrays here."""
    return d_k % PANEL == 0 and usable(*arrays) and bool(_module.packed_supported())


def rel_attention(
    q: mx.array, k: mx.array, v: mx.array, pos: mx.array, pos_bias_u: mx.array, pos_bias_v: mx.array, valid: mx.array
) -> mx.array:
    """The conformer's relative-position attention after its projections: q, k, v (B, T, D), pos (2T-1, D) the
    projected positions T-1 .. -(T-1), the position biases (H, D / H), valid (B, T) bool -> (B, T, D), ready for
    linear_out: NeMo's two score products, rel_shift, scaling, masked softmax and weighted sum of v, per batch row
    and head in one pass (AVX-512 or AVX2; head size a multiple of 32). Padded query rows are zero."""
    return _module.rel_attention(q, k, v, pos, pos_bias_u, pos_bias_v, valid)


def pick(logits: mx.array) -> tuple[mx.array, mx.array]:
    """Greedy token per row (uint32, the first maximum, as mx.argmax) and its log-softmax value, from logits (B, V):
    through `greedy_pick` where the kernels run, else MLX's argmax and logsumexp. A row with +inf or NaN gets a NaN
    log-prob either way (the overflow guard's signal)."""
    if logits.ndim == 2 and logits.shape[1] > 0 and usable(logits):
        out = _module.greedy_pick(logits)
        return out[:, 0].astype(mx.uint32), out[:, 1]
    token = mx.argmax(logits, axis=-1)
    return token, mx.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)


def kv_write(cache: mx.array, offsets: mx.array, x: mx.array) -> mx.array:
    """`cache` (B, H, L, D) float32 with x (B, H, 1, D) written at each row's position `offsets` (B,) int32 along L:
    `mx.put_along_axis` with those positions, in place when nothing else holds the cache (a decoder step's own
    buffers), else into a copy. MLX's scatter loops over every element with its index arithmetic (~70 us for a
    batch-16 step's write, 8 of them a step); this copies rows."""
    return _module.kv_write(cache, offsets, x)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """mx.fast.scaled_dot_product_attention, through `decode_attention` for one query per row on the CPU paths."""
    b, h, t, _ = q.shape
    if (
        t == 1
        and k.ndim == 4
        and k.shape[:2] == (b, h)
        and v.shape == k.shape
        and (mask is None or (mask.ndim == 4 and mask.shape[1:] == (1, 1, k.shape[2]) and mask.shape[0] in (1, b)))
        and usable(q, k, v, *([] if mask is None else [mask]))
    ):
        return decode_attention(q, k, v, mask, scale)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
