"""One Wyoming event read from an untrusted client, every length checked before anything is read.

The frame is wyoming's (`wyoming/event.py`): a JSON header line `{"type", "data"?, "data_length"?,
"payload_length"?, "version"?}`, then `data_length` bytes of JSON merged into `data`, then `payload_length` bytes
(the audio). wyoming's own reader trusts the lengths (`payload_length: 2.5` hangs, a huge one is awaited) and
lets malformed JSON escape as Python errors; this one raises FrameError with a sentence for the client instead.
The header line's limit is the StreamReader's own (`limit=MAX_HEADER_BYTES` where the server accepts).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wyoming.event import Event

from canary_server.wyoming_server.limits import FrameError

MAX_HEADER_BYTES = 8 * 1024  # wyoming's own headers are ~100 bytes
MAX_DATA_BYTES = 64 * 1024  # what a client sends as data: a language, an audio format
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # one audio-chunk: 2 min of 16 kHz 16-bit (Home Assistant sends 2 KiB)


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, or None when the client closed the connection between events."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise FrameError("the connection ended inside an event header") from None
    except asyncio.LimitOverrunError:
        raise FrameError(f"event header longer than {MAX_HEADER_BYTES} bytes") from None
    header = _json_object(line, "event header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise FrameError('event header without a "type" string')
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise FrameError('event "data" is not a JSON object')
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    if data_length:
        data = {**data, **_json_object(await _exactly(reader, data_length), "event data")}
    payload = await _exactly(reader, payload_length) if payload_length else None
    return Event(type=kind, data=data, payload=payload)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser's depth, a 5000-digit int
        raise FrameError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def _length(header: dict[str, Any], name: str, most: int) -> int:
    value = header.get(name)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise FrameError(f"{name} must be an integer in [0, {most}], not {json.dumps(value)[:40]}")
    return value


async def _exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise FrameError("the connection ended inside an event") from None
