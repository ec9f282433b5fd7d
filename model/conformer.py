"""FastConformer encoder (NeMo `ConformerEncoder`: dw_striding subsampling, rel-pos MHSA, macaron FF).

Attribute names follow NeMo's state dict (reference §2, §4.1) so the converter only handles layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import cpu_kernels, cpu_math
from .config import EncoderConfig

NEG_INF = -10000.0  # nemo/collections/asr/parts/submodules/multi_head_attention.py INF_VAL
BN_EPS = 1e-5
LN_EPS = 1e-5


def _time_mask(lengths: mx.array, t: int) -> mx.array:
    return mx.arange(t)[None, :] < lengths[:, None]  # (B, T)


def _conv_out_len(lengths: mx.array) -> mx.array:
    # calc_length for kernel 3, stride 2, padding 1 (both sides): floor((L + 2 - 3) / 2 + 1) = ceil(L / 2)
    return (lengths - 1) // 2 + 1


class ConvSubsampling(nn.Module):
    """dw_striding x8: conv(1->C, s2) ReLU [dw(s2) pw ReLU] x2, masked like NeMo's MaskedConvSequential."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        c = cfg.subsampling_conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(cfg.n_subsampling_convs - 1):
            layers += [nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.conv = layers
        freq = cfg.feat_in
        for _ in range(cfg.n_subsampling_convs):
            freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(c * freq, cfg.d_model)

    def __call__(self, x: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        if self._fusable(x):
            return self._fused(x, lengths)
        x = x[..., None]  # (B, T, F, 1): NHWC with H = time, W = mel
        x = x * _time_mask(lengths, x.shape[1])[:, :, None, None]
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d) and layer.groups > 1 and cpu_math.enabled():
                x = _depthwise_shift_add(x, layer)
            else:
                x = layer(x)
            if isinstance(layer, nn.Conv2d):
                if layer.weight.shape[1] == 3:  # stride-2 conv: lengths shrink
                    lengths = _conv_out_len(lengths)
                x = x * _time_mask(lengths, x.shape[1])[:, :, None, None].astype(x.dtype)
        b, t, f, c = x.shape
        x = x.transpose(0, 1, 3, 2).reshape(b, t, c * f)  # channel-major flatten, as NeMo's (B, C, T, F) view
        return self.out(x), lengths

    def _fusable(self, x: mx.array) -> bool:
        convs = [layer for layer in self.conv if isinstance(layer, nn.Conv2d)]
        c = convs[0].weight.shape[0]

        def fits(i: int, conv: nn.Conv2d) -> bool:  # conv0, then (depthwise stride 2, pointwise) pairs
            if "bias" not in conv:
                return False
            if i > 0 and i % 2 == 0:
                return conv.weight.shape == (c, 1, 1, c)
            return conv.weight.shape == (c, 3, 3, 1) and conv.stride == (2, 2) and conv.padding == (1, 1)

        shapes_ok = all(fits(i, conv) for i, conv in enumerate(convs))
        return shapes_ok and cpu_kernels.usable(x, *(conv.weight for conv in convs))

    def _fused(self, feats: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """The same subsampling with the CPU kernels: each stride-2 conv, its bias, time mask and ReLU (the depthwise
        ones also the previous pointwise conv's mask and ReLU) in one pass, the first two convs in the same pass;
        the pointwise convs are matmuls."""
        convs = [layer for layer in self.conv if isinstance(layer, nn.Conv2d)]
        sources = tuple(conv.weight for conv in convs)

        packed = cpu_kernels.packed_supported() and convs[0].weight.shape[0] % cpu_kernels.PANEL == 0

        def make() -> list[mx.array]:  # stride-2 convs: taps (3, 3, C); pointwise: (C_in, C_out), or packed
            return [mx.contiguous(conv.weight[:, :, :, 0].transpose(1, 2, 0)) if i == 0 or i % 2 == 1
                    else cpu_kernels.pack_weight(conv.weight[:, 0, 0, :]) if packed
                    else mx.contiguous(conv.weight[:, 0, 0, :].T) for i, conv in enumerate(convs)]  # fmt: skip

        weights = _derived(self, "_fused_weights_packed" if packed else "_fused_weights", sources, make)
        len_in = lengths.astype(mx.int32)
        lens = _conv_out_len(len_in)
        if len(convs) == 1:
            x = cpu_kernels.subsample_conv0(feats, weights[0], convs[0].bias, len_in, lens)
        for i in range(1, len(convs), 2):
            dw, pw = convs[i], convs[i + 1]
            nxt = _conv_out_len(lens)
            if i == 1:  # the first conv and the first depthwise conv in one pass (its output never in memory)
                x = cpu_kernels.subsample_conv0_dw(
                    feats, weights[0], convs[0].bias, weights[1], dw.bias, len_in, lens, nxt
                )
            else:
                x = cpu_kernels.depthwise_s2(x, weights[i], dw.bias, lens, nxt, True)
            if packed:  # the packed matmul (model/cpu_layout.py's PackedLinear), over (B, T, F) rows as they are
                x = cpu_kernels.packed_linear(x, weights[i + 1], pw.bias)
            else:
                b, t, f, c = x.shape
                x = mx.addmm(pw.bias, x.reshape(-1, c), weights[i + 1]).reshape(b, t, f, c)
            lens = nxt
        b, t, f, c = x.shape
        if len(convs) > 1:  # the last pointwise conv's mask and ReLU
            x = mx.where(_time_mask(lens, t)[:, :, None, None], mx.maximum(x, 0.0), 0.0)
        x = x.transpose(0, 1, 3, 2).reshape(b, t, c * f)
        return self.out(x), lens.astype(lengths.dtype)


def _derived(owner: nn.Module, key: str, sources: tuple[mx.array, ...], make: Callable[[], Any]) -> Any:
    """Arrays computed from `sources` (weights) by `make`, evaluated once and kept in owner.__dict__[key], outside
    the module's parameters, until any source array is replaced (a weight reload)."""
    cached = owner.__dict__.get(key)
    stale = cached is None or len(cached[0]) != len(sources)
    if stale or any(a is not b for a, b in zip(cached[0], sources, strict=True)):
        values = make()
        mx.eval(values)
        cached = (sources, values)
        owner.__dict__[key] = cached
    return cached[1]


def _depthwise_shift_add(x: mx.array, conv: nn.Conv2d) -> mx.array:
    """A depthwise 3x3 stride-2 conv (padding 1) as nine strided multiply-adds: ~1.4x faster than MLX's grouped
    conv on its CPU backend (bench/encoder_ops.py), with the same sums in the same order (equal outputs on the
    fixtures)."""
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.weight.shape[1:] == (3, 3, 1)
    b, t, f, c = x.shape
    t_out, f_out = (t - 1) // 2 + 1, (f - 1) // 2 + 1
    xp = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    # (3, 3, C) contiguous: a tap's weights as one contiguous row (a strided (C,) operand doubles a multiply's time)
    w = mx.contiguous(conv.weight[..., 0].transpose(1, 2, 0))
    out = None
    for i in range(3):
        for j in range(3):
            tap = xp[:, i : i + 2 * t_out : 2, j : j + 2 * f_out : 2, :] * w[i, j]
            out = tap if out is None else out + tap
    return out + conv.bias if "bias" in conv else out


def _depthwise_shift_add_1d(x: mx.array, conv: nn.Conv1d) -> mx.array:
    """The conformer's depthwise Conv1d (kernel k, stride 1, 'same' padding) as k shifted multiply-adds over
    contiguous time slices: 4-19x faster than MLX's grouped conv on its CPU backend (0.81 -> 0.14 ms at 63 x 512,
    17.3 -> 0.92 ms at 375 x 1024; bench/encoder_ops.py), equal to float32 rounding."""
    k = conv.weight.shape[1]
    pad = conv.padding
    assert conv.stride == 1 and conv.weight.shape[2] == 1 and 2 * pad == k - 1
    t = x.shape[1]
    xp = mx.pad(x, [(0, 0), (pad, pad), (0, 0)])
    w = mx.contiguous(conv.weight[:, :, 0].T)  # (k, C): a tap's weights as one contiguous row
    out = xp[:, 0:t] * w[0]
    for i in range(1, k):
        out = out + xp[:, i : i + t] * w[i]
    return out + conv.bias if "bias" in conv else out


def _grouped_conv(x: mx.array, conv: nn.Conv1d) -> mx.array:
    return conv(x)


def rel_positional_encoding(t: int, d_model: int) -> mx.array:
    """RelPositionalEncoding table for positions t-1 .. -(t-1): (2t-1, d_model), float32 like NeMo."""
    positions = mx.arange(t - 1, -t, -1).astype(mx.float32)[:, None]
    div = mx.exp(mx.arange(0, d_model, 2).astype(mx.float32) * -(math.log(10000.0) / d_model))
    angles = positions * div  # (2t-1, d/2)
    return mx.stack([mx.sin(angles), mx.cos(angles)], axis=-1).reshape(2 * t - 1, d_model)


class RelPositionMultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.h, self.d_k = n_heads, d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model, bias=bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = mx.zeros((n_heads, self.d_k))
        self.pos_bias_v = mx.zeros((n_heads, self.d_k))

    def project_positions(self, pos_emb: mx.array) -> mx.array:
        """linear_pos(pos_emb): (2T-1, D). It has no bias, so a row depends on its position only: the projection of
        a longer table, sliced, is this one's (ConformerEncoder keeps it)."""
        return self.linear_pos(pos_emb)

    def __call__(self, x: mx.array, pos_proj: mx.array, mask: mx.array, valid: mx.array | None = None) -> mx.array:
        """x (B, T, D), pos_proj (2T-1, D): `project_positions` of the T-1 .. -(T-1) table, mask (B, 1, T, T) True
        where attention is NOT allowed; valid (B, T): the frames the mask is made of (lets the CPU kernel run)."""
        b, t, _ = x.shape
        if valid is not None and cpu_kernels.rel_attention_usable(self.d_k, x, pos_proj, self.pos_bias_u):
            q, k, v = self.linear_q(x), self.linear_k(x), self.linear_v(x)  # the lines below in one pass per head
            out = cpu_kernels.rel_attention(q, k, v, pos_proj, self.pos_bias_u, self.pos_bias_v, valid)
            return self.linear_out(out)
        q = self.linear_q(x).reshape(b, t, self.h, self.d_k)  # (B, T, H, d_k)
        k = self.linear_k(x).reshape(b, t, self.h, self.d_k).transpose(0, 2, 1, 3)  # (B, H, T, d_k)
        v = self.linear_v(x).reshape(b, t, self.h, self.d_k).transpose(0, 2, 1, 3)
        p = pos_proj.reshape(-1, self.h, self.d_k).transpose(1, 0, 2)  # (H, 2T-1, d_k)
        q_u = (q + self.pos_bias_u).transpose(0, 2, 1, 3)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(0, 2, 1, 3)
        ac = q_u @ k.transpose(0, 1, 3, 2)  # (B, H, T, T)
        bd = q_v @ p.transpose(0, 2, 1)  # (B, H, T, 2T-1)
        if valid is not None and cpu_kernels.usable(ac, bd):  # the lines below in one pass
            attn = cpu_kernels.rel_softmax(ac, bd, valid, math.sqrt(self.d_k))
        else:
            bd = self._rel_shift(bd)[..., :t]  # (B, H, T, T): relative position i - j
            scores = (ac + bd) / math.sqrt(self.d_k)
            scores = mx.where(mask, NEG_INF, scores)
            attn = mx.where(mask, 0.0, cpu_math.softmax(scores, axis=-1))
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)  # (B, T, D)
        return self.linear_out(out)

    @staticmethod
    def _rel_shift(x: mx.array) -> mx.array:
        # NeMo rel_shift: pad one zero column left, view (2T, T'), drop the first row, view back.
        b, h, t, n = x.shape  # n = 2T - 1
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (1, 0)])  # (B, H, T, 2T)
        x = x.reshape(b, h, n + 1, t)[:, :, 1:]  # (B, H, 2T-1, T)
        return x.reshape(b, h, t, n)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool = True) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear1(x)
        return self.linear2(cpu_kernels.silu(h) if cpu_kernels.usable(h) else cpu_math.silu(h))


