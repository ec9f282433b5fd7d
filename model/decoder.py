"""NeMo TransformerDecoder (pre-LN, final LN) with a preallocated self-attention KV cache.

Reference §3. Cross-attention K/V are computed once per utterance (`cross_kv`), never inside the token loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernels
from .cache import KVCache
from .config import DecoderConfig

NEG_INF = -10000.0  # nemo/collections/common/parts/transformer_utils.py NEG_INF
LN_EPS = 1e-5


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int) -> None:
        super().__init__()
        self.h, self.d_k = n_heads, hidden // n_heads
        self.scale = 1.0 / math.sqrt(self.d_k)  # NeMo scales q and k by d_k^-1/4 each
        self.query_net = nn.Linear(hidden, hidden)
        self.key_net = nn.Linear(hidden, hidden)
        self.value_net = nn.Linear(hidden, hidden)
        self.out_projection = nn.Linear(hidden, hidden)

    def heads(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.h, self.d_k).transpose(0, 2, 1, 3)  # (B, H, T, d_k)

    def kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return self.heads(self.key_net(x)), self.heads(self.value_net(x))

    def attend(self, x: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        return self.attend_heads(self.heads(self.query_net(x)), k, v, mask)

    def attend_heads(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        """Attention of queries already split into heads (B, H, T, d_k) -> (B, T, D)."""
        b, _, t, _ = q.shape
        out = cpu_kernels.attention(q, k, v, self.scale, mask)  # MLX's, or one pass for a decoder step on a CPU
        return self.out_projection(out.transpose(0, 2, 1, 3).reshape(b, t, -1))  # (B, T, D)


class PositionWiseFF(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense_in = nn.Linear(hidden, inner)
        self.dense_out = nn.Linear(inner, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.dense_out(nn.relu(self.dense_in(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.layer_norm_1 = nn.LayerNorm(h, eps=LN_EPS)
        self.first_sub_layer = MultiHeadAttention(h, cfg.num_attention_heads)
        self.layer_norm_2 = nn.LayerNorm(h, eps=LN_EPS)
        self.second_sub_layer = MultiHeadAttention(h, cfg.num_attention_heads)
        self.layer_norm_3 = nn.LayerNorm(h, eps=LN_EPS)
        self.third_sub_layer = PositionWiseFF(h, cfg.inner_size)

    def __call__(
        self,
        x: mx.array,
        self_kv: tuple[mx.array, mx.array],
        self_mask: mx.array | None,
        cross_kv: tuple[mx.array, mx.array],
        cross_mask: mx.array,
    ) -> mx.array:
        x = x + self.first_sub_layer.attend(cpu_kernels.apply_layer_norm(self.layer_norm_1, x), *self_kv, self_mask)
        return self.cross_and_ff(x, cross_kv, cross_mask)

    def with_cache(
        self,
        x: mx.array,
        write_kv: Callable[[mx.array, mx.array], tuple[mx.array, mx.array]],
        self_mask: mx.array | None,
        cross_kv: tuple[mx.array, mx.array],
        cross_mask: mx.array,
    ) -> mx.array:
        """The block with a self-attention cache: `write_kv(k, v)` stores x's new K/V and returns what attention
        sees. Same math as `__call__`; layer_norm_1 is computed once for the queries and the new K/V."""
        att = self.first_sub_layer
        h = cpu_kernels.apply_layer_norm(self.layer_norm_1, x)
        k, v = write_kv(*att.kv(h))
        x = x + att.attend_heads(att.heads(att.query_net(h)), k, v, self_mask)
        return self.cross_and_ff(x, cross_kv, cross_mask)

    def cross_and_ff(self, x: mx.array, cross_kv: tuple[mx.array, mx.array], cross_mask: mx.array) -> mx.array:
        x = x + self.second_sub_layer.attend(cpu_kernels.apply_layer_norm(self.layer_norm_2, x), *cross_kv, cross_mask)
        return x + self.third_sub_layer(cpu_kernels.apply_layer_norm(self.layer_norm_3, x))


class FixedPositionalEncoding(nn.Module):
    def __init__(self, max_len: int, hidden: int) -> None:
        super().__init__()
        self.pos_enc = mx.zeros((max_len, hidden))  # loaded from the checkpoint (persistent buffer)


class TransformerEmbedding(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = FixedPositionalEncoding(cfg.max_sequence_length, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)

    def __call__(self, ids: mx.array, positions: mx.array) -> mx.array:
        """ids (B, T), positions (B, T) or (T,) -> (B, T, H). No sqrt(d) scaling (NeMo)."""
        # Decoding never uses a position past the table (prompts are checked, lengths capped); the clamp keeps
        # the speculative step a finished row is still part of from reading past it (MLX gathers are unchecked).
        positions = mx.minimum(positions, self.position_embedding.pos_enc.shape[0] - 1)
        tokens = self.token_embedding(ids)
        pos = self.position_embedding.pos_enc[positions].astype(tokens.dtype)
        return cpu_kernels.apply_layer_norm(self.layer_norm, tokens + pos)


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = TransformerEmbedding(cfg)
        self.layers = [DecoderBlock(cfg) for _ in range(cfg.num_layers)]
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)

    def cross_kv(self, enc: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Per-layer cross-attention K/V (B, H, T_enc, d_k), computed once per utterance."""
        return [layer.second_sub_layer.kv(enc) for layer in self.layers]

    def __call__(
        self,
        ids: mx.array,
        positions: mx.array,
        cross: list[tuple[mx.array, mx.array]],
        cross_mask: mx.array,
        cache: KVCache | None = None,
        self_mask: mx.array | None = None,
    ) -> mx.array:
        """ids (B, T) at `positions` -> final-LN hidden states (B, T, H).

        With a cache, the new K/V are written at `cache.offset` and attention sees every cached position;
        `self_mask` (additive, broadcastable to (B, H, T, T_cache)) adds causality / padding."""
        x = self.embedding(ids, positions)
        for i, layer in enumerate(self.layers):
            write = _no_cache if cache is None else functools.partial(cache.update, i)
            x = layer.with_cache(x, write, self_mask, cross[i], cross_mask)
        if cache is not None:
            cache.advance(ids.shape[1])
        return cpu_kernels.apply_layer_norm(self.final_layer_norm, x)


def _no_cache(k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    return k, v


def cross_attention_mask(enc_lengths: mx.array, t_enc: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive mask (B, 1, 1, T_enc): NEG_INF on encoder frames >= encoded length."""
    valid = mx.arange(t_enc)[None, :] < enc_lengths[:, None]
    return mx.where(valid, 0.0, NEG_INF).astype(dtype)[:, None, None, :]


def causal_mask(t: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive (T, T) causal mask with NeMo's NEG_INF."""
    idx = mx.arange(t)
    return mx.where(idx[None, :] <= idx[:, None], 0.0, NEG_INF).astype(dtype)
