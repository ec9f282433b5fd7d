"""The inference engine: one dedicated thread loads the model and makes every MLX call.

Requests are submitted from the event loop and awaited as asyncio futures, so the loop never blocks on MLX.
Requests that arrive while the thread is busy are collected and run together in one `transcribe` call when
they share (source_lang, target_lang, pnc, context): a simple micro-batch. A failing request fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("canary.engine")


class TranscriptionLike(Protocol):
    text: str
    tokens: list[int]


class ModelLike(Protocol):
    """What the engine needs from `model.Canary` (tests use a fake with the same interface)."""

    languages: list[str]
    sample_rate: int
    config: Any

    def transcribe(self, audio: Any, **kwargs: Any) -> Any: ...


class EngineState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine is shut down."""


@dataclass(frozen=True)
class ModelInfo:
    """Plain facts about the loaded model, copied off the engine thread once."""

    languages: tuple[str, ...]
    sample_rate: int
    prompt_format: str

    @property
    def supports_context(self) -> bool:
        return self.prompt_format == "canary2"


@dataclass
class _Job:
    audios: list[np.ndarray]
    key: tuple[str, str, bool, str | None]  # (source_lang, target_lang, pnc, context)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def deliver(self, result: Any = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():  # cancelled: the client went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(_set)


_STOP = object()


class Engine:
    """Owns the model thread. `loader` runs on that thread and returns the model."""

    def __init__(self, loader: Callable[[], ModelLike], *, batch_size: int = 8) -> None:
        self._loader = loader
        self.batch_size = batch_size
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="canary-model", daemon=True)
        self._model: ModelLike | None = None
        self.state = EngineState.LOADING
        self.error: BaseException | None = None
        self.info: ModelInfo | None = None

    # ---- event-loop side -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self.state = EngineState.CLOSED

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    async def transcribe(
        self, audio: np.ndarray, source_lang: str, target_lang: str, pnc: bool, context: str | None
    ) -> TranscriptionLike:
        """Transcribe (or translate) one 16 kHz mono float32 clip."""
        return (await self.transcribe_batch([audio], source_lang, target_lang, pnc, context))[0]

    async def transcribe_batch(
        self, audios: Sequence[np.ndarray], source_lang: str, target_lang: str, pnc: bool, context: str | None
    ) -> list[TranscriptionLike]:
        """Several clips of one request (e.g. the chunks of long audio), decoded in the same batch."""
        if not self.ready:
            raise EngineNotReady(self.not_ready_message())
        loop = asyncio.get_running_loop()
        job = _Job(list(audios), (source_lang, target_lang, pnc, context), loop, loop.create_future())
        self._queue.put(job)
        return await job.future

    def not_ready_message(self) -> str:
        if self.state is EngineState.LOADING:
            return "the model is still loading; retry shortly"
        if self.state is EngineState.FAILED:
            return f"the model failed to load: {self.error}"
        return "the server is shutting down"

    # ---- model thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            model = self._loader()
            self.info = ModelInfo(
                languages=tuple(model.languages),
                sample_rate=int(model.sample_rate),
                prompt_format=str(getattr(model.config, "prompt_format", "canary")),
            )
            self._model = model
        except BaseException as e:  # noqa: BLE001 - reported through /health and 503s
            log.exception("model failed to load")
            self.error, self.state = e, EngineState.FAILED
            return
        self.state = EngineState.READY
        log.info("model ready: languages %s", ", ".join(self.info.languages))
        stop = False
        while not stop:
            jobs, stop = self._collect()
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._run_group(group)
        self._fail_pending()

    def _collect(self) -> tuple[list[_Job], bool]:
        """Block for one job, then take every job already waiting."""
        item = self._queue.get()
        if item is _STOP:
            return [], True
        jobs = [item]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return jobs, False
            if item is _STOP:
                return jobs, True
            jobs.append(item)

    def _run_group(self, jobs: list[_Job]) -> None:
        source_lang, target_lang, pnc, context = jobs[0].key
        audios = [a for job in jobs for a in job.audios]
        try:
            results = self._model.transcribe(
                audios,
                source_lang=source_lang,
                target_lang=target_lang,
                pnc=pnc,
                context=context,
                batch_size=self.batch_size,
            )
        except Exception as e:
            if len(jobs) > 1:  # find the culprit: the others must still succeed
                for job in jobs:
                    self._run_group([job])
            else:
                jobs[0].deliver(error=e)
            return
        start = 0
        for job in jobs:
            job.deliver(list(results[start : start + len(job.audios)]))
            start += len(job.audios)

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.deliver(error=EngineNotReady("the server is shutting down"))


def load_model(settings: Any) -> ModelLike:
    """Resolve the configured model (converting it on first boot) and load it. Runs on the engine thread."""
    import model
    from convert.cache import resolve_model

    path = resolve_model(settings.model, cache_dir=settings.cache_dir, dtype=settings.dtype)
    log.info("loading model from %s", path)
    return model.load(path)
