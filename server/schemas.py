"""Response bodies of the non-audio routes (/v1/models, /health); transcript bodies are pipeline.formats."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["loading", "ok", "failed", "closed"]
    model: str
    error: str | None = None
