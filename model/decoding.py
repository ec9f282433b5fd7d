"""Batched greedy decoding with NeMo's semantics (BeamSearchSequenceGenerator with beam_size 1).

Reference §6: the first token comes from the prompt's last position; then up to `max_generation_length` more
steps, each feeding the last token at its true position. A row that produced <|endoftext|> only emits <pad>
afterwards; the loop stops once every row has finished. No Python loop over rows; one host sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .batch_decoder import Sequence, check_prompt_length
from .beam_decoder import BeamBatchDecoder
from .cache import KVCache
from .decoder import causal_mask, cross_attention_mask
from .errors import NonFiniteError


@dataclass(frozen=True)
class DecodeResult:
    tokens: list[list[int]]  # generated ids per row, without <|endoftext|> / <pad>
    finished: list[bool]  # False where a row ran into the length limit


def max_generation_length(t_enc: int, prompt_len: int, max_sequence_length: int, max_delta: int) -> int:
    """NeMo `_prepare_for_search`: the limit depends on the (batch) encoder tensor length."""
    max_seq = min(max_sequence_length, t_enc + max_delta) if max_delta >= 0 else max_sequence_length
    return max_seq - prompt_len


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


def greedy_decode(
    model, enc: mx.array, enc_lengths: mx.array, prompts: mx.array, eos_id: int, pad_id: int
) -> DecodeResult:
    """enc (B, T_enc, H) projected encoder states, prompts (B, P) -> generated tokens per row."""
    batch, prompt_len = prompts.shape
    dec = model.decoder
    cfg = dec.cfg
    max_gen = max_generation_length(
        enc.shape[1], prompt_len, cfg.max_sequence_length, model.config.decoding.max_generation_delta
    )
    check_prompt_length(prompt_len, cfg.max_sequence_length)
    max_gen = max(max_gen, 0)  # a prompt that uses up NeMo's length limit still gets its first token, as in NeMo
    cross = dec.cross_kv(enc)
    cross_mask = cross_attention_mask(enc_lengths, enc.shape[1], enc.dtype)
    heads = cfg.num_attention_heads
    cache = KVCache(cfg.num_layers, batch, heads, prompt_len + max_gen, cfg.hidden_size // heads, enc.dtype)

    hidden = dec(prompts, mx.arange(prompt_len), cross, cross_mask, cache, causal_mask(prompt_len, enc.dtype))
    logits = model.logits(hidden[:, -1])
    token = mx.argmax(logits, axis=-1)  # (B,)
    done = (token == eos_id) | (token == pad_id)  # NeMo treats <pad> like <|endoftext|>
    guard, finite = model.guards_overflow, mx.array(True)
    steps = [token]
    for pos in range(prompt_len, prompt_len + max_gen):
        if guard:  # float16/bfloat16: an overflow (inf/NaN logits) ends the loop, read with `done` (no extra sync)
            finite = finite & mx.all(mx.isfinite(logits))
            done = done | ~finite
        mx.async_eval(token, done)
        if done.all().item():
            break
        hidden = dec(token[:, None], mx.array([pos]), cross, cross_mask, cache)
        logits = model.logits(hidden[:, -1])
        token = mx.where(done, pad_id, mx.argmax(logits, axis=-1))  # finished rows only emit <pad>
        done = done | (token == eos_id) | (token == pad_id)
        steps.append(token)
    if guard and not (finite & mx.all(mx.isfinite(logits))).item():
        raise NonFiniteError.overflow("the decoder's logits", model.dtype)

    out = np.array(mx.stack(steps, axis=1))  # (B, S)
    tokens, finished = [], []
    for row in out.tolist():
        stops = [i for i, t in enumerate(row) if t in (eos_id, pad_id)]
        n = stops[0] if stops else len(row)
        tokens.append(row[:n])
        finished.append(n < len(row))
    return DecodeResult(tokens=tokens, finished=finished)


def beam_decode(
    model,
    enc: mx.array,
    enc_lengths: mx.array,
    prompt: list[int],
    beam_size: int,
    length_penalty: float = 0.0,
    keywords=None,
    keywords_alpha: float = 0.0,
) -> DecodeResult:
    """NeMo's batched beam search over one batch (the length limit of the whole batch, as NeMo computes it);
    `keywords` (a model.boosting.BoostingTree) boosts its phrases with weight `keywords_alpha`."""
    cfg = model.decoder.cfg
    check_prompt_length(len(prompt), cfg.max_sequence_length)
    max_gen = max_generation_length(
        enc.shape[1], len(prompt), cfg.max_sequence_length, model.config.decoding.max_generation_delta
    )
    lens = np.array(enc_lengths).tolist()
    seqs = [
        Sequence(enc[i], lens[i], prompt, max_gen + 1, tag=i, keywords=keywords, keywords_alpha=keywords_alpha)
        for i in range(enc.shape[0])
    ]
    decoder = BeamBatchDecoder(model, beam_size, length_penalty)
    done = decoder.add(seqs)
    while len(decoder):
        done += decoder.step()
    if any(s.overflowed for s in done):
        raise NonFiniteError.overflow("the decoder's logits", model.dtype)
    done.sort(key=lambda s: s.tag)
    return DecodeResult(tokens=[s.tokens for s in done], finished=[s.finished for s in done])
