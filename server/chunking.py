"""OpenAI's `chunking_strategy` form field -> the VAD parameters of one request (pipeline/speech.py).

`"auto"`, or a `server_vad` object sent as JSON text (`{"type": "server_vad", "threshold": 0.6, ...}`) or as the
bracketed fields the SDKs send for a nested object (`chunking_strategy[type]=server_vad`,
`chunking_strategy[threshold]=0.6`, ...). Anything else is a 400 naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from canary_server.pipeline.speech import VadParams
from canary_server.server.errors import ApiError

PARAM = "chunking_strategy"
FIELDS = {
    "threshold": (float, 0.0, 1.0),
    "prefix_padding_ms": (int, 0, 10_000),
    "silence_duration_ms": (int, 0, 10_000),
}


def _bad(message: str) -> ApiError:
    return ApiError(400, message, param=PARAM, code="invalid_value")


def vad_params(form: Any) -> VadParams:
    """The request's VadParams (the defaults without the field or with "auto")."""
    items = form.multi_items()
    bracketed = {k[len(PARAM) + 1 : -1]: v for k, v in items if k.startswith(PARAM + "[") and k.endswith("]")}
    raw = form.get(PARAM)
    if raw is not None and bracketed:
        raise _bad("send chunking_strategy either as one field or as chunking_strategy[...] fields, not both")
    if raw is None and not bracketed:
        return VadParams()
    if raw is not None and not isinstance(raw, str):
        raise _bad('chunking_strategy must be text: "auto" or a server_vad JSON object')
    if raw is not None and raw.strip() == "auto":
        return VadParams()
    obj = bracketed or _json_object(raw)
    if obj.get("type") != "server_vad":
        raise _bad('chunking_strategy must be "auto" or an object with "type": "server_vad"')
    unknown = sorted(set(obj) - {"type", *FIELDS})
    if unknown:
        raise _bad(f"unknown chunking_strategy field {unknown[0]!r}; known: type, {', '.join(FIELDS)}")
    return VadParams(**{name: _number(name, obj[name]) for name in FIELDS if name in obj})


def _json_object(raw: str) -> dict:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise _bad('chunking_strategy must be "auto" or a server_vad JSON object') from None
    if not isinstance(obj, dict):
        raise _bad('chunking_strategy must be "auto" or a server_vad JSON object')
    return obj


def _number(name: str, value: Any) -> float | int:
    kind, low, high = FIELDS[name]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not low <= number <= high or (kind is int and number != int(number)):
        raise _bad(f"chunking_strategy.{name} must be {'an integer' if kind is int else 'a number'} in [{low}, {high}]")
    return kind(number)
