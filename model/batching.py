"""Continuous batching for the decoder: sequences join and leave a shared decode loop at any step.

Every active sequence is one row of a shared batch. Per row we keep its own position, its self-attention
K/V (a preallocated (B, H, L, d_k) buffer that grows in steps), and its cross-attention K/V computed once
from its encoder states. A step feeds each row its last token at its own position; a finished row is removed
at once and a new one is prefilled and appended, so short requests never wait for long ones.

Each sequence is decoded exactly as NeMo decodes it alone (beam_size 1): its length limit is the one NeMo
computes from its own encoder length, positions are its own, and the masks hide other rows' padding.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from model.audio import pad_to_min_duration
from model.conformer import drain
from model.decoder import NEG_INF, causal_mask
from model.decoding import max_generation_length
from model.prompt import PromptSpec

log = logging.getLogger("canary.batching")

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
    score: float | None = None  # beam search: the best hypothesis' penalised score


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
    `compile=True` runs the step through `mx.compile` (default: only on a GPU backend: on the CPU backend
    compilation made the step slower and costs seconds per new batch shape)."""

    def __init__(self, model, compile: bool | None = None) -> None:
        self.model = model
        dec = model.decoder
        self.heads = dec.cfg.num_attention_heads
        self.d_k = dec.cfg.hidden_size // self.heads
        self.eos = model.tokenizer.eos_id
        self.pad = model.tokenizer.pad_id
        if compile is None:
            compile = mx.default_device() == mx.gpu
        self._step_fn = mx.compile(self._forward) if compile else self._forward
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

        Returns those that finished already at their first token."""
        done: list[Sequence] = []
        by_len: dict[int, list[Sequence]] = {}
        for s in seqs:
            by_len.setdefault(len(s.prompt), []).append(s)
        for group in by_len.values():
            done += self._prefill(group)
        return done

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        self_k, self_v, cross, cross_mask, logits = self._run_prompts(seqs)
        token, token_lp = _pick(logits)
        self._append_rows(self_k, self_v, cross, cross_mask, len(seqs[0].prompt), token)
        self.rows += seqs
        return self._collect(token, token_lp, seqs)

    def _run_prompts(self, seqs: list[Sequence]):
        """Equal-length prompts through the decoder: per-layer self K/V (n, H, P, d_k), cross K/V, the cross
        mask (n, 1, 1, T) and the logits at the last prompt position (n, V)."""
        dec = self.model.decoder
        p = len(seqs[0].prompt)
        t_max = max(s.enc.shape[0] for s in seqs)
        enc = mx.stack([_pad_axis(s.enc, 0, t_max) for s in seqs])  # (n, T, H)
        enc_lens = mx.array([s.enc_len for s in seqs])
        cross_mask = mx.where(mx.arange(t_max)[None, :] < enc_lens[:, None], 0.0, NEG_INF).astype(enc.dtype)
        cross_mask = cross_mask[:, None, None, :]  # (n, 1, 1, T)
        cross = [(mx.contiguous(k), mx.contiguous(v)) for k, v in dec.cross_kv(enc)]  # read every step: no views
        x = dec.embedding(mx.array([s.prompt for s in seqs], dtype=mx.int32), mx.arange(p))
        self_k, self_v = [], []
        mask = causal_mask(p, enc.dtype)
        for i, layer in enumerate(dec.layers):
            k, v = layer.first_sub_layer.kv(layer.layer_norm_1(x))
            self_k.append(k)
            self_v.append(v)
            x = layer(x, (k, v), mask, cross[i], cross_mask)
        return self_k, self_v, cross, cross_mask, self.model.logits(dec.final_layer_norm(x[:, -1]))

    def _append_rows(self, self_k, self_v, cross, cross_mask, positions: int | list[int], last: mx.array) -> None:
        """Append rows with their state: self K/V (n, H, L', d_k), cross K/V, cross mask, next positions."""
        n = last.shape[0]
        positions = [positions] * n if isinstance(positions, int) else list(positions)
        offsets = mx.array(positions, dtype=mx.int32)
        cap = max(_round_up(max(self.positions + positions) + 1, CACHE_STEP), self_k[0].shape[2])
        self.positions += positions
        if not self.rows:
            self.self_k = [_pad_axis(k, 2, cap) for k in self_k]
            self.self_v = [_pad_axis(v, 2, cap) for v in self_v]
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
            cap = _round_up(need, CACHE_STEP)
            self.self_k = [_pad_axis(k, 2, cap) for k in self.self_k]
            self.self_v = [_pad_axis(v, 2, cap) for v in self.self_v]
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
        token, token_lp = _pick(logits)
        return token, token_lp, new_k, new_v

    def _forward_logits(self, last, offsets, self_k, self_v, cross_k, cross_v, cross_mask):
        """Feed each row's last token at its own position: logits (B, V) and the updated self K/V buffers."""
        dec = self.model.decoder
        b, cap = last.shape[0], self_k[0].shape[2]
        positions = offsets[:, None]  # (B, 1)
        x = dec.embedding(last[:, None], positions)
        self_mask = mx.where(mx.arange(cap)[None, :] <= positions, 0.0, NEG_INF).astype(x.dtype)
        self_mask = self_mask[:, None, None, :]  # (B, 1, 1, L): each row sees its own past only
        write_idx = mx.broadcast_to(offsets[:, None, None, None], (b, self.heads, 1, self.d_k))
        new_k, new_v = [], []
        for i, layer in enumerate(dec.layers):
            k, v = layer.first_sub_layer.kv(layer.layer_norm_1(x))  # (B, H, 1, d_k)
            new_k.append(mx.put_along_axis(self_k[i], write_idx, k, axis=2))
            new_v.append(mx.put_along_axis(self_v[i], write_idx, v, axis=2))
            x = layer(x, (new_k[i], new_v[i]), self_mask, (cross_k[i], cross_v[i]), cross_mask)
        return self.model.logits(dec.final_layer_norm(x[:, -1])), new_k, new_v

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


def _pick(logits: mx.array) -> tuple[mx.array, mx.array]:
    """Greedy token on the device and its log-probability."""
    token = mx.argmax(logits, axis=-1)
    lse = mx.logsumexp(logits, axis=-1)
    return token, mx.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - lse


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


@dataclass(eq=False)
class WorkItem:
    """One piece of audio (a request, or a chunk of a long one) for the `ContinuousBatcher`.

    `priority`: lower runs first (the engine uses the seconds of audio of the item's request, so a short request
    is never stuck behind a long file's chunks). `group`: items of one request (the engine's job); while the group
    makes progress its waiting items do not age. On completion exactly one of result / error is set."""

    audio: np.ndarray  # float32, 16 kHz mono
    spec: PromptSpec
    tag: Any = None
    priority: float = 0.0
    group: Any = None
    result: Any = None  # model.canary.Transcription
    error: BaseException | None = None
    cancelled: bool = False
    _seq: Sequence | None = field(default=None, repr=False)


@dataclass(eq=False)
class _Encoding:
    """A padded encoder batch in progress, evaluated one stage per `step()`."""

    items: list[WorkItem]
    prompts: list[list[int] | BaseException]
    waves: list[np.ndarray]
    stages: Generator[mx.array, None, tuple]


# Waiting 1 s (without the request making progress) makes it compete like one 10 s of audio shorter.
AGING_PER_SECOND = 10.0
# Rows (and encodes) of a request this much longer than the shortest one in progress step aside until it is done.
PARK_RATIO, PARK_MARGIN_SECONDS = 3.0, 20.0
# An encoder batch runs in about this many + 1 pieces (subsampling, groups of layers), one per step, so that
# a short request arriving during a long batch's encoding waits for one piece, not the whole batch.
ENCODE_STAGES = 6


class ContinuousBatcher:
    """Encoder admission + the shared decoder loop. `step()` evaluates one stage of the encoder batch in progress
    (padded, masked, at most `encode_seconds` of audio; a new one is started from the waiting items while the
    decoder has room), then advances every active sequence by one token. Items of any language / task / prompt
    share the same decoder batch.

    Scheduling (greedy decoding): shortest request first, by `WorkItem.priority` aged by waiting time. Longer
    work is not started while shorter requests decode; an encode in progress of a much longer request is paused
    for a short one (its stages resume afterwards), and decoder rows of much longer requests are parked while
    shorter work is encoding or decoding, so a short request runs at nearly its idle speed during a long file."""

    def __init__(
        self,
        model,
        max_batch: int = 16,
        encode_seconds: float = 30.0,
        compile: bool | None = None,
        beam_size: int = 1,
        length_penalty: float = 0.0,
        encode_stages: int = ENCODE_STAGES,
    ):
        self.model = model
        self.max_batch = max_batch
        self.encode_seconds = encode_seconds
        self.encode_stages = encode_stages
        self._new_decoder = lambda: (
            BeamBatchDecoder(model, beam_size, length_penalty)
            if beam_size > 1
            else BatchDecoder(model, compile=compile)
        )
        self.decoder = self._new_decoder()
        self.waiting: list[WorkItem] = []
        self.encoding: list[_Encoding] = []  # in progress; the last one runs, earlier ones were paused for it
        self.parked: list[Parked] = []
        self._order = 0  # FIFO tie-break among equal priorities

    def __len__(self) -> int:
        return len(self.waiting) + self._encoding_count() + len(self.decoder) + self._parked_count()

    def _parked_count(self) -> int:
        return sum(len(p.seqs) for p in self.parked)

    def _encoding_count(self) -> int:
        return sum(len(e.items) for e in self.encoding)

    def submit(self, items: list[WorkItem]) -> None:
        now = time.monotonic()
        for item in items:
            self._order += 1
            item._order, item._since = self._order, now  # type: ignore[attr-defined]
            self.waiting.append(item)

    def _urgency(self, item: WorkItem, now: float) -> float:
        """Lower is more urgent: the item's priority, aged by its waiting time so that nothing starves."""
        return item.priority - AGING_PER_SECOND * (now - item._since)  # type: ignore[attr-defined]

    def _waiting_again(self, items: list[WorkItem], now: float) -> None:
        """Paused or parked items wait (and age) from now."""
        for item in items:
            item._since = now  # type: ignore[attr-defined]

    def cancel(self, items: list[WorkItem]) -> None:
        """Forget waiting items; encoding ones are dropped with their batch or leave the decoder at its first step,
        active ones at its next step."""
        drop = {id(it) for it in items}
        self.waiting = [it for it in self.waiting if id(it) not in drop]
        for it in items:
            it.cancelled = True
            if it._seq is not None:
                it._seq.cancelled = True
        self.encoding = [e for e in self.encoding if not all(it.cancelled for it in e.items)]

    def partial_text(self, item: WorkItem) -> str:
        """The text decoded so far for an item (final once it has a result; beam search: only final)."""
        if item.result is not None:
            return item.result.text
        seq = item._seq
        if seq is None or isinstance(self.decoder, BeamBatchDecoder) or not seq.tokens:
            return ""
        return self.model.tokenizer.ids_to_text(seq.tokens).strip()

    def step(self) -> list[WorkItem]:
        """One stage of the encoder batch in progress (starting one from the waiting items when the decoder has
        room); once no encode is left mid-way, one decoder step. Returns items that completed (result or error).

        The decoder waits while a batch is encoded, as it would for a one-piece encode: on a CPU, decoder steps
        between the stages would run at smaller batches and cost more steps in all. The stages only give the
        caller (the engine) a chance to submit a short request, which then pauses a longer encode."""
        done, encoding = self._encode_step()
        done += [self._finish(s) for s in self._rebalance()]
        if encoding:
            return done
        try:
            finished = self.decoder.step()
        except Exception as exc:  # never seen in practice; fail the active items, keep the engine alive
            log.exception("decoder step failed")
            finished = list(self.decoder.rows)
            self.decoder = self._new_decoder()
            for seq in finished:
                seq.tag.error = exc
            return done + [s.tag for s in finished]
        return done + [self._finish(s) for s in finished]

    # ---- scheduling -------------------------------------------------------------------------------------
    def _shortest_in_progress(self) -> float | None:
        """The lowest priority among decoding rows and the encode that is running (parked rows excluded)."""
        prios = [s.tag.priority for s in self.decoder.rows]
        if self.encoding:
            prios += [it.priority for it in self.encoding[-1].items]
        return min(prios, default=None)

    def _rebalance(self) -> list[Sequence]:
        """Park sequences of much longer requests while shorter ones are encoding or decoding (each step of a big
        batch costs every row's compute on a CPU); put them back once the shorter ones are done or they have
        waited long enough. Greedy decoding only. Returns sequences that finished in the flushed step."""
        if not isinstance(self.decoder, BatchDecoder) or isinstance(self.decoder, BeamBatchDecoder):
            return []
        now, done = time.monotonic(), []
        shortest = self._shortest_in_progress()
        for group in list(self.parked):  # back when nothing much shorter is left, or cancelled, or aged
            if (
                shortest is None
                or any(s.cancelled for s in group.seqs)
                or not self._parkable(group.seqs[0].tag, shortest, now)
            ):
                self.parked.remove(group)
                self.decoder.unpark(group)
        if shortest is not None:
            long = [s for s in self.decoder.rows if self._parkable(s.tag, shortest, now)]
            if long:
                group, done = self.decoder.park(long)
                if group is not None:
                    self._waiting_again([s.tag for s in group.seqs], now)
                    self.parked.append(group)
        return done

    def _parkable(self, item: WorkItem, shortest: float, now: float) -> bool:
        return self._urgency(item, now) > PARK_RATIO * shortest + PARK_MARGIN_SECONDS

    def _held_back(self, items: list[WorkItem], now: float) -> bool:
        """Encoding stalls every active sequence while it runs: don't stall shorter requests to encode longer
        work; it goes on once they are done, or once it has waited long enough (aging). Work no longer than what
        is decoding joins at once (continuous batching)."""
        if not self.decoder.rows:
            return False
        shortest_active = min(seq.tag.priority for seq in self.decoder.rows)
        return min(self._urgency(it, now) for it in items) > shortest_active

    def _encode_step(self) -> tuple[list[WorkItem], bool]:
        """Returns the items that completed and whether an encode was left mid-way."""
        now = time.monotonic()
        done = self._maybe_start(now)
        if not self.encoding:
            return done, False
        enc = self.encoding[-1]
        if self._held_back(enc.items, now):
            return done, False
        try:
            mx.eval(next(enc.stages))
            return done, True
        except StopIteration as finished:
            self.encoding.pop()
            try:
                seqs = self._sequences(enc, finished.value)
            except Exception as exc:  # noqa: BLE001 - isolated below
                return done + self._isolate(enc.items, exc), False
            return done + self._join(enc.items, seqs), False
        except Exception as exc:  # noqa: BLE001 - a failing batch: find the culprit, the others still run
            self.encoding.pop()
            return done + self._isolate(enc.items, exc), False

    def _maybe_start(self, now: float) -> list[WorkItem]:
        """Start encoding the most urgent waiting items when nothing is encoding, or pause the running encode for
        them when it belongs to a much longer request."""
        room = self.max_batch - len(self.decoder) - self._parked_count() - self._encoding_count()
        if room <= 0 or not self.waiting:
            return []
        self.waiting.sort(key=lambda it: (self._urgency(it, now), it._order))  # type: ignore[attr-defined]
        first = self.waiting[0]
        if self.encoding:
            running = self.encoding[-1].items
            if not all(self._parkable(it, first.priority, now) for it in running):
                return []
        if self._held_back([first], now):
            return []
        batch, seconds = [], 0.0
        sr = self.model.sample_rate
        while self.waiting and len(batch) < room:
            dur = self.waiting[0].audio.shape[0] / sr
            if batch and seconds + dur > self.encode_seconds:
                break
            batch.append(self.waiting.pop(0))
            seconds += dur
        if self.encoding:
            self._waiting_again(self.encoding[-1].items, now)
        started = {id(it.group) for it in batch if it.group is not None}
        self._waiting_again([it for it in self.waiting if it.group is not None and id(it.group) in started], now)
        try:
            self.encoding.append(self._begin(batch))
        except Exception as exc:  # noqa: BLE001
            return self._isolate(batch, exc)
        return []

    # ---- encoding ---------------------------------------------------------------------------------------
    def _begin(self, items: list[WorkItem]) -> _Encoding:
        from model.canary import MIN_AUDIO_SECONDS, pad_batch

        model, sr = self.model, self.model.sample_rate
        prompts: list[list[int] | BaseException] = []
        for item in items:
            try:
                prompts.append(model.prompt_ids(self._prompt_spec(item.spec)))
            except Exception as exc:  # noqa: BLE001 - fails that item alone
                prompts.append(exc)
        waves = [pad_to_min_duration(it.audio, int(MIN_AUDIO_SECONDS * sr)) for it in items]
        audio, lengths = pad_batch(waves)
        return _Encoding(items, prompts, waves, model.encode_stages(audio, lengths, self.encode_stages))

    def _sequences(self, encoding: _Encoding, value: tuple) -> list[Sequence | BaseException]:
        enc, enc_lens = value
        enc_lens = np.array(enc_lens).tolist()
        model = self.model
        hop, n_convs = model.config.preprocessor.hop_length, model.config.encoder.n_subsampling_convs
        out: list[Sequence | BaseException] = []
        for i, (item, prompt, wave) in enumerate(zip(encoding.items, encoding.prompts, encoding.waves, strict=True)):
            if isinstance(prompt, BaseException):
                out.append(prompt)
                continue
            frames = encoder_frames(wave.shape[0], hop, n_convs)
            limit = single_item_max_new_tokens(model, wave.shape[0], len(prompt))
            seq = Sequence(enc[i, :frames], enc_lens[i], prompt, limit, tag=item, cancelled=item.cancelled)
            item._seq = seq
            out.append(seq)
        return out

    def _encode(self, items: list[WorkItem]) -> list[Sequence | BaseException]:
        """Encode items as one padded batch, all stages at once."""
        encoding = self._begin(items)
        return self._sequences(encoding, drain(encoding.stages))

    def _isolate(self, items: list[WorkItem], exc: BaseException) -> list[WorkItem]:
        """A batch failed: fail it if it is one item, else encode the items one by one (the others still run)."""
        if len(items) == 1:
            items[0].error = exc
            return items
        return [d for it in items for d in self._start([it])]

    def _start(self, items: list[WorkItem]) -> list[WorkItem]:
        """Encode items as one padded batch at once and prefill them; a failing item fails alone."""
        try:
            seqs = self._encode(items)
        except Exception as exc:  # noqa: BLE001
            return self._isolate(items, exc)
        return self._join(items, seqs)

    def _join(self, items: list[WorkItem], seqs: list[Sequence | BaseException]) -> list[WorkItem]:
        """Prefill the encoded items into the decoder; items whose prompt failed fail alone."""
        failed = []
        for item, seq in zip(items, seqs, strict=True):
            if isinstance(seq, BaseException):
                item.error = seq
                failed.append(item)
        ok = [s for s in seqs if isinstance(s, Sequence)]
        return failed + [self._finish(s) for s in self.decoder.add(ok)]

    def _prompt_spec(self, spec: PromptSpec) -> PromptSpec:
        # With a CTC aligner (canary-1b-v2) NeMo keeps <|notimestamp|> and times the plain transcript afterwards.
        if spec.timestamps and self.model.timestamp_source == "ctc":
            return dataclasses.replace(spec, timestamps=False)
        return spec

    def _finish(self, seq: Sequence) -> WorkItem:
        from model.canary import Transcription

        item: WorkItem = seq.tag
        raw = self.model.tokenizer.ids_to_text(seq.tokens)
        duration = item.audio.shape[0] / self.model.sample_rate
        item.result = Transcription(
            raw.strip(),
            list(seq.tokens),
            item.spec.source_lang,
            item.spec.target_lang,
            duration,
            raw,
            seq.finished,
            list(seq.logprobs),
            pieces=self.model.token_pieces(seq.tokens),
        )
        if item.spec.timestamps and self.model.timestamp_source == "ctc":
            from model.canary import MIN_AUDIO_SECONDS

            wave = pad_to_min_duration(item.audio, int(MIN_AUDIO_SECONDS * self.model.sample_rate))
            item.result = self.model.add_ctc_timestamps([wave], [item.result])[0]
        elif item.spec.timestamps:  # <|timestamp|> prompt: NeMo's text, words and segments
            item.result = self.model.add_timestamps(item.result)
        return item


class BeamBatchDecoder(BatchDecoder):
    """Beam search over a changing set of sequences, each holding `beam_size` consecutive rows.

    Mirrors NeMo's BeamSearchSequenceGenerator (transformer_generators.py) step for step: top-k of the first
    step, then per step top-k per hypothesis, finished hypotheses extended only by <pad> at +0 (their other
    candidates pushed down by NEG_INF), top-k of k^2 by score / ((5 + len) / 6) ** length_penalty, and the
    final argmax of the penalised scores. NeMo ignores the configured `len_pen` (it reads `length_penalty`),
    so the effective penalty of the released configs is 0."""

    def __init__(self, model, beam_size: int, length_penalty: float = 0.0) -> None:
        super().__init__(model, compile=False)
        self.k = beam_size
        self.length_penalty = length_penalty

    def __len__(self) -> int:
        return len(self.rows) // self.k

    def _reset(self) -> None:
        super()._reset()
        self.scores: mx.array | None = None  # (R,) cumulative log-prob per hypothesis row
        self.hyps: list[list[int]] = []  # host: generated tokens per row
        self.hyp_lps: list[list[float]] = []  # host: their log-probabilities
        self.lengths: list[float] = []  # host: NeMo's prefixes_len per row
        self.steps: list[int] = []  # host: tokens generated so far per row (same within a sequence)

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        k, p = self.k, len(seqs[0].prompt)
        self_k, self_v, cross, cross_mask, logits = self._run_prompts(seqs)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (n, V)
        order = mx.argsort(-logp, axis=-1)[:, :k]  # (n, k) best first, like torch.topk
        scores = mx.take_along_axis(logp, order, axis=-1)
        rep = mx.repeat(mx.arange(len(seqs)), k)  # every sequence's state copied to its k rows
        self._append_rows(
            [a[rep] for a in self_k],
            [a[rep] for a in self_v],
            [(a[rep], b[rep]) for a, b in cross],
            cross_mask[rep],
            p,
            order.reshape(-1),
        )
        self.scores = scores.reshape(-1) if self.scores is None else mx.concatenate([self.scores, scores.reshape(-1)])
        first = np.array(order).reshape(-1).tolist()
        self.hyps += [[t] for t in first]
        self.hyp_lps += [[lp] for lp in np.array(scores).reshape(-1).tolist()]
        self.lengths += [float(p + 2)] * len(first)  # NeMo: prefixes.size(1) + 1 after the first step
        self.steps += [1] * len(first)
        self.rows += [s for s in seqs for _ in range(k)]
        return self._finish_done()

    def step(self) -> list[Sequence]:
        if not self.rows:
            return []
        need = max(self.positions) + 1
        if need > self.self_k[0].shape[2]:
            cap = _round_up(need, CACHE_STEP)
            self.self_k = [_pad_axis(a, 2, cap) for a in self.self_k]
            self.self_v = [_pad_axis(a, 2, cap) for a in self.self_v]
        k, r = self.k, len(self.rows)
        finished = mx.array([h[-1] in (self.eos, self.pad) for h in self.hyps])  # pad_profile
        logits, self.self_k, self.self_v = self._forward_logits(
            self.last, self.offsets, self.self_k, self.self_v, self.cross_k, self.cross_v, self.cross_mask
        )
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        order = mx.argsort(-logp, axis=-1)[:, :k]  # (R, k)
        cand_lp = mx.take_along_axis(logp, order, axis=-1)
        cand_tok = mx.where(finished[:, None], self.pad, order)
        first_col = mx.arange(k)[None, :] == 0
        factor = mx.where(finished[:, None], mx.where(first_col, 0.0, 1.0 - NEG_INF), 1.0)
        penalty = ((5.0 + mx.array(self.lengths)) / 6.0) ** self.length_penalty  # (R,)
        cand = (self.scores[:, None] + cand_lp * factor) / penalty[:, None]  # (R, k)
        groups = r // k
        flat = cand.reshape(groups, k * k)
        top = mx.argsort(-flat, axis=-1)[:, :k]  # (G, k)
        new_scores = mx.take_along_axis(flat, top, axis=-1).reshape(-1) * penalty  # NeMo: rank order x row penalty
        parents = (top // k + mx.arange(groups)[:, None] * k).reshape(-1)  # global row index
        tokens = mx.take_along_axis(cand_tok.reshape(groups, k * k), top, axis=-1).reshape(-1)
        token_lps = mx.take_along_axis(cand_lp.reshape(groups, k * k), top, axis=-1).reshape(-1)
        self.self_k = [a[parents] for a in self.self_k]
        self.self_v = [a[parents] for a in self.self_v]
        self.scores, self.last, self.offsets = new_scores, tokens, self.offsets + 1
        self.positions = [q + 1 for q in self.positions]
        mx.eval(parents, tokens, token_lps)  # the step's one sync
        parents_h, tokens_h, lps_h = (np.array(a).tolist() for a in (parents, tokens, token_lps))
        self.hyps = [self.hyps[pa] + [t] for pa, t in zip(parents_h, tokens_h, strict=True)]
        self.hyp_lps = [self.hyp_lps[pa] + [lp] for pa, lp in zip(parents_h, lps_h, strict=True)]
        # NeMo's prefixes_len: 1 + the prefix's tokens (prompt included) that are not <|endoftext|>/<pad>.
        self.lengths = [
            1.0 + len(self.rows[i].prompt) + sum(t not in (self.eos, self.pad) for t in h)
            for i, h in enumerate(self.hyps)
        ]
        self.steps = [s + 1 for s in self.steps]
        return self._finish_done()

    def _finish_done(self) -> list[Sequence]:
        """Sequences whose k hypotheses all ended, that hit their length limit, or were cancelled."""
        k, done, rows_done = self.k, [], []
        penalty = None
        for g in range(len(self.rows) // k):
            seq, rows = self.rows[g * k], range(g * k, g * k + k)
            ended = all(self.hyps[i][-1] in (self.eos, self.pad) for i in rows)
            if not (ended or seq.cancelled or self.steps[g * k] >= seq.max_new_tokens):
                continue
            if penalty is None:
                lengths = mx.array(self.lengths)
                penalty = np.array(self.scores / ((5.0 + lengths) / 6.0) ** self.length_penalty).tolist()
            best = max(rows, key=lambda i: (penalty[i], -i))  # torch.argmax: first of equal maxima
            hyp = self.hyps[best]
            stops = [j for j, t in enumerate(hyp) if t in (self.eos, self.pad)]
            seq.tokens = hyp[: stops[0]] if stops else list(hyp)
            seq.logprobs = self.hyp_lps[best][: len(seq.tokens)]
            seq.finished = bool(stops)
            seq.score = penalty[best]
            done.append(seq)
            rows_done += list(rows)
        if rows_done:
            leaving = set(rows_done)
            keep = [i for i in range(len(self.rows)) if i not in leaving]
            self._keep_rows(keep)
        return done

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.rows = []
            self._reset()
            return
        idx = mx.array(keep)
        for name in ("rows", "positions", "hyps", "hyp_lps", "lengths", "steps"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        self.self_k = [a[idx] for a in self.self_k]
        self.self_v = [a[idx] for a in self.self_v]
        self.cross_k = [a[idx] for a in self.cross_k]
        self.cross_v = [a[idx] for a in self.cross_v]
        self.cross_mask, self.offsets, self.last = self.cross_mask[idx], self.offsets[idx], self.last[idx]
        self.scores = self.scores[idx]
