"""Continuous batching for the decoder: sequences join and leave a shared decode loop at any step.

Every active sequence is one row of a shared batch. Per row we keep its own position, its self-attention
K/V (a preallocated (B, H, L, d_k) buffer that grows in steps), and its cross-attention K/V computed once
from its encoder states. A step feeds each row its last token at its own position; a finished row is removed
at once and a new one is prefilled and appended, so short requests never wait for long ones.

Each sequence is decoded exactly as NeMo decodes it alone (beam_size 1): its length limit is the one NeMo
computes from its own encoder length, positions are its own, and the masks hide other rows' padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from model.decoder import NEG_INF, causal_mask
from model.decoding import max_generation_length

CACHE_STEP = 128  # self-attention buffer growth, in positions


@dataclass(eq=False)
class Sequence:
    """One utterance (or chunk) to decode. `enc` is its projected encoder output (T_enc, H)."""

    enc: mx.array
    enc_len: int
    prompt: list[int]
    max_new_tokens: int
    tag: Any = None  # caller's handle (request, chunk index, ...)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False  # produced <|endoftext|> (False when it hit the length limit)
    cancelled: bool = False


def single_item_max_new_tokens(model, num_samples: int, prompt_len: int) -> int:
    """NeMo's limit for an utterance decoded alone: generated tokens <= max_generation_length + 1."""
    t_enc = encoder_frames(num_samples, model.config.preprocessor.hop_length, model.config.encoder.n_subsampling_convs)
    cfg = model.config
    limit = max_generation_length(t_enc, prompt_len, cfg.decoder.max_sequence_length, cfg.decoding.max_generation_delta)
    return limit + 1


def encoder_frames(num_samples: int, hop: int, n_convs: int) -> int:
    """Encoder output tensor length for one unpadded item (includes NeMo's extra padded STFT frame)."""
    t = num_samples // hop + 1
    for _ in range(n_convs):
        t = (t - 1) // 2 + 1
    return t