class BatchNorm(nn.Module):
    """Inference-only BatchNorm1d over the channel (last) axis."""

    STATS = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.running_mean = mx.zeros((dims,))
        self.running_var = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return (x - self.running_mean) * mx.rsqrt(self.running_var + BN_EPS) * self.weight + self.bias

    def scale_shift(self) -> tuple[mx.array, mx.array]:
        """The same map as x * scale + shift per channel (for the fused CPU kernel)."""
        scale = mx.rsqrt(self.running_var + BN_EPS) * self.weight
        return scale, self.bias - self.running_mean * scale


class ConformerConvolution(nn.Module):
    def __init__(self, d_model: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Linear(d_model, 2 * d_model, bias=bias)
        pad = (kernel_size - 1) // 2
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=pad, groups=d_model, bias=bias)
        self.batch_norm = BatchNorm(d_model)
        self.pointwise_conv2 = nn.Linear(d_model, d_model, bias=bias)

    def __call__(self, x: mx.array, pad_mask: mx.array) -> mx.array:
        """x (B, T, D); pad_mask (B, T, 1) True on valid frames."""
        h = self.pointwise_conv1(x)
        dw = self.depthwise_conv
        if 2 * dw.padding == dw.weight.shape[1] - 1 and cpu_kernels.usable(h, dw.weight, self.batch_norm.weight):
            taps, scale, shift = self._fused_constants()
            g = cpu_kernels.glu_mask(h, pad_mask[..., 0])  # GLU, padded frames zeroed
            bias = self.depthwise_conv.bias if "bias" in self.depthwise_conv else None
            return self.pointwise_conv2(cpu_kernels.dwconv_affine_silu(g, taps, scale, shift, bias))
        a, gate = mx.split(h, 2, axis=-1)
        x = a * cpu_math.sigmoid(gate)  # GLU over channels
        x = mx.where(pad_mask, x, 0.0)
        depthwise = _depthwise_shift_add_1d if cpu_math.enabled() else _grouped_conv
        x = cpu_math.silu(self.batch_norm(depthwise(x, self.depthwise_conv)))
        return self.pointwise_conv2(x)

    def _fused_constants(self) -> tuple[mx.array, mx.array, mx.array]:
        """The depthwise taps as (K, C) rows and the BatchNorm's scale and shift, computed once per weights (kept
        outside the parameters, in self.__dict__, like ConformerEncoder's position projections)."""
        sources = (self.depthwise_conv.weight, *(self.batch_norm[k] for k in BatchNorm.STATS))
        return _derived(
            self, "_fused", sources, lambda: (mx.contiguous(self.depthwise_conv.weight[:, :, 0].T),
                                              *self.batch_norm.scale_shift())
        )  # fmt: skip


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d, bias = cfg.d_model, cfg.use_bias  # NeMo's use_bias: the layers' Linear and conv layers (not the norms)
        self.norm_feed_forward1 = nn.LayerNorm(d, eps=LN_EPS)
        self.feed_forward1 = FeedForward(d, d * cfg.ff_expansion_factor, bias)
        self.norm_self_att = nn.LayerNorm(d, eps=LN_EPS)
        self.self_attn = RelPositionMultiHeadAttention(d, cfg.n_heads, bias)
        self.norm_conv = nn.LayerNorm(d, eps=LN_EPS)
        self.conv = ConformerConvolution(d, cfg.conv_kernel_size, bias)
        self.norm_feed_forward2 = nn.LayerNorm(d, eps=LN_EPS)
        self.feed_forward2 = FeedForward(d, d * cfg.ff_expansion_factor, bias)
        self.norm_out = nn.LayerNorm(d, eps=LN_EPS)

    def __call__(self, x: mx.array, pos_proj: mx.array, att_mask: mx.array, pad_mask: mx.array) -> mx.array:
        valid = pad_mask[..., 0]
        x = x + 0.5 * self.feed_forward1(cpu_kernels.apply_layer_norm(self.norm_feed_forward1, x))
        x = x + self.self_attn(cpu_kernels.apply_layer_norm(self.norm_self_att, x), pos_proj, att_mask, valid)
        x = x + self.conv(cpu_kernels.apply_layer_norm(self.norm_conv, x), pad_mask)
        x = x + 0.5 * self.feed_forward2(cpu_kernels.apply_layer_norm(self.norm_feed_forward2, x))
        return cpu_kernels.apply_layer_norm(self.norm_out, x)


