"""The tokenizer section of a NeMo config: which archive members hold the SentencePiece models, and their names in
the converted directory (aggregate: one per language after `spl_tokens`; unified: one)."""

from __future__ import annotations

import re
from typing import Any

from .errors import ConversionError
from .fields import class_name, require, value_at

_NEMO_REF = "nemo:"
_LANG_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def member(field: str, ref: Any) -> str:
    if not isinstance(ref, str) or not ref.startswith(_NEMO_REF):
        raise ConversionError(f"{field}: unsupported value {ref!r} (supported: a 'nemo:<file>' archive reference)")
    return ref[len(_NEMO_REF) :]


def tokenizer_sources(cfg: dict) -> tuple[str, list[tuple[str, str]]]:
    """("aggregate" | "unified", [(name, archive member of its SentencePiece .model)]), in config order."""
    tok = value_at(cfg, "tokenizer")
    kind = require("tokenizer.type", value_at(cfg, "tokenizer.type"), ["agg", "bpe"])
    custom = value_at(cfg, "tokenizer.custom_tokenizer._target_", None)
    if kind == "bpe":
        class_name("tokenizer.custom_tokenizer._target_", custom, "CanaryBPETokenizer")
        return "unified", [("", member("tokenizer.model_path", tok.get("model_path")))]
    if custom is not None:
        class_name("tokenizer.custom_tokenizer._target_", custom, "CanaryTokenizer")
    langs = tok.get("langs")
    if not isinstance(langs, dict) or not langs:
        raise ConversionError(f"tokenizer.langs: unsupported value {langs!r} (supported: a mapping of languages)")
    if next(iter(langs)) != "spl_tokens":
        raise ConversionError(f"tokenizer.langs: unsupported value {list(langs)} (supported: spl_tokens first)")
    sources = []
    for name, sub in langs.items():
        if not isinstance(name, str) or not _LANG_NAME.match(name):
            raise ConversionError(f"tokenizer.langs: unsupported language name {name!r}")
        require(f"tokenizer.langs.{name}.type", value_at(sub, "type"), ["bpe"])
        sources.append((name, member(f"tokenizer.langs.{name}.model_path", value_at(sub, "model_path"))))
    return "aggregate", sources


def tokenizer_members(cfg: dict) -> list[str]:
    return [member for _, member in tokenizer_sources(cfg)[1]]


def tokenizer_json(cfg: dict) -> dict:
    kind, sources = tokenizer_sources(cfg)
    if kind == "unified":
        return {"type": "unified", "file": "tokenizer.model"}
    return {"type": "aggregate", "langs": [{"name": n, "file": f"tokenizer.{n}.model"} for n, _ in sources]}


def tokenizer_filenames(cfg: dict) -> dict[str, str]:
    """Archive member -> file name in the converted directory."""
    kind, sources = tokenizer_sources(cfg)
    if kind == "unified":
        return {sources[0][1]: "tokenizer.model"}
    return {member: f"tokenizer.{name}.model" for name, member in sources}


def ctc_tokenizer_members(cfg: dict) -> list[str]:
    """The SentencePiece model of the timestamps CTC model: a plain `bpe` tokenizer (the unified one, shared)."""
    require("timestamps tokenizer.type", value_at(cfg, "tokenizer.type"), ["bpe"])
    custom = value_at(cfg, "tokenizer.custom_tokenizer._target_", None)
    if custom is not None:
        class_name("timestamps tokenizer.custom_tokenizer._target_", custom, "CanaryBPETokenizer")
    return [member("timestamps tokenizer.model_path", value_at(cfg, "tokenizer.model_path"))]
