"""The FastAPI application: `create_app(settings)` wires settings, engine, limits, errors and routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from server.deps import require_api_key
from server.engine import Engine, load_model
from server.errors import install_error_handler
from server.limits import UploadLimitMiddleware
from server.routes import audio, health, models
from server.settings import Settings
from server.transcriber import AudioDecoder, default_decoder


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    decode_audio: AudioDecoder | None = None,
) -> FastAPI:
    """The app. `engine` and `decode_audio` default to the real model and decoder (tests inject fakes)."""
    settings = settings if settings is not None else Settings.load()
    logging.getLogger("canary").setLevel(settings.log_level.upper())
    if engine is None:
        engine = Engine(
            lambda: load_model(settings),
            batch_size=settings.batch_size,
            encode_seconds=settings.encode_batch_seconds,
            max_queue=settings.max_queued_requests,
            beam_size=settings.beam_size,
            length_penalty=settings.length_penalty,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()  # loads the model on its own thread; /health says 503 until it is ready
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="canary-server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.decode_audio = decode_audio or default_decoder()
    app.state.started_at = int(time.time())
    install_error_handler(app)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.include_router(health.router)
    app.include_router(audio.router, prefix="/v1", dependencies=[Depends(require_api_key)])
    app.include_router(models.router, prefix="/v1", dependencies=[Depends(require_api_key)])
    return app
