"""The Wyoming TCP server: one more front door on the same `Pipeline` (engine, batching, limits) as HTTP.

It runs in the event loop of whoever starts it: `canary-server serve` enters it in the HTTP app's lifespan, so
Home Assistant's requests and OpenAI clients' share one model and one continuous batch. Framing, events and the
info schema are the `wyoming` package's (Home Assistant's own library); frames are read by framing.py, which checks
them before reading. Connections past `max_connections` are answered an error event and closed at once, so open
descriptors stay bounded whatever clients do; limits.py holds the per-connection and total audio caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

from wyoming.error import Error
from wyoming.event import write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Info

from canary_server.pipeline import Pipeline
from canary_server.wyoming_server.framing import MAX_HEADER_BYTES
from canary_server.wyoming_server.handler import CanaryEventHandler, ConnectionLimits
from canary_server.wyoming_server.limits import AudioBudget
from canary_server.wyoming_server.zeroconf import ZeroconfAnnouncement

log = logging.getLogger("canary.wyoming")

PROJECT_URL = "https://pypi.org/project/canary-server/"
NVIDIA_URL = "https://huggingface.co/nvidia"
REFUSAL_LOG_SECONDS = 60.0  # at most one log line this often about refused connections (a flood is not a log flood)
MiB = 2**20


@dataclass(frozen=True)
class WyomingConfig:
    host: str = "127.0.0.1"
    port: int = 10300  # 0: any free port (the `wyoming_port` setting's 0 = off is decided by the caller)
    zeroconf: bool = False  # announce `_wyoming._tcp` so Home Assistant discovers the server
    model_name: str = "canary"  # shown in Home Assistant
    shutdown_grace_seconds: float = 10.0  # transcriptions in progress may finish this long when stopping
    # ---- limits (the wyoming_* settings of the same names) ----
    max_connections: int = 64  # open at once; more are answered an error event and closed
    idle_seconds: float = 30.0  # no event between utterances, or a frame half sent, this long: closed
    chunk_seconds: float = 10.0  # within an utterance, the longest wait for its next event
    max_utterance_seconds: float = 7200.0  # wall clock from an utterance's first event to its audio-stop
    max_utterance_mb: float = 32.0  # PCM held for one utterance, as it arrived (max_audio_seconds applies too)
    max_chunks: int = 50_000  # audio-chunk events in one utterance
    max_held_mb: float = 256.0  # PCM held by all connections together
    max_held_seconds: float = 3600.0  # seconds of audio held by all connections together
    partials: str = "preview"  # transcript-chunks while the audio arrives: "off", "preview", "final" (partials.py)

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            idle_seconds=self.idle_seconds,
            chunk_seconds=self.chunk_seconds,
            utterance_seconds=self.max_utterance_seconds,
            max_utterance_bytes=int(self.max_utterance_mb * MiB),
            max_chunks=self.max_chunks,
            partials=self.partials,
        )


class WyomingServer:
    """`async with WyomingServer(pipeline, config):` serves Wyoming while inside (`port`: the bound port)."""

    def __init__(self, pipeline: Pipeline, config: WyomingConfig, *, announcement: Any = None) -> None:
        self.pipeline = pipeline
        self.config = config
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._handlers: dict[asyncio.Task, CanaryEventHandler] = {}
        self._announcement = announcement  # tests inject a fake; default: a ZeroconfAnnouncement when asked for
        self.budget = AudioBudget(int(config.max_held_mb * MiB), config.max_held_seconds)
        self.refused = 0  # connections refused past max_connections, since the last log line about them
        self._refusal_logged = -REFUSAL_LOG_SECONDS

    def info(self) -> Info:
        """The `info` answer to `describe` (the model's languages: raises EngineNotReady while it loads)."""
        from canary_server import __version__

        model = AsrModel(
            name=self.config.model_name,
            description=f"NVIDIA Canary ({self.config.model_name})",
            attribution=Attribution(name="NVIDIA", url=NVIDIA_URL),
            installed=True,
            version=None,
            languages=list(self.pipeline.info.languages),
        )
        program = AsrProgram(
            name="canary-server",
            description="NVIDIA Canary speech-to-text on MLX (canary-server)",
            attribution=Attribution(name="canary-server", url=PROJECT_URL),
            installed=True,
            version=__version__,
            models=[model],
            supports_transcript_streaming=True,
            requires_external_vad=True,
        )
        return Info(asr=[program])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connected, host=self.config.host, port=self.config.port, limit=MAX_HEADER_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Wyoming server on %s:%d", self.config.host, self.port)
        if self.config.zeroconf:
            if self._announcement is None:
                self._announcement = ZeroconfAnnouncement(self.port, self.config.host)
            await self._announcement.start()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= self.config.max_connections:
            self._refuse(writer)
            return
        limits = self.config.connection_limits()
        handler = CanaryEventHandler(self.pipeline, self.info, reader, writer, budget=self.budget, limits=limits)
        task = asyncio.current_task()
        self._handlers[task] = handler
        self.pipeline.stats.session("wyoming", +1)
        try:
            await handler.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except Exception:  # a bug, not the client: one traceback, and the other connections go on
            log.exception("wyoming connection failed")
        finally:
            self._handlers.pop(task, None)
            self.pipeline.stats.session("wyoming", -1)

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Past max_connections: an error event, then closed, with no await (so a flood of connections holds each
        descriptor for one turn of the loop); nothing is read; one log line a minute at most."""
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_SECONDS:
            log.warning(
                "wyoming: refused %d connection(s): %d open (wyoming_max_connections)",
                self.refused,
                len(self._handlers),
            )
            self._refusal_logged, self.refused = now, 0
        text = f"too many open connections ({self.config.max_connections}); try again later"
        frame = io.BytesIO()
        write_event(Error(text=text, code="rate_limit_exceeded").event(), frame)
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(frame.getvalue())  # ~100 bytes on a fresh socket: sent at once
        writer.close()

    async def stop(self) -> None:
        """Stop listening, withdraw the announcement, let transcriptions in progress finish (a grace period),
        close the other connections."""
        if self._announcement is not None and self.config.zeroconf:
            with contextlib.suppress(Exception):
                await self._announcement.stop()
        if self._server is None:
            return
        self._server.close()
        for handler in list(self._handlers.values()):
            if not handler.busy:
                await handler.stop()
        busy = [t for t, h in self._handlers.items() if h.busy]
        if busy:
            _, late = await asyncio.wait(busy, timeout=self.config.shutdown_grace_seconds)
            for task in late:
                task.cancel()
        for handler in list(self._handlers.values()):
            await handler.stop()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=1.0)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> WyomingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
