"""Encoder batches for the scheduler: the unit of work (`WorkItem`), a padded batch encoding in stages
(`Encoding`), and the decoder sequences it becomes: prompts, the spoken language where a request detects it, and
each item's own length limit.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from canary_server.model.audio import MIN_AUDIO_SECONDS, pad_batch, pad_to_min_duration
from canary_server.model.batch_decoder import Sequence, check_prompt_length
from canary_server.model.decoding import encoder_frames, single_item_max_new_tokens
from canary_server.model.errors import CanaryError, PromptTooLong
from canary_server.model.prompt import PromptSpec
from canary_server.pipeline.language import LanguageChoice


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
    beam_size: int | None = None  # None: the batcher's
    language: LanguageChoice | None = None  # detect the source language (shared by the request's items)
    streams: bool = False  # its request streams its text as it is decoded (SSE): it starts decoding at once
    _seq: Sequence | None = field(default=None, repr=False)


@dataclass(eq=False)
class Encoding:
    """A padded encoder batch in progress, evaluated one stage per `step()`."""

    items: list[WorkItem]
    prompts: list[list[int] | BaseException]
    waves: list[np.ndarray]
    stages: Generator[mx.array, None, tuple]


def begin_encoding(model, items: list[WorkItem], stages: int) -> Encoding:
    """Items padded into one batch, with their prompts (a prompt that fails fails its item alone), encoding in
    `stages` pieces (`Canary.encode_stages`)."""
    sr = model.sample_rate
    prompts: list[list[int] | BaseException] = []
    for item in items:
        try:
            prompts.append(model.prompt_ids(item.spec))
        except Exception as exc:  # noqa: BLE001 - fails that item alone
            prompts.append(exc)
    waves = [pad_to_min_duration(it.audio, int(MIN_AUDIO_SECONDS * sr)) for it in items]
    audio, lengths = pad_batch(waves)
    return Encoding(items, prompts, waves, model.encode_stages(audio, lengths, stages))


def sequences(model, encoding: Encoding, value: tuple, keywords_alpha: float = 0.0) -> list[Sequence | BaseException]:
    """A finished encoding (`value`: encoder states and lengths) as decoder sequences, one per item, each with its
    own NeMo single-item length limit and keyword tree (`keywords_alpha`: its weight); an item whose prompt failed
    or does not fit, or whose keywords its (detected) language cannot spell, gets its exception instead."""
    enc, enc_lens = value
    _detect_languages(model, encoding, enc, enc_lens)
    enc_lens = np.array(enc_lens).tolist()
    hop, n_convs = model.config.preprocessor.hop_length, model.config.encoder.n_subsampling_convs
    out: list[Sequence | BaseException] = []
    for i, (item, prompt, wave) in enumerate(zip(encoding.items, encoding.prompts, encoding.waves, strict=True)):
        if isinstance(prompt, BaseException):
            out.append(prompt)
            continue
        try:  # a prompt past the decoder's position table fails this item alone
            check_prompt_length(len(prompt), model.config.decoder.max_sequence_length)
        except PromptTooLong as exc:
            out.append(exc)
            continue
        frames = encoder_frames(wave.shape[0], hop, n_convs)
        limit = single_item_max_new_tokens(model, wave.shape[0], len(prompt))
        try:  # built once per list and language (the model's cache)
            tree = model.keyword_tree(item.spec.keywords, item.spec.source_lang) if item.spec.keywords else None
        except CanaryError as exc:
            out.append(exc)
            continue
        seq = Sequence(enc[i, :frames], enc_lens[i], prompt, limit, tag=item, cancelled=item.cancelled)
        seq.keywords, seq.keywords_alpha = tree, keywords_alpha
        item._seq = seq
        out.append(seq)
    return out


def _detect_languages(model, encoding: Encoding, enc: mx.array, enc_lens: mx.array) -> None:
    """Requests that detect their language: the first of their items in this batch decides (one batched
    decoder pass at the prompt's language slot over the encoder output just computed), then every one of
    their items gets the decided language's prompt."""
    deciders: dict[int, int] = {}  # id(choice) -> row
    for i, item in enumerate(encoding.items):
        choice = item.language
        if choice is not None and not choice.decided and id(choice) not in deciders:
            deciders[id(choice)] = i
    if deciders:
        rows = list(deciders.values())
        idx = mx.array(rows)
        log_probs = np.array(model.language_log_probs(enc[idx], enc_lens[idx])).tolist()
        for row, lps in zip(rows, log_probs, strict=True):
            encoding.items[row].language.decide(dict(zip(model.languages, lps, strict=True)))
    for i, item in enumerate(encoding.items):
        if item.language is None or isinstance(encoding.prompts[i], BaseException):
            continue
        item.spec = item.language.apply(item.spec)
        try:
            encoding.prompts[i] = model.prompt_ids(item.spec)
        except Exception as exc:  # noqa: BLE001 - fails that item alone
            encoding.prompts[i] = exc
