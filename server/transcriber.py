"""From uploaded bytes to a `TranscriptResult`: decode, check limits, chunk, run the engine, join."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from server.chunking import Chunk, split_audio
from server.engine import Engine
from server.errors import ApiError, ClientDisconnected
from server.schemas import Segment, TokenLogprob, TranscribeOptions, TranscriptResult, Word

AudioDecoder = Callable[[bytes], np.ndarray]
T = TypeVar("T")


async def unless_disconnected(request: Request | None, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so the request's sequences in the engine) if the client goes away.

    The body is already read, so the next ASGI message can only be `http.disconnect`."""
    task = asyncio.ensure_future(work)
    if request is None:
        return await task

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected()
    return task.result()


def default_decoder() -> AudioDecoder:
    from model.audio import load_audio

    return load_audio


def check_language(engine: Engine, language: str, param: str) -> str:
    """A language the loaded model supports, else a 400 listing the ones it does."""
    supported = engine.info.languages
    if language not in supported:
        raise ApiError(
            400,
            f"unsupported {param} {language!r}; this model supports: {', '.join(supported)}",
            param=param,
            code="unsupported_language",
        )
    return language


@dataclass(frozen=True)
class PreparedAudio:
    """Decoded, validated and chunked audio of one request, with what to ask of the model."""

    chunks: list[Chunk]
    duration: float
    context: str | None
    timestamps: bool


async def prepare_audio(
    engine: Engine,
    decode: AudioDecoder,
    data: bytes,
    options: TranscribeOptions,
    *,
    chunk_seconds: float,
    max_audio_seconds: float,
) -> PreparedAudio:
    if not data:
        raise ApiError(400, "the uploaded file is empty", param="file", code="invalid_audio")
    # Decoding and resampling are CPU work (not MLX): a worker thread keeps the event loop free.
    audio = await run_in_threadpool(decode, data)
    sample_rate = engine.info.sample_rate
    duration = len(audio) / sample_rate
    if len(audio) == 0:
        raise ApiError(400, "the audio file contains no samples", param="file", code="invalid_audio")
    if duration > max_audio_seconds:
        raise ApiError(
            400,
            f"audio is {duration:.1f} s long; this server accepts at most {max_audio_seconds:g} s",
            param="file",
            code="audio_too_long",
        )
    return PreparedAudio(
        chunks=split_audio(audio, sample_rate, chunk_seconds),
        duration=duration,
        context=options.context if engine.info.supports_context else None,
        timestamps=options.timestamps and engine.info.supports_timestamps,
    )


def engine_args(prepared: PreparedAudio, options: TranscribeOptions) -> tuple:
    """Positional arguments of `Engine.transcribe_batch` / `Engine.stream_batch`."""
    audios = [c.audio for c in prepared.chunks]
    return audios, options.source_lang, options.target_lang, options.pnc, prepared.context


def assemble(prepared: PreparedAudio, results: list, options: TranscribeOptions) -> TranscriptResult:
    """Join the per-chunk results: text, segments (model-timed where available), words, token log-probs."""
    segments: list[Segment] = []
    words: list[Word] = []
    logprobs: list[TokenLogprob] = []
    for chunk, res in zip(prepared.chunks, results, strict=True):
        text = res.text.strip()
        lps = list(getattr(res, "logprobs", None) or [])
        avg = sum(lps) / len(lps) if lps else 0.0
        logprobs += [TokenLogprob(p, lp) for p, lp in zip(getattr(res, "pieces", None) or [], lps, strict=False)]
        if prepared.timestamps and res.segments:
            # the model's own times are chunk-relative: add the chunk's start in the file
            for seg in res.segments:
                start, end = chunk.start + seg.start, chunk.start + seg.end
                segments.append(Segment(len(segments), start, end, seg.text, avg_logprob=avg))
            words += [Word(w.word, chunk.start + w.start, chunk.start + w.end) for w in res.words]
        elif text:  # no timestamps (or none emitted for this chunk): one segment spanning the chunk
            tokens = [int(t) for t in res.tokens]
            segments.append(Segment(len(segments), chunk.start, chunk.end, text, tokens, avg))
    return TranscriptResult(
        text=" ".join(s.text for s in segments),
        language=options.target_lang,
        duration=prepared.duration,
        task=options.task,
        segments=segments,
        words=words if prepared.timestamps else None,
        logprobs=logprobs,
    )


async def transcribe_bytes(
    engine: Engine,
    decode: AudioDecoder,
    data: bytes,
    options: TranscribeOptions,
    *,
    chunk_seconds: float,
    max_audio_seconds: float,
    request: Request | None = None,
) -> TranscriptResult:
    prepared = await prepare_audio(
        engine, decode, data, options, chunk_seconds=chunk_seconds, max_audio_seconds=max_audio_seconds
    )
    work = engine.transcribe_batch(*engine_args(prepared, options), prepared.timestamps)
    results = await unless_disconnected(request, work)
    return assemble(prepared, results, options)


async def stream_bytes(
    engine: Engine,
    decode: AudioDecoder,
    data: bytes,
    options: TranscribeOptions,
    *,
    chunk_seconds: float,
    max_audio_seconds: float,
) -> AsyncIterator[tuple[str, str | TranscriptResult]]:
    """("delta", text) as the decoder produces it, then ("done", result). Errors before the first event
    (bad audio, busy, loading) raise from the first `__anext__`, so the route can still answer them."""
    prepared = await prepare_audio(
        engine, decode, data, options, chunk_seconds=chunk_seconds, max_audio_seconds=max_audio_seconds
    )
    async for event in engine.stream_batch(*engine_args(prepared, options)):
        if event.kind == "delta":
            yield "delta", event.delta
        else:
            yield "done", assemble(prepared, event.results, options)