def drain(stages: Generator) -> Any:
    """Run a stage generator to its end without evaluating anything in between; return its value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


POS_CACHE_STEP = 64  # frames: the cached position projections grow in these steps
POS_CACHE_MAX = 1024  # frames (82 s at 8x subsampling): longer inputs project their positions on every call


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        self.layers = [ConformerLayer(cfg) for _ in range(cfg.n_layers)]

    def projected_positions(self, t: int, dtype: mx.Dtype) -> list[mx.array]:
        """Every layer's linear_pos over the relative positions T-1 .. -(T-1): (2T-1, D) each.

        They depend on T and the weights only, not on the audio, so they are computed once for the longest T seen
        (rounded up to POS_CACHE_STEP) and sliced: at 5 s this saves a (125 x D) @ (D x D) matmul per layer per
        call (~6% of the encoder's FLOPs at canary-1b-flash dims; NeMo computes it every call). A row of a
        matmul does not depend on the other rows, so the slice equals the direct projection. Kept outside the
        module's parameters (self.__dict__), recomputed when the weights or the dtype change."""
        if t > POS_CACHE_MAX:
            return self._project_positions(t, dtype)
        projections = [layer.self_attn.linear_pos for layer in self.layers]
        arrays = [a for p in projections for _, a in tree_flatten(p.parameters())]
        cached = self.__dict__.get("_pos_cache")
        if (
            cached is None
            or cached[0] < t
            or cached[1] != dtype
            or len(cached[2]) != len(arrays)
            or any(a is not b for a, b in zip(cached[2], arrays, strict=True))
        ):
            t_max = min(POS_CACHE_MAX, -(-t // POS_CACHE_STEP) * POS_CACHE_STEP)
            projected = [mx.contiguous(p) for p in self._project_positions(t_max, dtype)]
            mx.eval(projected)
            cached = (t_max, dtype, arrays, projected)
            self.__dict__["_pos_cache"] = cached
        t_max = cached[0]
        return [p[t_max - t : t_max + t - 1] for p in cached[3]]

    def _project_positions(self, t: int, dtype: mx.Dtype) -> list[mx.array]:
        table = rel_positional_encoding(t, self.cfg.d_model).astype(dtype)
        return [layer.self_attn.project_positions(table) for layer in self.layers]

    def __call__(self, features: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """features (B, T, F), valid frame counts (B,) -> encoded (B, T', D), encoded lengths (B,)."""
        return drain(self.stages(features, lengths, None))

    def stages(
        self, features: mx.array, lengths: mx.array, layers_per_stage: int | None
    ) -> Generator[mx.array, None, tuple]:
        """The encoder cut into stages: yields the hidden states after the subsampling and after every
        `layers_per_stage` layers (the caller may evaluate them and pause there; None: never), returns (encoded,
        lengths). The graph is the same as one call's, so the result is too."""
        x, lengths = self.pre_encode(features, lengths)
        if self.cfg.xscaling:
            x = x * math.sqrt(self.cfg.d_model)
        if layers_per_stage is not None:
            yield x
        t = x.shape[1]
        pos_proj = self.projected_positions(t, x.dtype)
        valid = _time_mask(lengths, t)  # (B, T)
        att_mask = ~(valid[:, None, :, None] & valid[:, None, None, :])  # (B, 1, T, T)
        pad_mask = valid[..., None]  # (B, T, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos_proj[i], att_mask, pad_mask)
            if layers_per_stage is not None and (i + 1) % layers_per_stage == 0 and i + 1 < len(self.layers):
                yield x
        return x, lengths
