"""POST /v1/audio/transcriptions and /v1/audio/translations."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from canary_server.pipeline import Pipeline, TextDelta, TranscribeOptions, TranscriptResult, formats
from canary_server.pipeline.formats import ResponseFormat
from canary_server.server.chunking import vad_params
from canary_server.server.deps import get_settings, ready_pipeline
from canary_server.server.disconnect import unless_disconnected
from canary_server.server.errors import ApiError, ErrorRoute, to_api_error
from canary_server.server.settings import Settings

router = APIRouter(route_class=ErrorRoute)

FileField = Annotated[UploadFile, File(description="Audio: aac, flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm.")]
ModelField = Annotated[str, Form()]
TextField = Annotated[str | None, Form()]
FormatField = Annotated[ResponseFormat, Form()]
TemperatureField = Annotated[float, Form(ge=0, le=1)]
# OpenAI's keywords[] (the SDK sends a list as repeated `keywords[]`); absent: the server's `keywords` setting
KeywordsField = Annotated[list[str] | None, Form(alias="keywords[]")]


def _check_model(name: str, settings: Settings, request: Request) -> None:
    """400 for a model this server does not serve; else the name goes on the request's metrics."""
    if name not in settings.served_models:
        raise ApiError(
            400,
            f"model {name!r} is not served here; use one of: {', '.join(settings.served_models)}",
            param="model",
            code="model_not_found",
        )
    request.state.model = name


async def _one_file(request: Request) -> None:
    """400 for a form with several `file` parts: which one to transcribe would be a guess (FastAPI takes the last)."""
    count = len((await request.form()).getlist("file"))  # the form FastAPI parsed, cached on the request
    if count > 1:
        raise ApiError(
            400,
            f"send one audio file per request; this one has {count} 'file' parts",
            param="file",
            code="invalid_value",
        )


def _render(result: TranscriptResult, fmt: ResponseFormat, with_logprobs: bool = False) -> Response:
    body = formats.render(result, fmt, with_logprobs)
    if isinstance(body, dict):
        return JSONResponse(body)
    media = {ResponseFormat.srt: "application/x-subrip", ResponseFormat.vtt: "text/vtt"}.get(fmt, "text/plain")
    return PlainTextResponse(body, media_type=media)


def _wants_logprobs(include: list[str] | None, fmt: ResponseFormat) -> bool:
    unknown = set(include or []) - {"logprobs"}
    if unknown:
        raise ApiError(400, f"unknown include[] value(s): {', '.join(sorted(unknown))}", param="include[]")
    if include and fmt is not ResponseFormat.json:
        raise ApiError(400, "include[]=logprobs needs response_format json", param="include[]")
    return bool(include)


async def _stream(pipeline: Pipeline, data: BinaryIO, options: TranscribeOptions, with_logprobs: bool) -> Response:
    """SSE: `transcript.text.delta` as the decoder produces text, then `transcript.text.done`.

    The first event is awaited before answering, so bad audio, a full queue or a loading model still get a
    proper status code. A client that goes away closes the generator, which cancels the engine work."""
    events = pipeline.stream(data, options)
    first = await anext(events)

    async def body() -> AsyncIterator[str]:
        try:
            event = first
            while True:
                if isinstance(event, TextDelta):
                    yield formats.sse_delta(event.text)
                else:
                    yield formats.sse_done(event, with_logprobs)
                    return
                event = await anext(events)
        except Exception as exc:  # after the 200 header: the error travels as an SSE event
            yield formats.sse_error(to_api_error(exc))
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream")


def _wants_timestamps(fmt: ResponseFormat, granularities: set[str]) -> bool:
    """Model times only where the response shows them; json/text keep the ordinary prompt."""
    if fmt in (ResponseFormat.srt, ResponseFormat.vtt):
        return True
    return fmt is ResponseFormat.verbose_json and bool(granularities)


async def _run(request: Request, pipeline: Pipeline, file: UploadFile, options: TranscribeOptions) -> TranscriptResult:
    # The upload stays in its spooled file (on disk past 1 MiB) until the pipeline's decode gate lets it in.
    return await unless_disconnected(request, pipeline.transcribe(file.file, options))


@router.post("/audio/transcriptions")
async def create_transcription(
    request: Request,
    file: FileField,
    model: ModelField,
    settings: Annotated[Settings, Depends(get_settings)],
    language: TextField = None,
    prompt: TextField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    stream: Annotated[bool, Form()] = False,
    include: Annotated[list[str] | None, Form(alias="include[]")] = None,
    target_language: TextField = None,
    languages: Annotated[list[str] | None, Form(alias="languages[]")] = None,
    pnc: Annotated[bool, Form()] = True,
    keywords: KeywordsField = None,
) -> Response:
    """`language`: a code, or "auto" to detect it from the audio; without one it is detected too (within
    `languages[]` if sent), unless the server's `default_language` is a code. `chunking_strategy` ("auto" or a
    `server_vad` object): the VAD's threshold and pauses for this request (server/chunking.py)."""
    await _one_file(request)
    _check_model(model, settings, request)
    vad = vad_params(await request.form())
    with_logprobs = _wants_logprobs(include, response_format)
    granularities = set(timestamp_granularities or [])
    for g in granularities - {"word", "segment"}:
        raise ApiError(400, f"unknown timestamp granularity {g!r}", param="timestamp_granularities")
    if timestamp_granularities and response_format is not ResponseFormat.verbose_json:
        # OpenAI answers the same 400: only verbose_json has room for times
        raise ApiError(
            400,
            "`response_format` must be `verbose_json` if `timestamp_granularities[]` is provided "
            f"(got {response_format.value})",
            param="timestamp_granularities",
        )
    if stream and response_format not in (ResponseFormat.json, ResponseFormat.text):
        raise ApiError(400, "stream=true needs response_format json or text", param="stream")
    pipeline = ready_pipeline(request)
    if "word" in granularities and not pipeline.info.supports_timestamps:
        raise ApiError(
            400,
            "word timestamps are not available for this model: it has no timestamp output "
            "(the canary flash models and canary-1b-v2 do); use timestamp_granularities[]=segment",
            param="timestamp_granularities",
            code="unsupported_value",
        )
    options = pipeline.options(
        language,
        target_language,
        languages=languages,
        languages_role="languages[]",
        pnc=pnc,
        context=prompt,
        timestamps=_wants_timestamps(response_format, granularities),
        keywords=keywords,
        keywords_role="keywords[]",
    )
    options = dataclasses.replace(options, vad=vad)
    if stream:
        return await _stream(pipeline, file.file, options, with_logprobs)
    result = await _run(request, pipeline, file, options)
    if "word" not in granularities:
        result = dataclasses.replace(result, words=None)
    return _render(result, response_format, with_logprobs)


@router.post("/audio/translations")
async def create_translation(
    request: Request,
    file: FileField,
    model: ModelField,
    settings: Annotated[Settings, Depends(get_settings)],
    language: TextField = None,
    prompt: TextField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    pnc: Annotated[bool, Form()] = True,
    keywords: KeywordsField = None,
) -> Response:
    """Translate to English; the source language comes from `language` ("auto": detected) or the configured
    default. `keywords[]` (not in OpenAI's translation API: the SDK sends it with extra_body) boosts phrases."""
    await _one_file(request)
    _check_model(model, settings, request)
    pipeline = ready_pipeline(request)
    options = pipeline.options(
        language,
        "en",
        pnc=pnc,
        context=prompt,
        timestamps=_wants_timestamps(response_format, set()),
        keywords=keywords,
        keywords_role="keywords[]",
    )
    return _render(await _run(request, pipeline, file, options), response_format)
