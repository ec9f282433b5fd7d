"""NeMo 3.0.0's streaming Canary decoding (`GreedyBatchedStreamingAEDComputer`, waitk / alignatt) as a batched
step machine: each live stream is a row with its own audio window and decoder KV cache; one `step` encodes every
ready stream's window in one padded batch and runs the decoder for all of them together.

Every row follows NeMo's batch-1 semantics (nemo/collections/asr/parts/submodules/aed_decoding/
aed_batched_streaming.py): a step NeMo rejects (EOS before the end, alignatt condition false) leaves nothing
behind - its cache write sits at the position the same token is fed at again - and committed tokens are never
revised, so every partial is a prefix of the final token list. A stream waiting for audio is not in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import cpu_kernels
from .batch_decoder import check_prompt_length
from .cache import KVCache
from .decoder import NEG_INF, causal_mask, cross_attention_mask
from .decoding import encoder_frames
from .errors import NonFiniteError
from .stream_buffer import AudioBuffer, ContextFrames, StreamingConfig

PRED_BUFFER = 256  # AEDStreamingState.max_generation_length: the prediction buffer, prompt included
HALLUCINATION_MIN_CONTEXT = 8  # detect_hallucinations needs current_context_lengths >= 8


@dataclass
class Stream:
    """One live stream: its audio window and what the decoder has committed."""

    prompt: list[int]
    buffer: AudioBuffer
    cache: KVCache
    tokens: list[int] = field(default_factory=list)  # committed, never revised
    logprobs: list[float] = field(default_factory=list)  # log-softmax of each committed token (float32 logits)
    started: bool = False  # the prompt is in the cache (NeMo: decoder_mems_list set by a committed step)
    halted: bool = False  # hallucination, length limit, or EOS on the last chunk: nothing more is committed

    @property
    def done(self) -> bool:
        return self.buffer.fed_last

    def append(self, audio: np.ndarray) -> None:
        self.buffer.append(audio)

    def end(self) -> None:
        self.buffer.end()


@dataclass(frozen=True)
class StepResult:
    stream: Stream
    new_tokens: list[int]  # committed by this step
    final: bool  # the stream's last chunk was decoded: `stream.tokens` is the transcript


@dataclass
class _Row:
    """A stream's per-step decoding state (host side)."""

    stream: Stream
    enc: mx.array  # (1, T, H) the window's projected encoder states (padded to the batch's T)
    enc_len: int  # frames cross-attention sees
    enc_frames: int  # the row's own encoder output length (NeMo's xatt_scores.shape[-1] at batch 1)
    last: bool
    shift: int
    active: bool = True
    first_pass: bool = False  # NeMo's i == 0: the prompt's own pass
    committed: int = 0


