"""The FastAPI application: `create_app(settings)` wires settings, the pipeline, limits, errors and routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from canary_server.pipeline import Pipeline
from canary_server.pipeline.engine import Engine, load_model
from canary_server.pipeline.pipeline import AudioDecoder
from canary_server.server.errors import install_error_handler, keep_private
from canary_server.server.limits import SpoolBudgetMiddleware, UploadLimitMiddleware
from canary_server.server.metrics import Metrics, MetricsMiddleware
from canary_server.server.realtime import realtime_gate
from canary_server.server.realtime import router as realtime_router
from canary_server.server.request_log import RequestIdMiddleware
from canary_server.server.routes import audio, health, metrics, models, page
from canary_server.server.security import ApiKeyMiddleware, HostCheckMiddleware, add_origin_rules, allowed_hosts
from canary_server.server.settings import Settings


def build_pipeline(
    settings: Settings,
    *,
    engine: Engine | None = None,
    decode_audio: AudioDecoder | None = None,
    model_dir: Path | None = None,
):
    """The pipeline the settings describe (`engine` and `decode_audio` default to the real model and decoder).
    `model_dir`: the settings' model already resolved to a converted directory (`canary-server serve` does that
    first, with progress); the engine thread then only loads it."""

    def loader():
        return load_model(
            str(model_dir) if model_dir else settings.model, settings.cache_dir, settings.dtype, settings.decoder_bits
        )

    return Pipeline(loader, settings.pipeline_config(), engine=engine, decode_audio=decode_audio)


def create_app(
    settings: Settings | None = None,
    *,
    pipeline: Pipeline | None = None,
    engine: Engine | None = None,
    decode_audio: AudioDecoder | None = None,
    model_dir: Path | None = None,
    services: Sequence[AbstractAsyncContextManager] = (),
) -> FastAPI:
    """The app over `pipeline` (default: the one `settings` describe; tests inject fake engines or decoders).
    The app's lifespan starts the pipeline's engine and closes it on shutdown. `services` (other front doors on
    the same pipeline, e.g. the Wyoming server) are entered after the engine starts, in the same event loop,
    and exited before it closes."""
    settings = settings if settings is not None else Settings.load()
    logging.getLogger("canary").setLevel(settings.log_level.upper())
    if pipeline is None:
        pipeline = build_pipeline(settings, engine=engine, decode_audio=decode_audio, model_dir=model_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipeline.start()  # loads the model on its own thread; /health says 503 until it is ready
        try:
            async with AsyncExitStack() as stack:
                for service in services:
                    await stack.enter_async_context(service)
                yield
        finally:
            await run_in_threadpool(pipeline.close)

    # /docs and /redoc with their Swagger UI / ReDoc files served from the installed package: they work offline.
    app = FastAPIOffline(title="canary-server", version=_version(), lifespan=lifespan)
    app.state.settings = settings
    app.state.pipeline = pipeline
    app.state.engine = pipeline.engine
    app.state.started_at = int(time.time())
    app.state.realtime = realtime_gate(settings)  # Realtime sessions and the live audio they hold
    keep_private(settings.model, settings.cache_dir, model_dir, Path.home() / ".cache")  # out of /health, 503s
    install_error_handler(app)
    # The last added runs first: the Host check, the Origin rule, then the API key (all before the body is read),
    # then the budget of bodies held by all requests and the upload limit while the body streams in.
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(SpoolBudgetMiddleware, max_bytes=settings.max_spooled_upload_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, prefix="/v1")
    add_origin_rules(app, settings)
    app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts(settings))
    # Outermost: every response, refusals included, is counted and carries its X-Request-ID.
    app.state.metrics = Metrics(pipeline.snapshot)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(audio.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")
    app.include_router(realtime_router, prefix="/v1")
    app.include_router(page.router)
    return app


def _version() -> str:
    from canary_server import __version__

    return __version__
