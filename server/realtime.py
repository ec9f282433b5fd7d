"""OpenAI Realtime transcription: `GET /v1/realtime?intent=transcription`, a WebSocket of JSON events.

The Host, Origin and API key rules run before the handshake is accepted (server/security.py). A session holds one
`LiveTurns` (pipeline/live_turns.py: PCM in, Silero turn detection) and at most one open turn, a live stream in the
engine (`Pipeline.open_stream`: NeMo's streaming Canary decoding; a session without a language has each turn's
language detected from its first `live_detect_seconds`, never a translation), whose committed text goes out as
`conversation.item.input_audio_transcription.delta` while the user speaks and `.completed` after the turn ends
(a `commit`, or `server_vad`'s silence). Every byte held is counted: the session's frame size (uvicorn's
`ws_max_size`), each turn's seconds, all turns' audio together (`RealtimeGate`); a silent session and a long one
are closed; bad events get an `error` event and the session goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from canary_server.model.errors import AudioDecodeError, UnsupportedLanguageError
from canary_server.pipeline import Pipeline
from canary_server.pipeline.errors import AudioTooLong, EngineNotReady, LanguageDetectionUnavailable
from canary_server.pipeline.live_stream import LiveJob, LiveUpdate
from canary_server.pipeline.live_turns import LiveTurns, TurnAudio, TurnEvent, TurnStart, TurnStop
from canary_server.pipeline.results import TokenLogprob
from canary_server.server.realtime_config import LOGPROBS, SessionConfig, SessionError, update_beta, update_ga
from canary_server.server.settings import Settings

log = logging.getLogger("canary.realtime")
router = APIRouter()
MIN_COMMIT_MS = 100  # OpenAI's least audio for a commit
BYTES_PER_SAMPLE = 4  # turns are held as float32 at the model's rate
MAX_ECHO = 128  # characters of a client's event_id sent back in an error
INLINE_PCM = 64 * 1024  # larger appends are resampled and run through the VAD off the event loop


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


class RealtimeGate:
    """Sessions open and turn audio held by all Realtime sessions together (event-loop thread only)."""

    def __init__(self, max_sessions: int, max_held_bytes: int) -> None:
        self.max_sessions, self.max_held_bytes = max_sessions, max_held_bytes
        self.sessions = 0
        self.held = 0

    def enter(self) -> bool:
        if self.sessions >= self.max_sessions:
            return False
        self.sessions += 1
        return True

    def leave(self) -> None:
        self.sessions -= 1

    def hold(self, n: int) -> bool:
        if self.held + n > self.max_held_bytes:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n


def realtime_gate(settings: Settings) -> RealtimeGate:
    return RealtimeGate(settings.realtime_max_sessions, int(settings.realtime_max_held_mb * 1024 * 1024))


@dataclass(eq=False)
class Turn:
    """One user item: its live stream and what it holds."""

    item_id: str
    job: LiveJob
    samples: int = 0
    held: int = 0  # bytes counted in the gate
    reader: asyncio.Task | None = None
    committed: bool = False


@dataclass(eq=False)
class Session:
    ws: WebSocket
    pipeline: Pipeline
    settings: Settings
    gate: RealtimeGate
    config: SessionConfig
    id: str = field(default_factory=lambda: _id("sess"))
    turns: LiveTurns | None = None
    turn: Turn | None = None
    previous_item: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    readers: set[asyncio.Task] = field(default_factory=set)
    told_no_detection: bool = False  # the model cannot detect and the session names no language: said once

    def __post_init__(self) -> None:
        self.turns = LiveTurns(self.config.rate, self.config.turn_detection, self._sample_rate())

    def _sample_rate(self) -> int:
        info = self.pipeline.engine.info
        return info.sample_rate if info is not None else 16000

    # ---- sending --------------------------------------------------------------------------------------------
    async def send(self, kind: str, **fields: Any) -> None:
        """One server event; a client that does not read it within the idle deadline is dropped."""
        event = {"type": kind, "event_id": _id("event"), **fields}
        async with self.lock:
            await asyncio.wait_for(self.ws.send_text(json.dumps(event)), self.settings.realtime_idle_seconds)

    async def error(self, message: str, *, code: str, param: str | None = None, event_id: str | None = None) -> None:
        err = {"type": "invalid_request_error", "code": code, "message": message, "param": param, "event_id": event_id}
        await self.send("error", error=err)

    # ---- the receive loop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.send("session.created", session=self.config.ga(self.id))
        ends = time.monotonic() + self.settings.realtime_max_session_seconds
        while True:
            left = ends - time.monotonic()
            # a client waiting for a transcription is not idle: only the session's length bounds that wait
            wait = left if self.readers else min(self.settings.realtime_idle_seconds, left)
            try:
                msg = await asyncio.wait_for(self.ws.receive(), max(wait, 0.0))
            except (asyncio.TimeoutError, TimeoutError):
                expired = wait >= left
                what = "session_expired" if expired else "idle_timeout"
                text = (
                    f"the session reached realtime_max_session_seconds ({self.settings.realtime_max_session_seconds:g})"
                    if expired
                    else f"no event for {self.settings.realtime_idle_seconds:g} s: the session is closed"
                )
                await self.error(text, code=what)
                return
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is None:
                await self.error("send JSON events as text messages", code="invalid_event")
                continue
            await self.handle(msg["text"])

    async def handle(self, text: str) -> None:
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
            await self.error("the message is not valid JSON", code="invalid_json")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error("an event is a JSON object with a string 'type'", code="invalid_event", param="type")
            return
        event_id = event["event_id"][:MAX_ECHO] if isinstance(event.get("event_id"), str) else None
        handler = HANDLERS.get(event["type"])
        if handler is None:
            await self.error(
                f"unknown or unsupported event type {event['type'][:64]!r} for a transcription session",
                code="unknown_event",
                param="type",
                event_id=event_id,
            )
            return
        try:
            await handler(self, event)
        except SessionError as exc:
            await self.error(exc.message, code=exc.code, param=exc.param, event_id=event_id)

    # ---- client events --------------------------------------------------------------------------------------
    async def on_session_update(self, event: dict[str, Any]) -> None:
        await self._update(update_ga(self.config, event.get("session")), "session.updated", beta=False)

    async def on_beta_update(self, event: dict[str, Any]) -> None:
        await self._update(update_beta(self.config, event.get("session")), "transcription_session.updated", True)

    async def _update(self, config: SessionConfig, reply: str, beta: bool) -> None:
        if config.model not in self.settings.served_models:
            served = ", ".join(self.settings.served_models)
            message = f"model {config.model!r} is not served here; use one of: {served}"
            raise SessionError(message, "model", "model_not_found")
        if config.language:
            try:
                config = replace(config, language=self.pipeline.check_language(config.language.lower()))
            except UnsupportedLanguageError as exc:
                raise SessionError(str(exc), "language", "unsupported_language") from None
            except EngineNotReady as exc:
                raise SessionError(str(exc), None, "model_not_ready") from None
        if (config.rate, config.turn_detection) != (self.config.rate, self.config.turn_detection):
            await self._drop_turn()  # a new format or turn rule starts from an empty buffer
            self.turns = LiveTurns(config.rate, config.turn_detection, self._sample_rate())
        self.config, self.told_no_detection = config, False
        await self.send(reply, session=config.beta(self.id) if beta else config.ga(self.id))

    async def on_append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise SessionError("input_audio_buffer.append needs 'audio': base64 of 16-bit PCM", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise SessionError("'audio' is not valid base64", "audio", "invalid_base64") from None
        if len(pcm) > INLINE_PCM:  # seconds of audio in one message: keep HTTP and other sessions answered
            await self._events(await asyncio.to_thread(self.turns.add, pcm))
        else:
            await self._events(self.turns.add(pcm))

    async def on_commit(self, event: dict[str, Any]) -> None:
        await self._events(self.turns.flush())
        turn = self.turn
        if turn is None or turn.samples * 1000 < MIN_COMMIT_MS * self._sample_rate():
            await self._drop_turn()
            raise SessionError(
                f"the input audio buffer holds less than {MIN_COMMIT_MS} ms of audio: nothing to commit",
                None,
                "input_audio_buffer_commit_empty",
            )
        await self._commit()

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.turns.clear()
        await self._drop_turn()
        await self.send("input_audio_buffer.cleared")

    # ---- turns ----------------------------------------------------------------------------------------------
    async def _events(self, events: list[TurnEvent]) -> None:
        for ev in events:
            if isinstance(ev, TurnStart):
                turn = await self._open()
                if turn is not None:
                    await self.send("input_audio_buffer.speech_started", audio_start_ms=ev.ms, item_id=turn.item_id)
            elif isinstance(ev, TurnAudio):
                await self._feed(ev.samples)
            elif isinstance(ev, TurnStop) and self.turn is not None:
                await self.send("input_audio_buffer.speech_stopped", audio_end_ms=ev.ms, item_id=self.turn.item_id)
                await self._commit()

    async def _open(self) -> Turn | None:
        if self.turn is not None:
            return self.turn
        try:
            options = self.pipeline.options(self.config.language)
            job = self.pipeline.open_stream(options, self._streaming(), self.settings.realtime_max_turn_seconds)
        except EngineNotReady as exc:
            await self.error(str(exc), code="model_not_ready")
            return None
        except LanguageDetectionUnavailable as exc:
            if not self.told_no_detection:  # once per session configuration, not once per append
                self.told_no_detection = True
                await self.error(str(exc), code="language_detection_unavailable", param="language")
            return None
        self.turn = Turn(_id("item"), job)
        self.turn.reader = asyncio.create_task(self._read(self.turn))
        self.readers.add(self.turn.reader)
        self.turn.reader.add_done_callback(self.readers.discard)
        return self.turn

    def _streaming(self) -> Any:
        from canary_server.model.stream_buffer import StreamingConfig

        s = self.settings
        return StreamingConfig(
            s.realtime_chunk_seconds, s.realtime_left_context_seconds, s.realtime_right_context_seconds,
            s.realtime_policy,
        )  # fmt: skip

    async def _feed(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        turn = await self._open()
        if turn is None:
            return
        n = len(samples) * BYTES_PER_SAMPLE
        if not self.gate.hold(n):
            await self.error(
                "the server holds realtime_max_held_mb of live audio already: this audio was dropped; retry shortly",
                code="rate_limit_exceeded",
            )
            return
        try:
            turn.job.feed(samples)
        except AudioTooLong as exc:
            self.gate.release(n)
            await self.error(f"{exc} (realtime_max_turn_seconds): commit or clear the buffer", code="audio_too_long")
            return
        except AudioDecodeError as exc:  # samples the decoder refuses (16-bit PCM cannot make them: a guard)
            self.gate.release(n)
            await self.error(str(exc), code="invalid_audio", param="audio")
            return
        turn.held += n
        turn.samples += len(samples)

    async def _commit(self) -> None:
        turn = self.turn
        if turn is None:
            return
        self.turn, turn.committed = None, True
        item = {
            "id": turn.item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        prev = self.previous_item
        await self.send("input_audio_buffer.committed", item_id=turn.item_id, previous_item_id=prev)
        await self.send("conversation.item.added", item=item, previous_item_id=prev)
        await self.send("conversation.item.done", item=item, previous_item_id=prev)
        self.previous_item = turn.item_id
        turn.job.end()

    async def _drop_turn(self) -> None:
        turn, self.turn = self.turn, None
        if turn is not None:
            turn.job.close()
            if turn.reader is not None:
                turn.reader.cancel()
            self._release(turn)

    def _release(self, turn: Turn) -> None:
        self.gate.release(turn.held)
        turn.held = 0

    async def _read(self, turn: Turn) -> None:
        """The turn's live stream -> delta events while it decodes, then completed (or failed)."""
        final = False
        try:
            async for update in turn.job.updates():
                if update.delta:
                    await self.send(
                        "conversation.item.input_audio_transcription.delta",
                        item_id=turn.item_id, content_index=0, delta=update.delta,
                        **self._logprobs(update.new_logprobs),
                    )  # fmt: skip
                if update.final:
                    final = True
                    self._release(turn)
                    seconds = round(turn.samples / self._sample_rate(), 3)
                    await self.send(
                        "conversation.item.input_audio_transcription.completed",
                        item_id=turn.item_id, content_index=0, transcript=update.text.strip(),
                        usage={"type": "duration", "seconds": seconds}, **_languages(update),
                        **self._logprobs(update.logprobs),
                    )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine failed this stream: the client hears why
            code = "model_not_ready" if isinstance(exc, EngineNotReady) else "transcription_failed"
            error = {"type": "server_error", "code": code, "message": str(exc) or type(exc).__name__, "param": None}
            if not isinstance(exc, EngineNotReady | AudioTooLong):
                log.error("realtime transcription failed", exc_info=exc)
            with contextlib.suppress(Exception):
                await self.send(
                    "conversation.item.input_audio_transcription.failed",
                    item_id=turn.item_id, content_index=0,
                    error=error,
                )  # fmt: skip
        finally:
            self._release(turn)
            if not final:
                turn.job.close()

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        """`logprobs` for a delta or completed event when the session's `include` asks, OpenAI's
        {token, bytes, logprob} as `include[]=logprobs` gives them for files."""
        if LOGPROBS not in self.config.include:
            return {}
        return {"logprobs": [{"token": t.token, "bytes": t.bytes, "logprob": t.logprob} for t in logprobs]}

    async def close(self) -> None:
        await self._drop_turn()
        for task in list(self.readers):
            task.cancel()
        for task in list(self.readers):
            with contextlib.suppress(BaseException):
                await task


