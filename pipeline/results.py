"""A whole request's transcript: the per-chunk model results joined, with times relative to the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from canary_server.pipeline.chunking import Chunk
from canary_server.pipeline.language import DetectedLanguage


@dataclass(frozen=True)
class Segment:
    id: int
    start: float  # seconds from the start of the file
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0  # mean log-probability of the decoded tokens of this piece of audio


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from the start of the file
    end: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float

    @property
    def bytes(self) -> list[int]:
        return list(self.token.encode("utf-8"))


@dataclass(frozen=True)
class TranscriptResult:
    text: str
    language: str  # ISO-639-1 code of the output text
    duration: float
    task: Literal["transcribe", "translate"]
    segments: list[Segment]
    words: list[Word] | None = None  # None: the request did not ask for word times
    logprobs: list[TokenLogprob] | None = None  # per decoded token, in order (chunks joined)
    source_language: str | None = None  # ISO-639-1 code of the speech
    tokens: list[int] = field(default_factory=list)  # every generated token id, chunks joined
    detected_language: DetectedLanguage | None = None  # when the source language was detected from the audio


def assemble(
    chunks: list[Chunk], results: list[Any], *, duration: float, language: str, task: str, source_language: str,
    timestamps: bool, detected_language: DetectedLanguage | None = None,
) -> TranscriptResult:  # fmt: skip
    """Join per-chunk model results (`model.Transcription`): text, segments (model-timed where the model gave
    times, else one per chunk), words, token log-probs; chunk-relative times move by the chunk's start."""
    segments: list[Segment] = []
    words: list[Word] = []
    logprobs: list[TokenLogprob] = []
    tokens: list[int] = []
    for chunk, res in zip(chunks, results, strict=True):
        text = res.text.strip()
        tokens += [int(t) for t in res.tokens]
        lps = list(getattr(res, "logprobs", None) or [])
        avg = sum(lps) / len(lps) if lps else 0.0
        logprobs += [TokenLogprob(p, lp) for p, lp in zip(getattr(res, "pieces", None) or [], lps, strict=False)]
        if timestamps and res.segments:
            for seg in res.segments:
                segments.append(
                    Segment(len(segments), chunk.start + seg.start, chunk.start + seg.end, seg.text, [], avg)
                )
            words += [Word(w.word, chunk.start + w.start, chunk.start + w.end) for w in res.words]
        elif text:  # no timestamps (or none emitted for this chunk): one segment spanning the chunk
            segments.append(Segment(len(segments), chunk.start, chunk.end, text, [int(t) for t in res.tokens], avg))
    return TranscriptResult(
        text=" ".join(s.text for s in segments),
        language=language,
        duration=duration,
        task=task,  # type: ignore[arg-type]
        segments=segments,
        words=words if timestamps else None,
        logprobs=logprobs,
        source_language=source_language,
        tokens=tokens,
        detected_language=detected_language,
    )
