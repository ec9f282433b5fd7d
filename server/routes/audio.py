"""POST /v1/audio/transcriptions and /v1/audio/translations."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from server import formats
from server.deps import get_settings, ready_engine
from server.engine import Engine
from server.errors import ApiError, ErrorRoute
from server.schemas import ResponseFormat, TranscribeOptions, TranscriptResult
from server.settings import Settings
from server.transcriber import check_language, transcribe_bytes

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


def _render(result: TranscriptResult, fmt: ResponseFormat) -> Response:
    if fmt is ResponseFormat.json:
        return JSONResponse(formats.render_json(result))
    if fmt is ResponseFormat.verbose_json:
        return JSONResponse(formats.render_verbose_json(result))
    if fmt is ResponseFormat.text:
        return PlainTextResponse(formats.render_text(result))
    if fmt is ResponseFormat.srt:
        return PlainTextResponse(formats.render_srt(result), media_type="application/x-subrip")
    return PlainTextResponse(formats.render_vtt(result), media_type="text/vtt")


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
    target_language: TextField = None,
    pnc: Annotated[bool, Form()] = True,
) -> Response:
    _check_model(model, settings)
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
            "(only the canary flash models do); use timestamp_granularities[]=segment",
            param="timestamp_granularities",
            code="unsupported_value",
        )
    source = check_language(engine, language or settings.default_language, "language")
    target = check_language(engine, target_language or source, "target_language")
    options = TranscribeOptions(source, target, pnc, prompt or None, _wants_timestamps(response_format, granularities))
    result = await _run(request, engine, file, options)
    if "word" not in granularities:
        result = dataclasses.replace(result, words=None)
    if stream:
        return StreamingResponse(formats.sse_events(result), media_type="text/event-stream")
    return _render(result, response_format)


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