class BatchDecoder:
    """Greedy decoding of a changing set of sequences. Not thread-safe: owned by the engine thread."""

    def __init__(self, model) -> None:
        self.model = model
        dec = model.decoder
        self.n_layers = dec.cfg.num_layers
        self.heads = dec.cfg.num_attention_heads
        self.d_k = dec.cfg.hidden_size // self.heads
        self.eos = model.tokenizer.eos_id
        self.pad = model.tokenizer.pad_id
        self.rows: list[Sequence] = []
        self._reset()

    def _reset(self) -> None:
        self.self_k: list[mx.array] = []
        self.self_v: list[mx.array] = []
        self.cross_k: list[mx.array] = []
        self.cross_v: list[mx.array] = []
        self.cross_mask: mx.array | None = None  # (B, 1, 1, T) additive
        self.offsets: mx.array | None = None  # (B,) next position to write = tokens fed so far
        self.last: mx.array | None = None  # (B,) last generated token

    def __len__(self) -> int:
        return len(self.rows)

    # ---- joining ----------------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill new sequences (grouped by prompt length) and append them as rows.

        Returns those that finished already at their first token."""
        done: list[Sequence] = []
        by_len: dict[int, list[Sequence]] = {}
        for s in seqs:
            by_len.setdefault(len(s.prompt), []).append(s)
        for group in by_len.values():
            done += self._prefill(group)
        return done

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        model, dec = self.model, self.model.decoder
        n, p = len(seqs), len(seqs[0].prompt)
        t_max = max(s.enc.shape[0] for s in seqs)
        enc = mx.stack([mx.pad(s.enc, [(0, t_max - s.enc.shape[0]), (0, 0)]) for s in seqs])  # (n, T, H)
        enc_lens = mx.array([s.enc_len for s in seqs])
        cross_mask = mx.where(mx.arange(t_max)[None, :] < enc_lens[:, None], 0.0, NEG_INF).astype(enc.dtype)
        cross_mask = cross_mask[:, None, None, :]  # (n, 1, 1, T)
        cross = dec.cross_kv(enc)
        ids = mx.array([s.prompt for s in seqs], dtype=mx.int32)
        x = dec.embedding(ids, mx.arange(p))
        self_k, self_v = [], []
        mask = causal_mask(p, enc.dtype)
        for i, layer in enumerate(dec.layers):
            k, v = layer.first_sub_layer.kv(layer.layer_norm_1(x))
            self_k.append(k)
            self_v.append(v)
            x = layer(x, (k, v), mask, cross[i], cross_mask)
        logp = model.log_probs(dec.final_layer_norm(x[:, -1]))  # (n, V)
        first = mx.argmax(logp, axis=-1)
        first_lp = mx.take_along_axis(logp, first[:, None], axis=-1)[:, 0]
        self._append_rows(self_k, self_v, cross, cross_mask, mx.full((n,), p, mx.int32), first)
        self.rows += seqs
        return self._record(first, first_lp, range(len(self.rows) - n, len(self.rows)))

    def _append_rows(self, self_k, self_v, cross, cross_mask, offsets, last) -> None:
        if not self.rows:
            cap = _round_up(int(offsets.max().item()) + 1, CACHE_STEP)
            self.self_k = [_pad_axis(k, 2, cap) for k in self_k]
            self.self_v = [_pad_axis(v, 2, cap) for v in self_v]
            self.cross_k = [k for k, _ in cross]
            self.cross_v = [v for _, v in cross]
            self.cross_mask, self.offsets, self.last = cross_mask, offsets, last
            return
        cap = max(self.self_k[0].shape[2], _round_up(int(offsets.max().item()) + 1, CACHE_STEP))
        t_enc = max(self.cross_k[0].shape[2], cross[0][0].shape[2])
        join = _concat_padded
        self.self_k = [join(a, b, 2, cap) for a, b in zip(self.self_k, self_k, strict=True)]
        self.self_v = [join(a, b, 2, cap) for a, b in zip(self.self_v, self_v, strict=True)]
        self.cross_k = [join(a, k, 2, t_enc) for a, (k, _) in zip(self.cross_k, cross, strict=True)]
        self.cross_v = [join(a, v, 2, t_enc) for a, (_, v) in zip(self.cross_v, cross, strict=True)]
        self.cross_mask = join(self.cross_mask, cross_mask, 3, t_enc, NEG_INF)
        self.offsets = mx.concatenate([self.offsets, offsets])
        self.last = mx.concatenate([self.last, last])

    # ---- stepping ---------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Advance every row by one token. Returns the sequences that finished (and left) at this step."""
        if not self.rows:
            return []
        self._ensure_capacity()
        dec = self.model.decoder
        b, cap = len(self.rows), self.self_k[0].shape[2]
        positions = self.offsets[:, None]  # (B, 1)
        x = dec.embedding(self.last[:, None], positions)
        key_pos = mx.arange(cap)[None, :]
        self_mask = mx.where(key_pos <= positions, 0.0, NEG_INF).astype(x.dtype)[:, None, None, :]  # (B,1,1,L)
        write_idx = mx.broadcast_to(self.offsets[:, None, None, None], (b, self.heads, 1, self.d_k))
        for i, layer in enumerate(dec.layers):
            k, v = layer.first_sub_layer.kv(layer.layer_norm_1(x))  # (B, H, 1, d_k)
            self.self_k[i] = mx.put_along_axis(self.self_k[i], write_idx, k, axis=2)
            self.self_v[i] = mx.put_along_axis(self.self_v[i], write_idx, v, axis=2)
            kv = (self.self_k[i], self.self_v[i])
            x = layer(x, kv, self_mask, (self.cross_k[i], self.cross_v[i]), self.cross_mask)
        logp = self.model.log_probs(dec.final_layer_norm(x[:, -1]))  # (B, V)
        token = mx.argmax(logp, axis=-1)
        token_lp = mx.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        self.offsets = self.offsets + 1
        self.last = token
        return self._record(token, token_lp, range(b))

    def _record(self, token: mx.array, token_lp: mx.array, rows: range) -> list[Sequence]:
        """Host side: append this step's tokens; drop rows that finished. One sync per step."""
        mx.eval(token, token_lp, self.offsets, *self.self_k, *self.self_v)
        tokens = np.array(token).tolist()
        lps = np.array(token_lp).tolist()
        done = []
        for r, t, lp in zip(rows, tokens[-len(rows) :], lps[-len(rows) :], strict=True):
            s = self.rows[r]
            if t in (self.eos, self.pad):
                s.finished = True
                done.append(s)
                continue
            s.tokens.append(t)
            s.logprobs.append(lp)
            if len(s.tokens) >= s.max_new_tokens or s.cancelled:
                done.append(s)
        if done:
            self.remove(done)
        return done

    def remove(self, seqs: list[Sequence]) -> None:
        """Drop rows (finished or cancelled) from the batch."""
        drop = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self.rows) if id(s) not in drop]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._reset()
            return
        idx = mx.array(keep)
        self.self_k = [k[idx] for k in self.self_k]
        self.self_v = [v[idx] for v in self.self_v]
        self.cross_k = [k[idx] for k in self.cross_k]
        self.cross_v = [v[idx] for v in self.cross_v]
        self.cross_mask, self.offsets, self.last = self.cross_mask[idx], self.offsets[idx], self.last[idx]

    def _ensure_capacity(self) -> None:
        cap = self.self_k[0].shape[2]
        need = int(self.offsets.max().item()) + 1
        if need > cap:
            new_cap = _round_up(need, CACHE_STEP)
            self.self_k = [_pad_axis(k, 2, new_cap) for k in self.self_k]
            self.self_v = [_pad_axis(v, 2, new_cap) for v in self.self_v]


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _pad_axis(x: mx.array, axis: int, size: int, value: float = 0.0) -> mx.array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return mx.pad(x, widths, constant_values=value)


def _concat_padded(a: mx.array, b: mx.array, axis: int, size: int, value: float = 0.0) -> mx.array:
    return mx.concatenate([_pad_axis(a, axis, size, value), _pad_axis(b, axis, size, value)], axis=0)
