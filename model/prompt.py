"""Decoder prompts for the `canary` (canary-1b) and `canary2` (flash, 1b-v2) formats.

Mirrors nemo/collections/common/prompts/{canary,canary2}.py and CanaryTokenizer._tokenize_special_prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedLanguageError
from .tokenizer import AggregateTokenizer, CanaryTokenizer, UnifiedTokenizer


@dataclass(frozen=True)
class PromptSpec:
    """What the user asks for; translation is `target_lang != source_lang`."""

    source_lang: str
    target_lang: str
    pnc: bool = True
    context: str = ""  # canary2 decoder context
    timestamps: bool = False  # canary2 <|timestamp|>
    itn: bool | None = None  # canary2 inverse text normalisation; None: the model's prompt default
    max_context_tokens: int | None = None  # keep only the context's last N tokens (None: all of it)
    keywords: tuple[str, ...] = ()  # phrases to boost (NeMo's boosting tree, in beam search); not in the prompt

    @property
    def is_translation(self) -> bool:
        return self.source_lang != self.target_lang


def supported_languages(tokenizer: CanaryTokenizer) -> list[str]:
    """Languages with both a prompt token and (aggregate) a text sub-tokenizer, as 2-letter codes."""
    specials = set(tokenizer.special_languages)
    if isinstance(tokenizer, AggregateTokenizer):
        return [code for code in (lang.split("-")[0] for lang in tokenizer.languages) if code in specials]
    return sorted(specials)


def language_slot_prefix(tokenizer: CanaryTokenizer, prompt_format: str) -> list[int]:
    """The decoder prompt up to its source-language slot, without context: `<|startoftranscript|>` (canary) or
    `<|startofcontext|><|startoftranscript|><|emo:undefined|>` (canary2; unified: with the leading `▁` piece).
    The next-token distribution there is the model's language identification (NeMo trains on prompt tokens)."""
    lang = supported_languages(tokenizer)[0]
    ids = build_prompt(tokenizer, prompt_format, PromptSpec(lang, lang))
    return ids[: ids.index(tokenizer.special_id(f"<|{lang}|>"))]


def _text_lang(tokenizer: AggregateTokenizer, lang: str) -> str:
    # NeMo maps canary1 codes to canary2 locale names when the tokenizer uses them (en -> en-US).
    for name in tokenizer.languages:
        if name == lang or name.split("-")[0] == lang:
            return name
    raise UnsupportedLanguageError(lang, supported_languages(tokenizer))


def _check_langs(tokenizer: CanaryTokenizer, spec: PromptSpec) -> None:
    langs = supported_languages(tokenizer)
    if spec.source_lang not in langs:
        raise UnsupportedLanguageError(spec.source_lang, langs, "source language")
    if spec.target_lang not in langs:
        raise UnsupportedLanguageError(spec.target_lang, langs, "target language")


def _flag(on: bool, yes: str, no: str) -> str:
    return f"<|{yes}|>" if on else f"<|{no}|>"


def build_prompt(
    tokenizer: CanaryTokenizer, prompt_format: str, spec: PromptSpec, defaults: dict | None = None
) -> list[int]:
    """Token ids of the decoder prompt (the model's answer follows them). `defaults`: the checkpoint's prompt
    defaults (config.json `prompt_defaults`) for the slots a request does not set (itn, emotion)."""
    defaults = defaults or {}
    _check_langs(tokenizer, spec)
    if prompt_format == "canary":
        if spec.context or spec.timestamps:
            raise ValueError("the 'canary' prompt format supports neither decoder context nor timestamps")
        task = "<|translate|>" if spec.is_translation else "<|transcribe|>"
        pieces = [
            "<|startoftranscript|>",
            f"<|{spec.source_lang}|>",
            task,
            f"<|{spec.target_lang}|>",
            _flag(spec.pnc, "pnc", "nopnc"),
        ]
        return [tokenizer.special_id(p) for p in pieces]
    if prompt_format != "canary2":
        raise ValueError(f"unknown prompt format {prompt_format!r}")
    tail = [
        "<|startoftranscript|>",
        defaults.get("emotion", "<|emo:undefined|>"),
        f"<|{spec.source_lang}|>",
        f"<|{spec.target_lang}|>",
        _flag(spec.pnc, "pnc", "nopnc"),
        _flag(defaults.get("itn", False) if spec.itn is None else spec.itn, "itn", "noitn"),
        _flag(spec.timestamps, "timestamp", "notimestamp"),
        "<|nodiarize|>",
    ]
    keep = spec.max_context_tokens
    if isinstance(tokenizer, UnifiedTokenizer):
        # NeMo encodes the whole prompt string with SentencePiece: it starts with the dummy-prefix '▁' piece
        # and the context's first word gets no '▁' (reference §5.2).
        ids = tokenizer.text_to_ids("<|startofcontext|>" + spec.context + "".join(tail))
        if keep is not None and spec.context:
            start = ids.index(tokenizer.special_id("<|startofcontext|>")) + 1
            end = ids.index(tokenizer.special_id("<|startoftranscript|>"), start)
            ids = ids[:start] + _last(ids[start:end], keep) + ids[end:]
        return ids
    assert isinstance(tokenizer, AggregateTokenizer)
    ids = [tokenizer.special_id("<|startofcontext|>")]
    if spec.context:
        # NeMo's "hack": the context is tokenized with the target language's sub-tokenizer.
        context = tokenizer.text_to_ids(spec.context, _text_lang(tokenizer, spec.target_lang))
        ids += context if keep is None else _last(context, keep)
    return ids + [tokenizer.special_id(p) for p in tail]


def _last(ids: list[int], n: int) -> list[int]:
    """The last `n` tokens (OpenAI's convention for a long prompt: the end of the text is kept)."""
    return ids[len(ids) - n :] if len(ids) > n else ids
