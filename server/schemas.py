"""Request options, internal results, and the response bodies of the OpenAI audio API."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from pydantic import BaseModel


class ResponseFormat(str, Enum):
    json = "json"
    text = "text"
    srt = "srt"
    vtt = "vtt"
    verbose_json = "verbose_json"


@dataclass(frozen=True)
class TranscribeOptions:
    """A validated request: what to decode and how."""

    source_lang: str
    target_lang: str
    pnc: bool = True
    context: str | None = None
    timestamps: bool = False  # ask the model for word/segment times (only when the response needs them)

    @property
    def task(self) -> Literal["transcribe", "translate"]:
        return "transcribe" if self.source_lang == self.target_lang else "translate"


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0  # mean log-probability of the decoded tokens of this piece of audio


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float

    @property
    def bytes(self) -> list[int]:
        return list(self.token.encode("utf-8"))


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from the start of the file
    end: float


@dataclass(frozen=True)
class TranscriptResult:
    text: str
    language: str  # ISO-639-1 code of the output text
    duration: float
    task: Literal["transcribe", "translate"]
    segments: list[Segment]
    words: list[Word] | None = None  # None: the request did not ask for word times
    logprobs: list[TokenLogprob] | None = None  # per decoded token, in order (chunks joined)


# ---- response bodies ------------------------------------------------------------------------------------
class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class LogprobJson(BaseModel):
    token: str
    bytes: list[int]
    logprob: float


class TranscriptionJson(BaseModel):
    text: str
    logprobs: list[LogprobJson] | None = None
    usage: DurationUsage | None = None


class VerboseSegment(BaseModel):
    """Every field the SDK's `TranscriptionSegment` requires. Values Canary has no notion of are neutral."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float
    no_speech_prob: float = 0.0


class VerboseWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str  # a name, as OpenAI sends it ("english")
    duration: float
    text: str
    segments: list[VerboseSegment]
    words: list[VerboseWord] | None = None
    usage: DurationUsage


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
