"""Response bodies of the non-audio routes (/v1/models, /health); transcript bodies are pipeline.formats."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    """OpenAI's model object, plus what the served Canary model is and does (extra fields the SDK keeps)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    family: str | None = None  # the release the loaded model has the shape of, e.g. "canary-1b-flash"
    languages: list[str] | None = None
    decoding: str | None = None  # "greedy" or "beam search, beam 5"
    timestamps: str | None = None  # "tokens", "ctc" or None
    # False: trained with its prompt masked (NeMo's use_loss_mask_for_prompt), so requests must name a language
    language_detection: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["loading", "ok", "unloaded", "reloading", "failed", "closing", "closed"]  # unloaded/reloading: 200
    model: str
    error: str | None = None
    requests: int = 0  # accepted by the engine and not answered yet
    queued_audio_seconds: float = 0.0  # their audio
    busy: bool = False  # the queue is full: the next request gets 429


class Readiness(BaseModel):
    """GET /health/ready, for routers: 200 for ready/unloaded, 503 for the rest."""

    status: Literal["ready", "unloaded", "busy", "loading", "reloading", "failed", "closing"]
    requests: int  # accepted by the engine and not answered yet
    queued_audio_seconds: float
