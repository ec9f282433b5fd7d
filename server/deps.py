"""FastAPI dependencies: the shared objects on `app.state` (the API key is checked earlier, server/security.py)."""

from __future__ import annotations

from fastapi import Request

from canary_server.pipeline import EngineNotReady, Pipeline
from canary_server.server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def ready_pipeline(request: Request) -> Pipeline:
    """The pipeline, or a 503 while the model loads."""
    pipeline: Pipeline = request.app.state.pipeline
    if not pipeline.ready:
        raise EngineNotReady(pipeline.engine.not_ready_message())
    return pipeline
