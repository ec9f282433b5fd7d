"""GET /health: 503 while the model loads, if it failed to (what failed, without local paths) or while the server
shuts down ("closing"); 200 when ready (also "unloaded" after `idle_unload_seconds` without requests, and
"reloading" while a request loads it again).

GET /health/ready: for a router's health check. 200 "ready" (or "unloaded": the next request reloads it) when a
request sent now would be taken up; 503 with Retry-After when it would wait for a load ("loading", "reloading"),
be refused ("busy": the queue is at max_queued_requests or max_queued_audio_seconds), or fail ("failed",
"closing"). Both carry the queue depth in requests and seconds of audio."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from canary_server.pipeline import Pipeline
from canary_server.pipeline.engine import EngineState
from canary_server.server.errors import ErrorRoute, without_paths
from canary_server.server.schemas import Health, Readiness

router = APIRouter(route_class=ErrorRoute)

RETRY_AFTER = {"Retry-After": "5"}


@router.get("/health", response_model=Health)
async def health(request: Request) -> JSONResponse:
    pipeline: Pipeline = request.app.state.pipeline
    engine = pipeline.engine
    snap = pipeline.snapshot()
    body = Health(
        status="ok" if engine.state is EngineState.READY else engine.state.value,
        model=request.app.state.settings.model_id,
        requests=snap.queued_requests,
        queued_audio_seconds=round(snap.queued_audio_seconds, 3),
        busy=snap.busy,
        error=without_paths(f"{type(engine.error).__name__}: {engine.error}") if engine.error is not None else None,
    )
    ready = pipeline.ready
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers=None if ready else RETRY_AFTER)


@router.get("/health/ready", response_model=Readiness)
async def readiness(request: Request) -> JSONResponse:
    snap = request.app.state.pipeline.snapshot()
    status = {"closed": "closing"}.get(snap.state, snap.state)
    if snap.state in ("ready", "unloaded") and snap.busy:
        status = "busy"
    body = Readiness(
        status=status, requests=snap.queued_requests, queued_audio_seconds=round(snap.queued_audio_seconds, 3)
    )
    ok = status in ("ready", "unloaded")
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503, headers=None if ok else RETRY_AFTER)
