"""Typed reads of NeMo `model_config.yaml` fields: each failure names the field, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import ConversionError

_MISSING = object()


def value_at(cfg: dict, dotted: str, default: Any = _MISSING) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise ConversionError(f"{dotted}: missing from model_config.yaml")
            return default
        node = node[part]
    return node


def require(field: str, value: Any, supported: Iterable[Any]) -> Any:
    supported = list(supported)
    if value not in supported or isinstance(value, bool) != isinstance(supported[0], bool):
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: {', '.join(map(repr, supported))})")
    return value


def integer(field: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: an integer >= {minimum})")
    return value


def number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: a number)")
    return float(value)


def class_name(field: str, value: Any, *suffixes: str) -> None:
    if not isinstance(value, str) or not any(value == s or value.endswith("." + s) for s in suffixes):
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: {', '.join(suffixes)})")


def none_string(value: Any) -> Any:
    """YAML `None` is the string 'None' (only null / ~ / empty are null); NeMo's recipes write the former."""
    return None if value == "None" else value
