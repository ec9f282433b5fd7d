"""The decoding and prompt_defaults sections of a NeMo config: how the checkpoint decodes by default, and the prompt
slots every request starts from."""

from __future__ import annotations

import re
from typing import Any

from .errors import ConversionError
from .fields import integer, number, require


def decoding(cfg: dict) -> dict:
    """The checkpoint's decoding section, as NeMo 3.0.0's MultiTaskDecoding reads it (multitask_decoding.py):
    `greedy` / `greedy_batch` read the `greedy` section, `beam` the `beam` section; missing keys take NeMo's
    defaults (beam_size 1, max_generation_delta -1 = up to the decoder's max_sequence_length). NeMo reads
    `length_penalty` and ignores the configured `len_pen` (reference 6.1), so `len_pen` is kept for display only."""
    d = cfg.get("decoding") or {}
    strategy = require("decoding.strategy", d.get("strategy", "beam"), ["beam", "greedy", "greedy_batch"])
    key = "beam" if strategy == "beam" else "greedy"
    section = d.get(key) or {}
    beam_size = integer(f"decoding.{key}.beam_size", section.get("beam_size", 1)) if key == "beam" else 1
    out = {
        "strategy": strategy,
        "beam_size": beam_size,
        "length_penalty": number(f"decoding.{key}.length_penalty", section.get("length_penalty", 0.0)),
        "max_generation_delta": integer(
            f"decoding.{key}.max_generation_delta", section.get("max_generation_delta", -1), minimum=-1
        ),
    }
    if section.get("len_pen") is not None:
        out["configured_len_pen"] = number(f"decoding.{key}.len_pen", section["len_pen"])
    return out


def _lang(field: str, value: Any) -> str:
    m = re.fullmatch(r"<\|([^|<>]+)\|>|([A-Za-z][A-Za-z0-9_-]*)", str(value))
    if m is None:
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: a language like '<|en|>')")
    return m.group(1) or m.group(2)


def _flag(field: str, value: Any, yes: str, no: str) -> bool:
    """A boolean prompt slot as NeMo's prompt formatters accept it: yes/no, true/false, 1/0, or the token."""
    truthy = {True, "yes", "true", "1", yes, f"<|{yes}|>"}  # True == 1
    falsy = {False, "no", "false", "0", no, f"<|{no}|>"}  # False == 0
    v = value.lower() if isinstance(value, str) else value
    if v in truthy:
        return True
    if v in falsy:
        return False
    raise ConversionError(f"{field}: unsupported value {value!r} (supported: <|{yes}|>, <|{no}|>, yes, no)")


_EMOTIONS = ("<|emo:undefined|>", "<|emo:neutral|>", "<|emo:angry|>", "<|emo:happy|>", "<|emo:sad|>")
_TASKS = {"asr", "transcribe", "<|transcribe|>", "ast", "translate", "s2t_translation", "<|translate|>"}


def prompt_defaults(cfg: dict) -> dict:
    """NeMo's `prompt_defaults` ([{role, slots}], slots as plain values or as tokens such as `<|en|>`, `<|pnc|>`)
    -> the defaults every request starts from. Every slot of the `user` turn is read; a default the model code
    cannot honour is refused by name. The `user_partial` turn (decoder context only) needs nothing."""
    slots: dict = {}
    for turn in cfg.get("prompt_defaults") or []:
        if isinstance(turn, dict) and turn.get("role") == "user":
            slots = dict(turn.get("slots") or {})
    f = "prompt_defaults.user."
    source = _lang(f + "source_lang", slots.pop("source_lang", "en"))
    out = {
        "source_lang": source,
        "target_lang": _lang(f + "target_lang", slots.pop("target_lang", source)),
        "pnc": _flag(f + "pnc", slots.pop("pnc", True), "pnc", "nopnc"),
        "itn": _flag(f + "itn", slots.pop("itn", False), "itn", "noitn"),
        "emotion": require(f + "emotion", slots.pop("emotion", _EMOTIONS[0]), _EMOTIONS),
    }
    if _flag(f + "timestamp", slots.pop("timestamp", False), "timestamp", "notimestamp"):
        raise ConversionError(f"{f}timestamp: unsupported value '<|timestamp|>' (timestamps are asked for per request)")
    if _flag(f + "diarize", slots.pop("diarize", False), "diarize", "nodiarize"):
        raise ConversionError(f"{f}diarize: unsupported value '<|diarize|>' (speaker tokens are not rendered)")
    context = slots.pop("decodercontext", "") or ""
    if context:
        raise ConversionError(f"{f}decodercontext: unsupported value {context!r} (context is given per request)")
    task = slots.pop("task", slots.pop("taskname", None))  # canary (v1): derived from source vs target per request
    if task is not None and str(task).lower() not in _TASKS:
        raise ConversionError(f"{f}task: unsupported value {task!r} (supported: asr, ast or their tokens)")
    if slots:
        raise ConversionError(f"{f}{sorted(slots)[0]}: unknown prompt slot (supported: {_SLOTS})")
    return out


_SLOTS = "source_lang, target_lang, pnc, itn, emotion, timestamp, diarize, decodercontext, task"
