"""GET /health: 503 while the model loads, if it failed to (what failed, without local paths) or while the server
shuts down ("closing"); 200 when ready (also "unloaded" after `idle_unload_seconds` without requests, and
"reloading" while a request loads it again)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from canary_server.pipeline import Pipeline
from canary_server.pipeline.engine import EngineState
from canary_server.server.errors import ErrorRoute, without_paths
from canary_server.server.schemas import Health

router = APIRouter(route_class=ErrorRoute)


@router.get("/health", response_model=Health)
async def health(request: Request) -> JSONResponse:
    pipeline: Pipeline = request.app.state.pipeline
    engine = pipeline.engine
    body = Health(
        status="ok" if engine.state is EngineState.READY else engine.state.value,
        model=request.app.state.settings.model_id,
        requests=engine.queued,
        error=without_paths(f"{type(engine.error).__name__}: {engine.error}") if engine.error is not None else None,
    )
    return JSONResponse(body.model_dump(), status_code=200 if pipeline.ready else 503)