HANDLERS = {
    "session.update": Session.on_session_update,
    "transcription_session.update": Session.on_beta_update,
    "input_audio_buffer.append": Session.on_append,
    "input_audio_buffer.commit": Session.on_commit,
    "input_audio_buffer.clear": Session.on_clear,
}


def _languages(update: LiveUpdate) -> dict[str, Any]:
    """OpenAI's `languages` on `.completed` (as in HTTP json): the detected language, [] when detection was unsure
    and the default was decoded; left out when the session named its language."""
    d = update.detected
    if d is None:
        return {}
    return {"languages": [] if d.fell_back else [{"code": d.language}]}


def _subprotocol(ws: WebSocket) -> str | None:
    """Browsers name `realtime` (with the key as `openai-insecure-api-key.<key>`): the answer must pick one."""
    offered = ws.scope.get("subprotocols") or []
    return "realtime" if "realtime" in offered else None


@router.websocket("/realtime")
async def realtime(ws: WebSocket) -> None:
    settings: Settings = ws.app.state.settings
    gate: RealtimeGate = ws.app.state.realtime
    await ws.accept(subprotocol=_subprotocol(ws))
    intent = ws.query_params.get("intent")
    config = SessionConfig(model=settings.model_id)
    refuse = Session(ws, ws.app.state.pipeline, settings, gate, config)
    if intent not in (None, "transcription"):  # GA clients may also connect bare and set session.type
        message = "this server serves transcription sessions only: connect with ?intent=transcription"
        await _refuse(refuse, message, "unsupported_intent", 1008, param="intent")
        return
    if not gate.enter():
        n = settings.realtime_max_sessions
        message = f"{n} Realtime sessions are open (realtime_max_sessions): retry shortly"
        if n == 0:
            message = "Realtime sessions are turned off on this server (realtime_max_sessions = 0)"
        await _refuse(refuse, message, "rate_limit_exceeded", 1013)
        return
    session = Session(ws, ws.app.state.pipeline, settings, gate, config)
    session.pipeline.stats.session("realtime", +1)  # /metrics: canary_sessions{kind="realtime"}
    try:
        await session.run()
        with contextlib.suppress(Exception):
            await ws.close(1000)
    except (WebSocketDisconnect, asyncio.TimeoutError, TimeoutError, OSError, RuntimeError):
        pass  # the client left, or stopped reading (uvicorn's ClientDisconnected is an OSError)
    finally:
        await session.close()
        gate.leave()
        session.pipeline.stats.session("realtime", -1)


async def _refuse(session: Session, message: str, code: str, close_code: int, param: str | None = None) -> None:
    """An `error` event, then the close (a client already gone hears nothing, and nothing is logged)."""
    with contextlib.suppress(WebSocketDisconnect, asyncio.TimeoutError, TimeoutError, OSError, RuntimeError):
        await session.error(message, code=code, param=param)
        await session.ws.close(close_code)
