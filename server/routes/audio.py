"""POST /v1/audio/transcriptions and /v1/audio/translations."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from server import formats
from server.deps import get_settings, ready_engine
from server.engine import Engine
from server.errors import ApiError, ErrorRoute, to_api_error
from server.schemas import ResponseFormat, TranscribeOptions, TranscriptResult
from server.settings import Settings
from server.transcriber import check_language, stream_bytes, transcribe_bytes

router = APIRouter(route_class=ErrorRoute)

FileField = Annotated[UploadFile, File(description="Audio: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm.")]
ModelField = Annotated[str, Form()]
TextField = Annotated[str | None, Form()]
FormatField = Annotated[ResponseFormat, Form()]
TemperatureField = Annotated[float, Form(ge=0, le=1)]


def _check_model(name: str, settings: Settings) -> None:
    if name not in settings.served_models:
        raise ApiError(
            400,
            f"model {name!r} is not served here; use one of: {', '.join(settings.served_models)}",
            param="model",
            code="model_not_found",
        )


def _render(result: TranscriptResult, fmt: ResponseFormat, with_logprobs: bool = False) -> Response:
    if fmt is ResponseFormat.json:
        return JSONResponse(formats.render_json(result, with_logprobs))
    if fmt is ResponseFormat.verbose_json:
        return JSONResponse(formats.render_verbose_json(result))
    if fmt is ResponseFormat.text:
        return PlainTextResponse(formats.render_text(result))
    if fmt is ResponseFormat.srt:
        return PlainTextResponse(formats.render_srt(result), media_type="application/x-subrip")
    return PlainTextResponse(formats.render_vtt(result), media_type="text/vtt")


def _wants_logprobs(include: list[str] | None, fmt: ResponseFormat) -> bool:
    unknown = set(include or []) - {"logprobs"}
    if unknown:
        raise ApiError(400, f"unknown include[] value(s): {', '.join(sorted(unknown))}", param="include[]")
    if include and fmt is not ResponseFormat.json:
        raise ApiError(400, "include[]=logprobs needs response_format json", param="include[]")
    return bool(include)


async def _stream(
    request: Request, engine: Engine, file: UploadFile, options: TranscribeOptions, with_logprobs: bool
) -> StreamingResponse:
    """SSE: `transcript.text.delta` as the decoder produces text, then `transcript.text.done`.

    The first event is awaited before answering, so bad audio, a full queue or a loading model still get a
    proper status code. A client that goes away closes the generator, which cancels the engine work."""
    settings: Settings = request.app.state.settings
    events = stream_bytes(
        engine,
        request.app.state.decode_audio,
        await file.read(),
        options,
        chunk_seconds=settings.chunk_seconds,
        max_audio_seconds=settings.max_audio_seconds,
    )
    first = await anext(events)

    async def body() -> AsyncIterator[str]:
        try:
            event = first
            while True:
                kind, value = event
                yield formats.sse_delta(value) if kind == "delta" else formats.sse_done(value, with_logprobs)
                if kind == "done":
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


async def _run(request: Request, engine: Engine, file: UploadFile, options: TranscribeOptions) -> TranscriptResult:
    settings: Settings = request.app.state.settings
    return await transcribe_bytes(
        engine,
        request.app.state.decode_audio,
        await file.read(),
        options,
        chunk_seconds=settings.chunk_seconds,
        max_audio_seconds=settings.max_audio_seconds,
        request=request,
    )


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
    pnc: Annotated[bool, Form()] = True,
) -> Response:
    _check_model(model, settings)
    with_logprobs = _wants_logprobs(include, response_format)
    granularities = set(timestamp_granularities or [])
    for g in granularities - {"word", "segment"}:
        raise ApiError(400, f"unknown timestamp granularity {g!r}", param="timestamp_granularities")
    if stream and response_format not in (ResponseFormat.json, ResponseFormat.text):
        raise ApiError(400, "stream=true needs response_format json or text", param="stream")
    engine = ready_engine(request)
    if "word" in granularities and not engine.info.supports_timestamps:
        raise ApiError(
            400,
            "word timestamps are not available for this model: it has no timestamp output "
            "(the canary flash models and canary-1b-v2 do); use timestamp_granularities[]=segment",
            param="timestamp_granularities",
            code="unsupported_value",
        )
    source = check_language(engine, language or settings.default_language, "language")
    target = check_language(engine, target_language or source, "target_language")
    options = TranscribeOptions(source, target, pnc, prompt or None, _wants_timestamps(response_format, granularities))
    if stream:
        return await _stream(request, engine, file, options, with_logprobs)
    result = await _run(request, engine, file, options)
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
) -> Response:
    """Translate to English; the source language comes from `language` or the configured default."""
    _check_model(model, settings)
    engine = ready_engine(request)
    source = check_language(engine, language or settings.default_language, "language")
    target = check_language(engine, "en", "target_language")
    timestamps = _wants_timestamps(response_format, set())
    result = await _run(request, engine, file, TranscribeOptions(source, target, pnc, prompt or None, timestamps))
    return _render(result, response_format)
