"""FastAPI dependencies: the shared objects on `app.state`, and the API-key check."""

from __future__ import annotations

import hmac

from fastapi import Request

from canary_server.pipeline import EngineNotReady, Pipeline
from canary_server.server.errors import ApiError
from canary_server.server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def ready_pipeline(request: Request) -> Pipeline:
    """The pipeline, or a 503 while the model loads."""
    pipeline: Pipeline = request.app.state.pipeline
    if not pipeline.ready:
        raise EngineNotReady(pipeline.engine.not_ready_message())
    return pipeline


def require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
