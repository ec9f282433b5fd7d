"""The greedy batch decoder as a step machine: sequences join and leave a shared decode loop at any step.

Every active sequence is one row of a shared batch. Per row we keep its own position, its self-attention
K/V (a preallocated (B, H, L, d_k) buffer that grows in steps), and its cross-attention K/V computed once
from its encoder states. A step feeds each row its last token at its own position; a finished row is removed
at once and a new one is prefilled and appended. The decoder knows nothing of requests: the pipeline's scheduler
decides who joins, leaves or is parked.

Each sequence is decoded exactly as NeMo decodes it alone (beam_size 1): its length limit is the one NeMo
computes from its own encoder length, positions are its own, and the masks hide other rows' padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from . import backend, cpu_kernels
from .decoder import NEG_INF, causal_mask
from .errors import PromptTooLong

# Self-attention buffer growth, in positions. A compiled step (the GPU paths) compiles again for every new length,
# so it grows in large steps; an uncompiled one (the CPU paths) in small ones, because joining or removing rows copies
# every row's whole buffer: 32 instead of 128 positions made concurrency 16 ~4% faster there (bench/engine_split.py,
# 5 s clips, whose ~30 positions fit in 32) and each row's buffers a quarter of the size.
CACHE_STEP = 128
CACHE_STEP_UNCOMPILED = 32


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
    score: float | None = None  # beam search: the best hypothesis' penalised score
    overflowed: bool = False  # float16/bfloat16: its logits were inf/NaN; it left unfinished (recompute in float32)
    keywords: Any = None  # model.boosting.BoostingTree: phrase boosting (beam decoders only), None: none
    keywords_alpha: float = 0.0  # its weight (NeMo's boosting_tree_alpha)


@dataclass(eq=False)
class Parked:
    """Rows taken out of a BatchDecoder with their state (self/cross K/V, masks, positions, last tokens)."""

    seqs: list[Sequence]
    self_k: list[mx.array]
    self_v: list[mx.array]
    cross: list[tuple[mx.array, mx.array]]
    cross_mask: mx.array
    positions: list[int]
    last: mx.array


class BatchDecoder:
    """Greedy decoding of a changing set of sequences. Not thread-safe: owned by the engine thread.

    Steps are pipelined: step t+1 is dispatched (`mx.async_eval`) before the host reads step t's tokens,
    so graph building overlaps compute; a row that finished at step t is dropped from step t+1's output.
    `compile=True` runs the step through `mx.compile` (default: only with the GPU paths, model/backend.py: on the
    CPU backend compilation made the step slower and costs seconds per new batch shape)."""

    def __init__(self, model, compile: bool | None = None) -> None:
        self.model = model
        dec = model.decoder
        self.heads = dec.cfg.num_attention_heads
        self.d_k = dec.cfg.hidden_size // self.heads
        self.eos = model.tokenizer.eos_id
        self.pad = model.tokenizer.pad_id
        self.guard = model.guards_overflow
        if compile is None:
            compile = not backend.cpu_paths()
        self._step_fn = mx.compile(self._forward) if compile else self._forward
        self.cache_step = CACHE_STEP if compile else CACHE_STEP_UNCOMPILED
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
        self.positions: list[int] = []  # host copy of offsets (no sync needed to size the cache)
        self._inflight: tuple[mx.array, mx.array, list[Sequence]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    # ---- joining ----------------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill new sequences (grouped by prompt length) and append them as rows.

        Returns those that finished already at their first token. A prompt longer than the decoder's position
        table raises PromptTooLong (nothing is added); lengths are capped at the table."""
        table = self.model.decoder.cfg.max_sequence_length
        for s in seqs:
            check_prompt_length(len(s.prompt), table)
        done: list[Sequence] = []
        by_len: dict[int, list[Sequence]] = {}
        for s in seqs:
            # The k-th generated token (k >= 2) is computed at position P + k - 2: at most the table's last.
            s.max_new_tokens = min(s.max_new_tokens, table - len(s.prompt) + 1)
            by_len.setdefault(len(s.prompt), []).append(s)
        for group in by_len.values():
            done += self._prefill(group)
        return done

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        self_k, self_v, cross, cross_mask, logits = self._run_prompts(seqs)
        token, token_lp = cpu_kernels.pick(logits)  # greedy token and its log-softmax
        self._append_rows(self_k, self_v, cross, cross_mask, len(seqs[0].prompt), token)
        self.rows += seqs
        return self._collect(token, token_lp, seqs)

    def _run_prompts(self, seqs: list[Sequence]):
        """Equal-length prompts through the decoder: per-layer self K/V (n, H, P, d_k), cross K/V, the cross
        mask (n, 1, 1, T) and the logits at the last prompt position (n, V)."""
        dec = self.model.decoder
        p = len(seqs[0].prompt)
        t_max = max(s.enc.shape[0] for s in seqs)
        enc = mx.stack([pad_axis(s.enc, 0, t_max) for s in seqs])  # (n, T, H)
        enc_lens = mx.array([s.enc_len for s in seqs])
        cross_mask = mx.where(mx.arange(t_max)[None, :] < enc_lens[:, None], 0.0, NEG_INF).astype(enc.dtype)
        cross_mask = cross_mask[:, None, None, :]  # (n, 1, 1, T)
        cross = [(mx.contiguous(k), mx.contiguous(v)) for k, v in dec.cross_kv(enc)]  # read every step: no views
        x = dec.embedding(mx.array([s.prompt for s in seqs], dtype=mx.int32), mx.arange(p))
        self_k, self_v = [], []
        mask = causal_mask(p, enc.dtype)

        def keep(k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
            self_k.append(k)
            self_v.append(v)
            return k, v

        for i, layer in enumerate(dec.layers):
            x = layer.with_cache(x, keep, mask, cross[i], cross_mask)
        return (
            self_k,
            self_v,
            cross,
            cross_mask,
            self.model.logits(cpu_kernels.apply_layer_norm(dec.final_layer_norm, x[:, -1])),
        )

    def _append_rows(self, self_k, self_v, cross, cross_mask, positions: int | list[int], last: mx.array) -> None:
        """Append rows with their state: self K/V (n, H, L', d_k), cross K/V, cross mask, next positions."""
        n = last.shape[0]
        positions = [positions] * n if isinstance(positions, int) else list(positions)
        offsets = mx.array(positions, dtype=mx.int32)
        cap = max(round_up(max(self.positions + positions) + 1, self.cache_step), self_k[0].shape[2])
        self.positions += positions
        if not self.rows:
            self.self_k = [pad_axis(k, 2, cap) for k in self_k]
            self.self_v = [pad_axis(v, 2, cap) for v in self_v]
            self.cross_k = [k for k, _ in cross]
            self.cross_v = [v for _, v in cross]
            self.cross_mask, self.offsets, self.last = cross_mask, offsets, last
            return
        cap = max(cap, self.self_k[0].shape[2])
        t_enc = max(self.cross_k[0].shape[2], cross[0][0].shape[2])
        join = _concat_padded
        self.self_k = [join(a, b, 2, cap) for a, b in zip(self.self_k, self_k, strict=True)]
        self.self_v = [join(a, b, 2, cap) for a, b in zip(self.self_v, self_v, strict=True)]
        self.cross_k = [join(a, k, 2, t_enc) for a, (k, _) in zip(self.cross_k, cross, strict=True)]
        self.cross_v = [join(a, v, 2, t_enc) for a, (_, v) in zip(self.cross_v, cross, strict=True)]
        self.cross_mask = join(self.cross_mask, cross_mask, 3, t_enc, NEG_INF)
        self.offsets = mx.concatenate([self.offsets, offsets])
        self.last = mx.concatenate([self.last, last])

    # ---- parking ----------------------------------------------------------------------------------------
    def park(self, seqs: list[Sequence]) -> tuple[Parked | None, list[Sequence]]:
        """Take rows out of the loop with their whole state (to let shorter requests decode alone).

        Returns the parked rows (or None) and the sequences that finished in the step that was in flight."""
        done = self._flush()
        wanted = {id(s) for s in seqs}
        idx = [i for i, s in enumerate(self.rows) if id(s) in wanted]
        if not idx:
            return None, done
        ia = mx.array(idx)
        parked = Parked(
            seqs=[self.rows[i] for i in idx],
            self_k=[a[ia] for a in self.self_k],
            self_v=[a[ia] for a in self.self_v],
            cross=[(k[ia], v[ia]) for k, v in zip(self.cross_k, self.cross_v, strict=True)],
            cross_mask=self.cross_mask[ia],
            positions=[self.positions[i] for i in idx],
            last=self.last[ia],
        )
        self.remove(parked.seqs)
        return parked, done

    def unpark(self, parked: Parked) -> None:
        """Put parked rows back; they continue exactly where they stopped."""
        self._append_rows(parked.self_k, parked.self_v, parked.cross, parked.cross_mask, parked.positions, parked.last)
        self.rows += parked.seqs

    def _flush(self) -> list[Sequence]:
        """Collect the step in flight (if any) so that the batch state matches the host's view."""
        if self._inflight is None:
            return []
        current, self._inflight = self._inflight, None
        return self._collect(*current)

    # ---- stepping ---------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Advance every row by one token. Returns the sequences that left the batch at this step."""
        if not self.rows:
            return []
        current = self._inflight or self._dispatch()
        self._inflight = self._dispatch()  # built on current's device tokens: overlaps with the host work
        return self._collect(*current)

    def _dispatch(self) -> tuple[mx.array, mx.array, list[Sequence]]:
        need = max(self.positions) + 1
        if need > self.self_k[0].shape[2]:
            cap = round_up(need, self.cache_step)
            self.self_k = [pad_axis(k, 2, cap) for k in self.self_k]
            self.self_v = [pad_axis(v, 2, cap) for v in self.self_v]
        token, token_lp, self.self_k, self.self_v = self._step_fn(
            self.last, self.offsets, self.self_k, self.self_v, self.cross_k, self.cross_v, self.cross_mask
        )
        self.offsets = self.offsets + 1
        self.positions = [p + 1 for p in self.positions]
        self.last = token
        mx.async_eval(token, token_lp, self.self_k, self.self_v)
        return token, token_lp, list(self.rows)

    def _forward(self, last, offsets, self_k, self_v, cross_k, cross_v, cross_mask):
        """One greedy decoder step for every row at its own position (pure: compilable)."""
        logits, new_k, new_v = self._forward_logits(last, offsets, self_k, self_v, cross_k, cross_v, cross_mask)
        token, token_lp = cpu_kernels.pick(logits)  # greedy token and its log-softmax
        return token, token_lp, new_k, new_v

    def _forward_logits(self, last, offsets, self_k, self_v, cross_k, cross_v, cross_mask):
        """Feed each row's last token at its own position: logits (B, V) and the updated self K/V buffers."""
        dec = self.model.decoder
        b, cap = last.shape[0], self_k[0].shape[2]
        positions = offsets[:, None]  # (B, 1)
        x = dec.embedding(last[:, None], positions)
        self_mask = mx.where(mx.arange(cap)[None, :] <= positions, 0.0, NEG_INF).astype(x.dtype)
        self_mask = self_mask[:, None, None, :]  # (B, 1, 1, L): each row sees its own past only
        if cpu_kernels.usable(self_k[0]):  # rows copied into the buffers, in place (MLX's scatter is a scalar loop)

            def put(cache: mx.array, new: mx.array) -> mx.array:
                return cpu_kernels.kv_write(cache, offsets, new)

        else:
            write_idx = mx.broadcast_to(offsets[:, None, None, None], (b, self.heads, 1, self.d_k))

            def put(cache: mx.array, new: mx.array) -> mx.array:
                return mx.put_along_axis(cache, write_idx, new, axis=2)

        new_k, new_v = [], []

        def write(i: int):
            def at_offsets(k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:  # k, v (B, H, 1, d_k)
                new_k.append(put(self_k[i], k))
                new_v.append(put(self_v[i], v))
                return new_k[i], new_v[i]

            return at_offsets

        for i, layer in enumerate(dec.layers):
            x = layer.with_cache(x, write(i), self_mask, (cross_k[i], cross_v[i]), cross_mask)
        return self.model.logits(cpu_kernels.apply_layer_norm(dec.final_layer_norm, x[:, -1])), new_k, new_v

    def _collect(self, token: mx.array, token_lp: mx.array, seqs: list[Sequence]) -> list[Sequence]:
        """Host side: append one step's tokens (one sync), then drop the rows that are done."""
        tokens = np.array(token).tolist()
        lps = np.array(token_lp).tolist()
        present = {id(s) for s in self.rows}
        done = []
        for s, t, lp in zip(seqs, tokens, lps, strict=True):
            if id(s) not in present:
                continue  # left the batch after this step was dispatched
            if s.cancelled:
                done.append(s)
            elif self.guard and not math.isfinite(lp):  # inf/NaN logits give a non-finite log-prob: overflow
                s.overflowed = True
                done.append(s)
            elif t in (self.eos, self.pad):  # NeMo treats <pad> like <|endoftext|>
                s.finished = True
                done.append(s)
            else:
                s.tokens.append(t)
                s.logprobs.append(lp)
                if len(s.tokens) >= s.max_new_tokens:
                    done.append(s)
        self.remove(done)
        return done

    def remove(self, seqs: list[Sequence]) -> None:
        """Drop rows (finished or cancelled) from the batch and from the step in flight."""
        drop = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self.rows) if id(s) not in drop]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows = []
            self._reset()
            return
        idx = mx.array(keep)
        self.rows = [self.rows[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        self.self_k = [k[idx] for k in self.self_k]
        self.self_v = [v[idx] for v in self.self_v]
        self.cross_k = [k[idx] for k in self.cross_k]
        self.cross_v = [v[idx] for v in self.cross_v]
        self.cross_mask, self.offsets, self.last = self.cross_mask[idx], self.offsets[idx], self.last[idx]
        if self._inflight is not None:
            token, token_lp, snapshot = self._inflight
            kept = [i for i, s in enumerate(snapshot) if id(s) not in drop]
            kidx = mx.array(kept)
            self._inflight = (token[kidx], token_lp[kidx], [snapshot[i] for i in kept])


def check_prompt_length(prompt_len: int, max_sequence_length: int) -> None:
    """The prompt must fit the decoder's position table (positions 0..max_sequence_length-1); a longer one is
    refused, never run past the table (NeMo fails on it with an IndexError)."""
    if prompt_len > max_sequence_length:
        raise PromptTooLong(prompt_len, max_sequence_length)


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def pad_axis(x: mx.array, axis: int, size: int, value: float = 0.0) -> mx.array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return mx.pad(x, widths, constant_values=value)


def _concat_padded(a: mx.array, b: mx.array, axis: int, size: int, value: float = 0.0) -> mx.array:
    return mx.concatenate([pad_axis(a, axis, size, value), pad_axis(b, axis, size, value)], axis=0)
