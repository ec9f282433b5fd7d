"""OpenAI's transcript formats (json, text, srt, vtt, verbose_json) and stream events, rendered from a
`TranscriptResult`: the same bodies whichever front door (HTTP, the CLI) asked for them."""

from __future__ import annotations

import json
import zlib
from enum import Enum
from typing import Literal

from pydantic import BaseModel

from canary_server.pipeline.errors import UnknownFormat
from canary_server.pipeline.results import TranscriptResult


class ResponseFormat(str, Enum):
    json = "json"
    text = "text"
    srt = "srt"
    vtt = "vtt"
    verbose_json = "verbose_json"


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class LogprobJson(BaseModel):
    token: str
    bytes: list[int]
    logprob: float


class LanguageJson(BaseModel):
    code: str  # ISO-639-1


class TranscriptionJson(BaseModel):
    text: str
    languages: list[LanguageJson] | None = None  # only when the language was detected (empty: not reliably)
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


# ISO-639-1 -> the language name OpenAI puts in verbose_json ("english"). Covers every Canary language.
LANGUAGE_NAMES = {
    "bg": "bulgarian", "cs": "czech", "da": "danish", "de": "german", "el": "greek", "en": "english",
    "es": "spanish", "et": "estonian", "fi": "finnish", "fr": "french", "hr": "croatian",
    "hu": "hungarian", "it": "italian", "lt": "lithuanian", "lv": "latvian", "mt": "maltese",
    "nl": "dutch", "pl": "polish", "pt": "portuguese", "ro": "romanian", "ru": "russian",
    "sk": "slovak", "sl": "slovenian", "sv": "swedish", "uk": "ukrainian",
}  # fmt: skip


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(round(seconds * 1000), 0)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt_timestamp(seconds: float) -> str:
    return _timestamp(seconds, ",")


def vtt_timestamp(seconds: float) -> str:
    return _timestamp(seconds, ".")


def compression_ratio(text: str) -> float:
    """As whisper computes it: raw bytes over zlib-compressed bytes."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def render_json(r: TranscriptResult, with_logprobs: bool = False) -> dict:
    body = TranscriptionJson(
        text=r.text, languages=_languages(r), logprobs=_logprobs(r) if with_logprobs else None, usage=_usage(r)
    )
    return body.model_dump(exclude_none=True)


def _languages(r: TranscriptResult) -> list[LanguageJson] | None:
    """OpenAI's `languages` (gpt-transcribe): the detected language, or [] when detection was not confident
    (the default language was decoded then). None (left out) when the request named its language."""
    d = r.detected_language
    if d is None:
        return None
    return [] if d.fell_back else [LanguageJson(code=d.language)]


def _logprobs(r: TranscriptResult) -> list[LogprobJson]:
    return [LogprobJson(token=t.token, bytes=t.bytes, logprob=t.logprob) for t in r.logprobs or []]


def _usage(r: TranscriptResult) -> DurationUsage:
    return DurationUsage(seconds=round(r.duration, 3))


def render_text(r: TranscriptResult) -> str:
    return r.text + "\n"


def render_srt(r: TranscriptResult) -> str:
    cues = [
        f"{i}\n{srt_timestamp(s.start)} --> {srt_timestamp(s.end)}\n{s.text}\n"
        for i, s in enumerate(r.segments, start=1)
    ]
    return "\n".join(cues)


def render_vtt(r: TranscriptResult) -> str:
    cues = [f"{vtt_timestamp(s.start)} --> {vtt_timestamp(s.end)}\n{s.text}\n" for s in r.segments]
    return "\n".join(["WEBVTT\n", *cues])


def render_verbose_json(r: TranscriptResult) -> dict:
    segments = [
        VerboseSegment(
            id=s.id,
            seek=round(s.start * 100),  # whisper's seek is in 10 ms feature frames
            start=round(s.start, 3),
            end=round(s.end, 3),
            text=s.text,
            tokens=s.tokens,
            avg_logprob=s.avg_logprob,
            compression_ratio=compression_ratio(s.text),
        )
        for s in r.segments
    ]
    words = None
    if r.words is not None:
        words = [VerboseWord(word=w.word, start=round(w.start, 3), end=round(w.end, 3)) for w in r.words]
    return TranscriptionVerbose(
        task=r.task,
        language=LANGUAGE_NAMES.get(r.language, r.language),
        duration=round(r.duration, 3),
        text=r.text,
        segments=segments,
        words=words,
        usage=DurationUsage(seconds=round(r.duration, 3)),
    ).model_dump(exclude_none=True)


def render(r: TranscriptResult, fmt: ResponseFormat | str, with_logprobs: bool = False) -> dict | str:
    """The body of `fmt` (a ResponseFormat or its name, e.g. "json"): a dict for json / verbose_json, text for the
    others. Any other name raises UnknownFormat."""
    fmt = response_format(fmt)
    if fmt is ResponseFormat.json:
        return render_json(r, with_logprobs)
    return _RENDERERS[fmt](r)


def response_format(fmt: ResponseFormat | str) -> ResponseFormat:
    try:
        return ResponseFormat(fmt)
    except ValueError:
        names = ", ".join(f.value for f in ResponseFormat)
        raise UnknownFormat(f"unknown response format {fmt!r}: use one of {names}") from None


_RENDERERS = {
    ResponseFormat.verbose_json: render_verbose_json,
    ResponseFormat.text: render_text,
    ResponseFormat.srt: render_srt,
    ResponseFormat.vtt: render_vtt,
}


def sse_delta(delta: str) -> str:
    return _sse({"type": "transcript.text.delta", "delta": delta})


def sse_done(r: TranscriptResult, with_logprobs: bool = False) -> str:
    event: dict = {"type": "transcript.text.done", "text": r.text}
    if (languages := _languages(r)) is not None:
        event["languages"] = [lang.model_dump() for lang in languages]
    if with_logprobs:
        event["logprobs"] = [lp.model_dump() for lp in _logprobs(r)]
    event["usage"] = _usage(r).model_dump()
    return _sse(event)


def sse_error(err) -> str:
    """A mid-stream failure: the SDK raises APIError on an event with an `error` key."""
    return _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False, allow_nan=False)}\n\n"  # NaN is not JSON
