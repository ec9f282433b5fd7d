"""Canary tokenizers: the aggregate `CanaryTokenizer` and the unified `CanaryBPETokenizer`.

Mirrors nemo/collections/common/tokenizers/{aggregate_tokenizer,canary_tokenizer,sentencepiece_tokenizer}.py.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import sentencepiece as spm

from .config import TokenizerConfig

BOS, EOS, PAD, NOSPEECH = "<|startoftranscript|>", "<|endoftext|>", "<pad>", "<|nospeech|>"
SPECIAL_LANG = "spl_tokens"
_LANG_TOKEN = re.compile(r"^<\|([a-z]{2,3}(?:-[A-Za-z]+)?)\|>$")
_PROMPT_FLAGS = frozenset({"pnc", "itn"})  # canary2 prompt flags that look like 3-letter language codes
_TIMESTAMP_TOKEN = re.compile(r"^<\|\d+\|>$")  # the flash models' frame tokens: output, not control


def _is_special(piece: str) -> bool:
    return (piece.startswith("<|") and piece.endswith("|>")) or piece == PAD


class CanaryTokenizer:
    """Common interface: special-token ids, text <-> ids, and the languages the model knows."""

    special_tokens: dict[str, int]
    vocab_size: int
    unknown_ids: frozenset[int] = frozenset()  # <unk> pieces: text the tokenizer cannot spell

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[PAD]

    def special_id(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise KeyError(f"special token {token!r} is not in this model's tokenizer") from None

    @property
    def special_languages(self) -> list[str]:
        """Languages that have a `<|xx|>` special token (the prompt can name them)."""
        return [
            m.group(1) for t in self.special_tokens if (m := _LANG_TOKEN.match(t)) and m.group(1) not in _PROMPT_FLAGS
        ]

    @functools.cached_property
    def control_ids(self) -> frozenset[int]:
        """Special tokens that are never transcript: every `<|...|>` but the timestamp frames (and <pad>)."""
        return frozenset(i for t, i in self.special_tokens.items() if not _TIMESTAMP_TOKEN.match(t))

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    def transcript_ids(self, ids: list[int]) -> list[int]:
        """The generated ids up to the first control token. A decoder that emits a control token (its prompt's
        language, <|pnc|>, ... again, or <|nospeech|>) has lost the audio: on silence and noise the test models
        restart their prompt and babble; what follows is not speech. Timestamp frames stay (they are parsed)."""
        control = self.control_ids
        end = next((n for n, i in enumerate(ids) if i in control), len(ids))
        return list(ids[:end])

    def transcript(self, ids: list[int]) -> str:
        """The text a user sees of generated ids: `transcript_ids`, without any special token, stripped."""
        special = self.special_ids
        return self.ids_to_text([i for i in self.transcript_ids(ids) if i not in special]).strip()

    def text_to_ids(self, text: str, lang: str) -> list[int]:
        raise NotImplementedError

    def ids_to_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        raise NotImplementedError


class AggregateTokenizer(CanaryTokenizer):
    """`spl_tokens` first, then one SentencePiece model per language; global id = local id + offset."""

    def __init__(self, models: list[tuple[str, spm.SentencePieceProcessor]]) -> None:
        if not models or models[0][0] != SPECIAL_LANG:
            raise ValueError("aggregate tokenizer must start with the 'spl_tokens' sub-tokenizer")
        self.models = dict(models)
        self.offsets: dict[str, int] = {}
        self._owners: list[tuple[int, spm.SentencePieceProcessor]] = []  # global id -> (offset, sp)
        offset = 0
        for name, sp in models:
            self.offsets[name] = offset
            self._owners.extend([(offset, sp)] * sp.get_piece_size())
            offset += sp.get_piece_size()
        self.vocab_size = offset
        spl = self.models[SPECIAL_LANG]
        pieces = (spl.id_to_piece(i) for i in range(spl.get_piece_size()))
        self.special_tokens = {p: i for i, p in enumerate(pieces) if _is_special(p)}
        # each sub-tokenizer's <unk> (a piece it cannot spell)
        self.unknown_ids = frozenset(self.offsets[n] + sp.unk_id() for n, sp in models if sp.unk_id() >= 0)

    @property
    def languages(self) -> list[str]:
        return [name for name in self.models if name != SPECIAL_LANG]

    def text_to_ids(self, text: str, lang: str) -> list[int]:
        if lang not in self.models:
            raise KeyError(f"no sub-tokenizer for language {lang!r}")
        return [i + self.offsets[lang] for i in self.models[lang].encode_as_ids(text)]

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            offset, sp = self._owners[i]
            out.append(sp.id_to_piece(i - offset))
        return out

    def ids_to_text(self, ids: list[int]) -> str:
        return "".join(self.ids_to_tokens(ids)).replace("▁", " ")


class UnifiedTokenizer(CanaryTokenizer):
    """One SentencePiece model whose special tokens are user-defined pieces (canary-1b-v2)."""

    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        pieces = (sp.id_to_piece(i) for i in range(self.vocab_size))
        self.special_tokens = {p: i for i, p in enumerate(pieces) if _is_special(p)}
        self.unknown_ids = frozenset([sp.unk_id()] if sp.unk_id() >= 0 else [])

    @property
    def languages(self) -> list[str]:
        return self.special_languages

    def text_to_ids(self, text: str, lang: str | None = None) -> list[int]:
        return list(self.sp.encode_as_ids(text))

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def ids_to_text(self, ids: list[int]) -> str:
        return self.sp.decode_ids(list(ids))


def _load_sp(path: Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    sp.load(str(path))
    return sp


def load_tokenizer(directory: Path, cfg: TokenizerConfig) -> CanaryTokenizer:
    if cfg.type == "aggregate":
        return AggregateTokenizer([(name, _load_sp(directory / file)) for name, file in cfg.langs])
    if cfg.type == "unified":
        if not cfg.file:
            raise ValueError("unified tokenizer config has no 'file'")
        return UnifiedTokenizer(_load_sp(directory / cfg.file))
    raise ValueError(f"unknown tokenizer type {cfg.type!r}")
