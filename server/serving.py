"""Run the HTTP app under uvicorn with a shutdown deadline.

uvicorn alone waits for every open request to finish before the app's lifespan (and so the engine) hears of
a shutdown, with no upper bound. Here the first SIGTERM/SIGINT also tells the pipeline at once: it stops
accepting, answers queued requests 503 with Retry-After, gives running ones `shutdown_grace_seconds` to finish,
then answers them 503 too; uvicorn then has nothing left to wait for and exits. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import sys

import uvicorn
from fastapi import FastAPI

from canary_server.pipeline import Pipeline
from canary_server.pipeline.engine import EngineState
from canary_server.server.connections import (
    LISTEN_BACKLOG,
    ConnectionLimits,
    connection_cap,
    deadline_protocol,
    raise_descriptor_limit,
)
from canary_server.server.request_log import install_request_logging
from canary_server.server.security import exposure_warnings
from canary_server.server.settings import Settings

log = logging.getLogger("canary.server")

# After the pipeline's deadline, responses still being written (slow readers) or bodies still arriving get this
# long before uvicorn cancels them.
WRITE_GRACE_SECONDS = 5.0


class DeadlineServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal also starts the pipeline's shutdown; the second exits at once. It
    also stops when the model failed to load (nothing would ever fix it)."""

    def __init__(self, config: uvicorn.Config, pipeline: Pipeline, grace: float) -> None:
        super().__init__(config)
        self.pipeline, self.grace = pipeline, grace
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        # uvicorn ticks every 0.1 s
        return self.pipeline.state is EngineState.FAILED or await super().on_tick(counter)

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            sys.stderr.write(f"canary-server: signal {sig} again: exiting now\n")
            sys.stderr.flush()
            os._exit(128 + sig)
        super().handle_exit(sig, frame)
        # A signal handler must not take the engine's lock (the loop thread may hold it): run on the loop instead.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._begin_shutdown)

    def _begin_shutdown(self) -> None:
        log.info("shutting down: queued requests get 503; running ones have %g s to finish", self.grace)
        self.pipeline.shutdown(self.grace)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The settings' connection limits, the cap kept below the descriptor limit (raised first where allowed)."""
    descriptors = raise_descriptor_limit()
    cap = connection_cap(settings.max_connections, descriptors)
    if cap < settings.max_connections:
        log.warning(
            "max_connections %d lowered to %d: the process may open %d files (raise `ulimit -n` / LimitNOFILE)",
            settings.max_connections,
            cap,
            descriptors,
        )
    return ConnectionLimits(settings.header_timeout_seconds, settings.body_timeout_seconds, settings.body_min_rate, cap)


def _log_config() -> dict:
    """uvicorn's logging, each line starting with its time as canary-server's own lines do (cli/__init__.py)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    return config


def run_server(app: FastAPI, settings: Settings) -> None:
    """Serve `app` (its pipeline on `app.state.pipeline`) as the settings say, until a signal stops it."""
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=_log_config(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds + WRITE_GRACE_SECONDS),
        http=deadline_protocol(connection_limits(settings)),
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=settings.keep_alive_seconds,  # type: ignore[arg-type]  # a float works (call_later)
        # X-Forwarded-For/-Proto only from the proxies named (uvicorn alone believes them from loopback).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies,
        # Realtime (/v1/realtime): WebSocket messages capped as they arrive
        ws_max_size=int(settings.realtime_max_frame_mb * 1024 * 1024),
    )
    install_request_logging(settings.log_format)  # after uvicorn.Config has set up its own handlers
    DeadlineServer(config, app.state.pipeline, settings.shutdown_grace_seconds).run()
