"""The inference engine: one dedicated thread loads the model and makes every MLX call.

Requests are submitted from the event loop and awaited as asyncio futures, so the loop never blocks on MLX.
Every request, and every chunk of a long one, becomes a work item of the scheduler (`ContinuousBatcher`): the
encoder runs on padded batches of waiting items, and one decoder loop advances all active sequences together;
a finished sequence leaves at once and a waiting one joins at the next step, so a short request never waits
for a long file. Items are admitted shortest-request-first. A failing request fails alone; a cancelled one
(the client went away) leaves the batch; a full queue (requests or seconds of audio) is refused (429); shutdown
fails what has not started at once, gives what is running until a deadline, then fails the rest. When the work
runs out and nothing new comes for `release_after_idle` seconds, the model hands its freed buffers back to the
system (`release_memory`). With `idle_unload_seconds` the thread frees the model after that long without
requests and loads it again for the next one (which waits for it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from enum import Enum
from typing import Any

import numpy as np

from canary_server.pipeline.errors import EngineBusy, EngineNotReady
from canary_server.pipeline.jobs import BatcherLike, Job, JobBook, Stream, StreamEvent, TranscriptionLike
from canary_server.pipeline.live_stream import LiveJob, LiveMessage, LiveStreams
from canary_server.pipeline.loading import (
    BatcherFactory,
    ModelInfo,
    ModelLike,
    active_rows,
    default_batcher,
    free_unreferenced_memory,
    load_model,
    memory_in_use,
    model_info,
    release_memory,
)
from canary_server.pipeline.stats import PipelineStats, StatsSnapshot

__all__ = ["Engine", "EngineState", "ModelInfo", "ModelLike", "StreamEvent", "TranscriptionLike", "load_model"]

log = logging.getLogger("canary.engine")


class EngineState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    UNLOADED = "unloaded"  # freed after `idle_unload_seconds` without requests; the next request reloads it
    RELOADING = "reloading"
    FAILED = "failed"
    CLOSING = "closing"  # shutting down: no new requests; running ones finish until the deadline
    CLOSED = "closed"


ACCEPTING = (EngineState.READY, EngineState.UNLOADED, EngineState.RELOADING)


_STOP = object()


class Engine:
    """Owns the model thread. `loader` runs on that thread and returns the model."""

    def __init__(
        self,
        loader: Callable[[], ModelLike],
        *,
        batcher: BatcherFactory = default_batcher,
        batch_size: int = 16,
        encode_seconds: float = 30.0,
        max_queue: int = 64,
        beam_size: int | None = None,
        length_penalty: float | None = None,
        long_request_share: float | None = None,
        idle_unload_seconds: float | None = None,
        max_queued_seconds: float | None = None,
        max_context_tokens: int | None = None,
        release_after_idle: float = 2.0,
        keywords_alpha: float | None = None,
    ) -> None:
        self._loader = loader
        self._batcher_factory = batcher
        self.batch_size = batch_size
        self.encode_seconds = encode_seconds
        self.max_queue = max_queue
        self.beam_size, self.length_penalty = beam_size, length_penalty
        self.long_request_share = long_request_share
        self.idle_unload_seconds = idle_unload_seconds
        self.max_queued_seconds = max_queued_seconds  # audio held by accepted requests (None: no limit)
        self.max_context_tokens = max_context_tokens  # decoder context keeps its last N tokens (None: all)
        self.release_after_idle = release_after_idle  # idle seconds after work before memory goes back (0: never)
        self.keywords_alpha = keywords_alpha  # boosting_tree_alpha of keyword lists (None: the batcher's default)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._thread_main, name="canary-model", daemon=True)
        self._finished = threading.Event()  # the engine loop has ended (the thread itself stays parked)
        self.monitor = PipelineStats()  # what monitoring reads (`snapshot()`); the engine thread writes it
        self.stats = self.monitor.requests  # requests ended, by outcome
        self._book = JobBook(self.stats, self.monitor)  # submitted, not yet delivered (engine thread only)
        self._jobs = self._book.jobs
        self._live = LiveStreams()  # open live streams (engine thread only)
        self._open_jobs = 0  # submitted and not finished, counted from the event loop side
        self._open_seconds = 0.0  # their audio
        self._lock = threading.Lock()  # accepting, the counters, and the order of jobs and _STOP in the queue
        self._accepting = True
        self._deadline: float | None = None  # monotonic time by which running requests are failed (shutdown)
        self.state = EngineState.LOADING
        self.error: BaseException | None = None
        self.info: ModelInfo | None = None
        self.unloads = 0  # times the model was freed for idleness
        self.load_seconds: float | None = None  # how long the last (re)load took

    # ---- event-loop side -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, grace: float | None = 30.0) -> None:
        """Begin shutting down and return at once: new requests are refused (EngineNotReady), queued ones fail
        now, running ones get `grace` seconds (None: as long as they take) to finish, then fail. Idempotent (the
        first deadline stands). Call it from a thread or the event loop, not from a signal handler (it locks)."""
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
            self._deadline = None if grace is None else time.monotonic() + grace
            if self.state in (EngineState.LOADING, *ACCEPTING):
                self.state = EngineState.CLOSING
            self._queue.put(_STOP)  # after every job accepted before it

    def close(self, timeout: float | None = 30.0) -> None:
        """`shutdown(timeout)`, then wait for the engine loop to end (a few seconds past the deadline at most)."""
        self.shutdown(timeout)
        if self._thread.is_alive() and not self._finished.is_set():
            wait = None if self._deadline is None else max(0.0, self._deadline - time.monotonic()) + 10.0
            self._finished.wait(wait)
        self.state = EngineState.CLOSED

    @property
    def ready(self) -> bool:
        """Requests are accepted: the model is loaded, or unloaded for idleness (a request reloads it)."""
        return self.state in ACCEPTING

    @property
    def queued(self) -> int:
        return self._open_jobs

    def snapshot(self) -> StatsSnapshot:
        """What the engine has done and holds now, read from any thread (for /metrics and /health)."""
        with self._lock:
            queue = (self._open_jobs, self._open_seconds)
        limits = (self.max_queue, self.max_queued_seconds)
        return self.monitor.snapshot(state=self.state.value, queue=queue, limits=limits)

    async def transcribe(
        self, audio: np.ndarray, source_lang: str, target_lang: str, pnc: bool, context: str | None
    ) -> TranscriptionLike:
        """Transcribe (or translate) one 16 kHz mono float32 clip."""
        return (await self.transcribe_batch([audio], source_lang, target_lang, pnc, context))[0]

    async def transcribe_batch(
        self,
        audios: Sequence[np.ndarray],
        source_lang: str,
        target_lang: str,
        pnc: bool,
        context: str | None,
        timestamps: bool = False,
        beam_size: int | None = None,
        *,
        language: Any = None,
        progress: Callable[[int], None] | None = None,
        keywords: tuple[str, ...] = (),
    ) -> list[TranscriptionLike]:
        """Several clips of one request (e.g. the chunks of long audio); one result per clip, in order.

        Cancelling the awaiting task (client disconnect) removes the request's sequences from the batch.
        `language`: a `pipeline.language.LanguageChoice` to detect the source language (the scheduler decides it
        from the encoder output; source_lang / target_lang are then only the fallback). `progress(i)` is called
        on the caller's loop as each clip is decoded."""
        job = self._new_job(
            audios,
            source_lang,
            target_lang,
            pnc,
            context,
            timestamps=timestamps,
            beam_size=beam_size,
            language=language,
            progress=progress,
            keywords=keywords,
        )
        try:
            return await job.future
        finally:
            self._release(job)

    async def stream_batch(
        self,
        audios: Sequence[np.ndarray],
        source_lang: str,
        target_lang: str,
        pnc: bool,
        context: str | None,
        beam_size: int | None = None,
        *,
        language: Any = None,
        keywords: tuple[str, ...] = (),
    ) -> AsyncIterator[StreamEvent]:
        """Like `transcribe_batch`, yielding text deltas as the decoder produces them, then a `done` event.

        Closing the iterator early (client disconnect) cancels the request."""
        job = self._new_job(
            audios,
            source_lang,
            target_lang,
            pnc,
            context,
            stream=True,
            beam_size=beam_size,
            language=language,
            keywords=keywords,
        )
        try:
            while True:
                getter = asyncio.ensure_future(job.stream.queue.get())
                await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not job.stream.queue.empty():  # deltas queued before the end
                    yield job.stream.queue.get_nowait()
                yield StreamEvent("done", results=job.future.result())  # raises the request's error
                return
        finally:
            if not job.future.done():
                job.future.cancel()
            self._release(job)

    def open_stream(
        self,
        source_lang: str,
        target_lang: str,
        pnc: bool,
        config: Any = None,
        max_seconds: float = 3600.0,
        *,
        language: Any = None,
        detect_seconds: float = 0.0,
    ) -> LiveJob:
        """A live stream decoded as its audio arrives (NeMo's streaming Canary decoding): `feed()` 16 kHz mono
        float32 pieces, `end()`, and read `updates()` (committed text after every chunk, then the final text).
        `config`: a `model.stream_buffer.StreamingConfig` (None: NeMo's defaults). Closing it frees its place.
        `language`: a `pipeline.language.LanguageChoice` to detect the source language from the first
        `detect_seconds` of audio before decoding starts (`Pipeline.open_stream` builds it)."""
        from canary_server.model.prompt import PromptSpec
        from canary_server.model.stream_buffer import StreamingConfig

        if not self.ready:
            raise EngineNotReady(self.not_ready_message())
        spec = PromptSpec(source_lang, target_lang, pnc=pnc, max_context_tokens=self.max_context_tokens)
        job = LiveJob(
            spec, config or StreamingConfig(), asyncio.get_running_loop(), self._queue.put,
            self.info.sample_rate, max_seconds, language=language,
            detect_samples=int(detect_seconds * self.info.sample_rate),
        )  # fmt: skip
        with self._lock:
            if not self._accepting:
                raise EngineNotReady(self.not_ready_message())
            self._queue.put(LiveMessage("open", job))
        return job

    def _new_job(
        self,
        audios,
        source_lang,
        target_lang,
        pnc,
        context,
        stream: bool = False,
        timestamps: bool = False,
        beam_size: int | None = None,
        language: Any = None,
        progress: Callable[[int], None] | None = None,
        keywords: tuple[str, ...] = (),
    ) -> Job:
        from canary_server.model.prompt import PromptSpec

        if not self.ready:
            raise EngineNotReady(self.not_ready_message())
        loop = asyncio.get_running_loop()
        spec = PromptSpec(
            source_lang,
            target_lang,
            pnc=pnc,
            context=context or "",
            timestamps=timestamps,
            max_context_tokens=self.max_context_tokens,
            keywords=tuple(keywords),
        )
        seconds = sum(a.shape[0] for a in audios) / self.info.sample_rate
        job = Job(
            list(audios),
            spec,
            loop,
            loop.create_future(),
            seconds=seconds,
            beam_size=beam_size,
            language=language,
            progress=progress,
        )
        if stream:
            job.stream = Stream(asyncio.Queue())
        with self._lock:
            if not self._accepting:
                raise EngineNotReady(self.not_ready_message())
            self._check_room(seconds)
            self._open_jobs += 1
            self._open_seconds += seconds
            self._queue.put(job)
        job.future.add_done_callback(lambda f: f.cancelled() and job.cancelled.set())
        return job

    def _check_room(self, seconds: float) -> None:
        """EngineBusy when the queue is full: too many requests, or too much audio (a request always fits an
        empty engine)."""
        busy = None
        budget = self.max_queued_seconds
        if self._open_jobs >= self.max_queue:
            busy = f"{self._open_jobs} requests queued"
        elif budget is not None and self._open_jobs and self._open_seconds + seconds > budget:
            busy = f"{self._open_seconds:.0f} s of audio queued"
        if busy is not None:
            self.stats["refused"] += 1
            raise EngineBusy(f"the server is busy ({busy}); retry shortly")

    def _release(self, job: Job) -> None:
        with self._lock:
            self._open_jobs -= 1
            self._open_seconds -= job.seconds

    def not_ready_message(self) -> str:
        if self.state is EngineState.LOADING:
            return "the model is still loading; retry shortly"
        if self.state is EngineState.FAILED:
            return f"the model failed to load: {self.error}"
        return "the server is shutting down; retry shortly"

    # ---- model thread ----------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            self._run()
        finally:
            self._finished.set()
        # Park instead of returning. A thread that exits runs MLX's thread-local destructors, which take the GIL;
        # when that coincides with interpreter shutdown the thread is force-unwound and the process aborts
        # ("terminate called without an active exception", 2 of 10 CLI runs). A parked daemon thread holds
        # nothing (`_run`'s locals are gone) and is simply discarded when the process exits.
        threading.Event().wait()

    def _run(self) -> None:
        batcher = self._load()
        if batcher is None:
            self._fail_queued(EngineNotReady(self.not_ready_message()))
            return
        with self._lock:
            if self.state is EngineState.LOADING:  # not CLOSING: shutdown began while it loaded
                self.state = EngineState.READY
        log.info("model ready: languages %s", ", ".join(self.info.languages))
        self._sample(batcher)
        stopping, worked, idle_since = False, False, time.monotonic()
        while not (stopping and not self._jobs):
            # Block for work only when nothing is in flight; otherwise just take what has arrived. Idle, wait at
            # most until the next idle timer: memory release, then model unload.
            idle = not self._jobs and not self._live.ready() and not stopping
            # an open live stream keeps the model (it may send audio any moment)
            timers = self._idle_timers(idle_since, worked) if idle and batcher is not None and not self._live else {}
            jobs = self._intake(
                block=idle, timeout=max(0.0, min(timers.values()) - time.monotonic()) if timers else None
            )
            if jobs is None:  # an idle timer passed
                now = time.monotonic()
                if now >= timers.get("release", float("inf")):  # the work ran out a while ago: memory goes back
                    release_memory(batcher)
                    worked = False
                if now >= timers.get("unload", float("inf")):
                    batcher = None  # the only reference to the model (its batcher holds it)
                    self._unload()
                self._sample(batcher)
                continue
            for job in jobs:
                if job is _STOP:
                    stopping = True
                    self._live.fail_all(EngineNotReady("the server is shutting down"))
                    if batcher is not None:
                        self._book.fail_unstarted(batcher)
                elif stopping:
                    job.deliver(error=EngineNotReady("the server is shutting down; retry shortly"))
                elif batcher is None and (batcher := self._reload()) is None:
                    job.deliver(error=EngineNotReady(f"the model failed to load again: {self.error}"))
                elif isinstance(job, LiveMessage):
                    self._live.handle(job, batcher.model)
                else:
                    self._book.submit(batcher, job)
            if stopping and self._deadline is not None and time.monotonic() >= self._deadline:
                if batcher is not None:
                    if self._jobs:
                        log.warning("shutdown deadline passed: failing %d running request(s)", len(self._jobs))
                    error = EngineNotReady("the server shut down before this request finished; retry it")
                    self._book.fail_all(batcher, error)
                return
            if batcher is None:
                continue
            self._book.drop_cancelled(batcher)
            idle_since = time.monotonic()  # idle timers count from the last moment there was work
            if self._live.ready():
                worked = True
                try:
                    self._live.step(batcher.model)
                except Exception as exc:  # a bug, never bad input: fail the live streams, keep serving
                    log.exception("live stream step failed")
                    self._live.fail_all(exc)
            if not len(batcher):
                continue
            worked = True
            try:
                began = time.monotonic()
                done = batcher.step()
                self._book.note_started(batcher, began)
                for item in done:
                    self._book.complete(batcher, item)
                self._book.stream_progress(batcher)
            except Exception as exc:  # a bug, never bad input: fail what is in flight, keep serving
                log.exception("engine step failed; failing %d request(s)", len(self._jobs))
                self._book.fail_all(batcher, exc)
            self._sample(batcher)

    def _sample(self, batcher: BatcherLike | None) -> None:
        """Gauges only this thread may read (the decoders' rows, MLX's memory counters) into the monitor."""
        self.monitor.active_rows = active_rows(batcher) if batcher is not None else 0
        self.monitor.mlx_memory = memory_in_use()

    def _idle_timers(self, idle_since: float, worked: bool) -> dict[str, float]:
        """Monotonic times at which an idle engine hands memory back (after work) and unloads the model."""
        timers = {}
        if worked and self.release_after_idle > 0:
            timers["release"] = idle_since + self.release_after_idle
        if self.idle_unload_seconds is not None:
            timers["unload"] = idle_since + self.idle_unload_seconds
        return timers

    def _load(self) -> BatcherLike | None:
        """Load the model and build its batcher (None, with `error` and state FAILED, when that fails)."""
        started = time.monotonic()
        try:
            model = self._loader()
            decoding = getattr(model.config, "decoding", None)
            beam_size = self.beam_size or getattr(decoding, "beam_size", 1)
            self.info = model_info(model, beam_size)
            batcher = self._batcher_factory(
                model,
                max_batch=self.batch_size,
                encode_seconds=self.encode_seconds,
                beam_size=beam_size,
                length_penalty=self.length_penalty
                if self.length_penalty is not None
                else getattr(decoding, "length_penalty", 0.0),
                **({} if self.long_request_share is None else {"long_request_share": self.long_request_share}),
                **({} if self.keywords_alpha is None else {"keywords_alpha": self.keywords_alpha}),
            )
        except BaseException as e:  # noqa: BLE001 - reported through /health and 503s
            if isinstance(e, ValueError | OSError):  # bad path, bad .nemo, unreachable hub: the message says it all
                log.error("model failed to load: %s", e)
            else:
                log.exception("model failed to load")
            self.error, self.state = e, EngineState.FAILED
            return None
        self.load_seconds = time.monotonic() - started
        return batcher

    def _unload(self) -> None:
        """After the batcher (which holds the model) was dropped: free it and hand the memory back."""
        log.info("no requests for %g s: unloading the model", self.idle_unload_seconds)
        free_unreferenced_memory()
        self.unloads += 1
        self.state = EngineState.UNLOADED  # only now: the memory is back

    def _reload(self) -> BatcherLike | None:
        """Load the model again for a request that arrived while it was unloaded (None if that failed: the state
        goes back to UNLOADED, so the next request tries again)."""
        self.state = EngineState.RELOADING
        batcher = self._load()
        if batcher is None:
            self.state = EngineState.UNLOADED
            return None
        log.info("model reloaded in %.2f s", self.load_seconds)
        with self._lock:
            self.error = None
            if self.state is EngineState.RELOADING:  # not CLOSING
                self.state = EngineState.READY
        return batcher

    def _intake(self, block: bool, timeout: float | None = None) -> list[Any] | None:
        """What has arrived (waiting for something when `block`; None when `timeout` passed with nothing)."""
        try:
            items = [self._queue.get(timeout=timeout)] if block else []
        except queue.Empty:
            return None
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _fail_queued(self, error: BaseException) -> None:
        for job in self._intake(block=False) or []:
            if job is not _STOP:
                job.deliver(error=error)
