"""Preallocated self-attention KV cache for the decoder, laid out (B, H, T, d_k)."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """One (keys, values) buffer pair per layer, allocated once for `max_len` positions."""

    def __init__(self, num_layers: int, batch: int, n_heads: int, max_len: int, d_k: int, dtype: mx.Dtype) -> None:
        shape = (batch, n_heads, max_len, d_k)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.offset = 0
        self.max_len = max_len

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v (B, H, T, d_k) at the current offset; return the filled prefix of the buffers."""
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.keys[layer][:, :, self.offset : end, :] = k
        self.values[layer][:, :, self.offset : end, :] = v
        return self.keys[layer][:, :, :end, :], self.values[layer][:, :, :end, :]

    def advance(self, n: int) -> None:
        self.offset += n
