"""GET /v1/models: the loaded model and the OpenAI names it answers to."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from canary_server.server.deps import get_settings
from canary_server.server.errors import ApiError, ErrorRoute
from canary_server.server.schemas import ModelCard, ModelList
from canary_server.server.settings import Settings

router = APIRouter(route_class=ErrorRoute)


def _card(request: Request, model_id: str) -> ModelCard:
    card = ModelCard(id=model_id, created=request.app.state.started_at, owned_by="canary-server")
    info = request.app.state.pipeline.engine.info  # None while the model loads
    if info is not None:
        card = card.model_copy(
            update={
                "family": info.family or None,
                "languages": list(info.languages),
                "decoding": info.decoding,
                "timestamps": info.timestamp_source,
                "language_detection": info.detects_language,
            }  # fmt: skip
        )
    return card


@router.get("/models")
async def list_models(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> ModelList:
    return ModelList(data=[_card(request, m) for m in settings.served_models])


@router.get("/models/{model_id:path}")
async def get_model(request: Request, model_id: str, settings: Annotated[Settings, Depends(get_settings)]) -> ModelCard:
    if model_id not in settings.served_models:
        raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
    return _card(request, model_id)
