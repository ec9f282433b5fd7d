"""FastAPI dependencies: the shared objects on `app.state`, and the API-key check."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.engine import Engine, EngineNotReady
from server.errors import ApiError
from server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def ready_engine(request: Request) -> Engine:
    """The engine, or a 503 while the model loads."""
    engine: Engine = request.app.state.engine
    if not engine.ready:
        raise EngineNotReady(engine.not_ready_message())
    return engine


def require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