class StreamingDecoder:
    """Drives `Stream`s of one model with one `StreamingConfig`; MLX-thread only."""

    def __init__(self, model, config: StreamingConfig) -> None:
        self.model = model
        self.config = config
        pc = model.config.preprocessor
        self.ctx = ContextFrames.of(config, model.sample_rate, pc.hop_length, model.config.encoder.subsampling_factor)
        dec = model.decoder.cfg
        # NeMo stops a row whose next index reaches its 256-token buffer; past the position table NeMo itself fails
        self.limit = min(PRED_BUFFER - 1, dec.max_sequence_length)
        self.xatt_layer = config.xatt_scores_layer % dec.num_layers
        self.eos = model.tokenizer.eos_id

    def open(self, prompt: list[int]) -> Stream:
        """A new stream decoding after `prompt` (raises PromptTooLong when no token would fit after it)."""
        check_prompt_length(len(prompt) + 1, self.limit)
        dec = self.model.decoder.cfg
        heads = dec.num_attention_heads
        cache = KVCache(dec.num_layers, 1, heads, self.limit, dec.hidden_size // heads, self.model.dtype)
        return Stream(list(prompt), AudioBuffer(self.ctx), cache)

    def step(self, streams: list[Stream]) -> list[StepResult]:
        """Feed each ready stream its next chunk, encode them together, decode as NeMo's policy allows."""
        ready = [s for s in streams if s.buffer.ready]
        if not ready:
            return []
        lasts = [s.buffer.feed() for s in ready]
        before = [len(s.tokens) for s in ready]
        go = [(s, last) for s, last in zip(ready, lasts, strict=True) if self._passes_gate(s, last)]
        if go:  # only streams the policy lets decode are encoded at all
            self._decode(self._rows(go))
        return [StepResult(s, s.tokens[n:], last) for s, n, last in zip(ready, before, lasts, strict=True)]

    def text(self, stream: Stream) -> str:
        return self.model.tokenizer.ids_to_text(stream.tokens).strip()

    # ---- decoding -------------------------------------------------------------------------------------------
    def _passes_gate(self, stream: Stream, last: bool) -> bool:
        """NeMo's start gate (both policies): wait until waitk_lagging chunks are in, unless this is the end."""
        if stream.halted:
            return False
        return last or stream.buffer.encoder_length() // self.ctx.chunk >= self.config.waitk_lagging

    def _rows(self, go: list[tuple[Stream, bool]]) -> list[_Row]:
        """Encode the windows of `go` as one padded batch."""
        audio, lengths = _pad([s.buffer.samples for s, _ in go])
        enc, enc_lens = self.model.encode(audio, lengths)
        full = np.array(enc_lens).tolist()
        pc = self.model.config
        rows = []
        for i, (s, last) in enumerate(go):
            tensor = encoder_frames(len(s.buffer.samples), pc.preprocessor.hop_length, pc.encoder.n_subsampling_convs)
            enc_len = full[i] if last else s.buffer.encoder_length()
            rows.append(_Row(s, enc[i : i + 1], enc_len, tensor, last, s.buffer.encoder_shift()))
        return rows

    def _decode(self, rows: list[_Row]) -> None:
        dec = self.model.decoder
        enc = mx.concatenate([r.enc for r in rows])  # (B, T, H)
        enc_len = mx.array([r.enc_len for r in rows])
        cross = dec.cross_kv(enc)
        cross_mask = cross_attention_mask(enc_len, enc.shape[1], enc.dtype)
        for b, r in enumerate(rows):
            if not r.stream.started:  # NeMo feeds the whole prompt again until a step commits
                self._prefill(r.stream, [(k[b : b + 1], v[b : b + 1]) for k, v in cross], cross_mask[b : b + 1])
                r.first_pass = True
        keys = [mx.concatenate([r.stream.cache.keys[i] for r in rows]) for i in range(len(dec.layers))]
        values = [mx.concatenate([r.stream.cache.values[i] for r in rows]) for i in range(len(dec.layers))]
        for _ in range(self.limit):
            if not any(r.active for r in rows):
                break
            tokens = mx.array([_last_token(r.stream) for r in rows])
            pos = mx.array([len(r.stream.prompt) + len(r.stream.tokens) - 1 for r in rows])
            hidden, probs = _forward(dec, tokens, pos, keys, values, cross, cross_mask, self.xatt_layer)
            logits = self.model.logits(hidden)
            next_tok, token_lp = cpu_kernels.pick(logits)  # greedy token per row and its log-softmax value
            finite = mx.all(mx.isfinite(logits)) if self.model.guards_overflow else mx.array(True)
            mx.eval(next_tok, token_lp, probs, finite)  # the log-probs ride the step's one sync
            if not finite.item():  # float16/bfloat16 only; no float32 fallback for live streams yet
                raise NonFiniteError.overflow("the decoder's logits", self.model.dtype)
            picked = list(zip(np.array(next_tok).tolist(), np.array(token_lp).tolist(), strict=True))
            self._advance(rows, picked, np.array(probs))
        for b, r in enumerate(rows):
            for i in range(len(dec.layers)):
                r.stream.cache.keys[i] = keys[i][b : b + 1]
                r.stream.cache.values[i] = values[i][b : b + 1]

    def _prefill(self, stream: Stream, cross: list, cross_mask: mx.array) -> None:
        """Prompt positions 0..P-2 into the stream's cache with this chunk's encoder output; the last prompt token
        is then fed like any other, which is NeMo's whole-prompt pass split in two (causal attention)."""
        p = len(stream.prompt) - 1
        stream.cache.offset = 0
        if p > 0:
            ids = mx.array([stream.prompt[:-1]])
            self.model.decoder(ids, mx.arange(p), cross, cross_mask, stream.cache, causal_mask(p, cross_mask.dtype))

    def _advance(self, rows: list[_Row], picked: list[tuple[int, float]], probs: np.ndarray) -> None:
        """One decoder step's outcome per row (`picked`: each row's greedy token and its log-probability), with
        NeMo's checks in NeMo's order."""
        next_tok = [t for t, _ in picked]
        for b, r in enumerate(rows):
            if not r.active:
                continue
            first, r.first_pass = r.first_pass, False
            if self.config.policy == "alignatt" and not r.last and not self._alignatt_ok(r, probs[b], first):
                r.active = False  # wait for more audio; the token is discarded
                continue
            if next_tok[b] == self.eos:
                r.active = False  # not committed
                r.stream.halted = r.last
                continue
            self._commit(r, *picked[b])
            if self.config.policy == "waitk" and not r.last:
                r.active = False  # waitk: one token per chunk until the last one
            budget = self.config.alignatt_budget
            if self.config.policy == "alignatt" and r.active and not r.last and r.committed >= budget:
                r.active = False

    def _alignatt_ok(self, r: _Row, probs: np.ndarray, first: bool) -> bool:
        """Emit only if the most attended frame is at least alignatt_thr frames before the visible end."""
        sink = self.config.exclude_sink_frames
        # NeMo: half the frames on the prompt's pass over a short window; no sink once audio left the window
        excl = r.enc_frames // 2 if first and r.enc_frames <= sink else (sink if r.shift == 0 else 0)
        a = int(np.argmax(probs[excl : r.enc_frames])) + excl
        return r.enc_len - (a + 1) >= self.config.alignatt_thr

    def _commit(self, r: _Row, token: int, logprob: float) -> None:
        s = r.stream
        seq = s.prompt + s.tokens + [token]
        ccl = len(seq) - 1  # index of the token just written
        if self.config.hallucinations_detector and ccl >= HALLUCINATION_MIN_CONTEXT and _hallucinates(seq):
            s.halted, r.active = True, False
            return
        if ccl >= self.limit:
            s.halted, r.active = True, False
            return
        s.tokens.append(token)
        s.logprobs.append(logprob)
        s.started = True
        r.committed += 1


def _last_token(s: Stream) -> int:
    return s.tokens[-1] if s.tokens else s.prompt[-1]


def _hallucinates(seq: list[int]) -> bool:
    """NeMo's detect_hallucinations on the last token: `a a a a a`, `a b a b a b`, `a b c a b c a b c`."""
    t = seq[::-1]  # t[k] = seq[ccl - k]
    rep = all(t[0] == t[k] for k in range(1, 5))
    ab = t[0] == t[2] == t[4] and t[1] == t[3] == t[5]
    abc = t[0] == t[3] == t[6] and t[1] == t[4] == t[7] and t[2] == t[5] == t[8]
    return rep or ab or abc


def _forward(dec, tokens, pos, keys, values, cross, cross_mask, xatt_layer) -> tuple[mx.array, mx.array]:
    """One token per row at its own position: tokens, pos (B,) -> final hidden (B, H), head-mean cross-attention
    probabilities of `xatt_layer` (B, T_enc). Writes each row's new K/V at its position in keys/values."""
    m = keys[0].shape[2]
    idx = mx.arange(m)[None, :]
    write = (idx == pos[:, None])[:, None, :, None]  # (B, 1, M, 1)
    dtype = keys[0].dtype
    self_mask = mx.where(idx <= pos[:, None], 0.0, NEG_INF).astype(dtype)[:, None, None, :]  # (B, 1, 1, M)
    x = dec.embedding(tokens[:, None], pos[:, None])  # (B, 1, H)
    probs = None
    for i, layer in enumerate(dec.layers):
        h = layer.layer_norm_1(x)
        k, v = layer.first_sub_layer.kv(h)  # (B, H, 1, d)
        keys[i] = mx.where(write, k, keys[i])
        values[i] = mx.where(write, v, values[i])
        x = x + layer.first_sub_layer.attend(h, keys[i], values[i], self_mask)
        h = layer.layer_norm_2(x)
        if i == xatt_layer:
            out, probs = _attend_with_probs(layer.second_sub_layer, h, *cross[i], cross_mask)
        else:
            out = layer.second_sub_layer.attend(h, *cross[i], cross_mask)
        x = x + out
        x = x + layer.third_sub_layer(layer.layer_norm_3(x))
    return dec.final_layer_norm(x)[:, -1], probs


def _attend_with_probs(mha, x, k, v, mask) -> tuple[mx.array, mx.array]:
    """Cross-attention that also returns NeMo's `xatt_scores` averaged over heads (last query): (B, T_enc)."""
    b, t, _ = x.shape
    q = mha.heads(mha.query_net(x))  # (B, H, T, d)
    scores = (q * mha.scale) @ k.transpose(0, 1, 3, 2) + mask  # (B, H, T, T_enc)
    probs = mx.softmax(scores.astype(mx.float32), axis=-1)
    out = (probs.astype(v.dtype) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)  # (B, T, D)
    return mha.out_projection(out), probs.mean(axis=1)[:, -1]


def _pad(waves: list[np.ndarray]) -> tuple[mx.array, mx.array]:
    n = max(len(w) for w in waves)
    audio = np.zeros((len(waves), n), np.float32)
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    return mx.array(audio), mx.array([len(w) for w in waves])
