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
import contextlib
import gc
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from canary_server.pipeline.errors import EngineBusy, EngineNotReady

log = logging.getLogger("canary.engine")


class TranscriptionLike(Protocol):
    text: str
    tokens: list[int]


class BatcherLike(Protocol):
    """What the engine drives (`pipeline.scheduler.ContinuousBatcher`; tests use a fake)."""

    def __len__(self) -> int: ...
    def submit(self, items: list[Any]) -> None: ...
    def cancel(self, items: list[Any]) -> None: ...
    def step(self) -> list[Any]: ...
    def partial_text(self, item: Any) -> str: ...


class ModelLike(Protocol):
    """What the engine needs from `model.Canary`."""

    languages: list[str]
    sample_rate: int
    config: Any


BatcherFactory = Callable[..., BatcherLike]  # (model, **scheduling settings) -> the batcher the engine drives


def default_batcher(model: ModelLike, **kwargs: Any) -> BatcherLike:
    from canary_server.pipeline.scheduler import ContinuousBatcher

    return ContinuousBatcher(model, **kwargs)


class EngineState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    UNLOADED = "unloaded"  # freed after `idle_unload_seconds` without requests; the next request reloads it
    RELOADING = "reloading"
    FAILED = "failed"
    CLOSING = "closing"  # shutting down: no new requests; running ones finish until the deadline
    CLOSED = "closed"


ACCEPTING = (EngineState.READY, EngineState.UNLOADED, EngineState.RELOADING)


@dataclass(frozen=True)
class ModelInfo:
    """Plain facts about the loaded model, copied off the engine thread once."""

    languages: tuple[str, ...]
    sample_rate: int
    prompt_format: str
    supports_timestamps: bool = False  # word/segment times (flash models' timestamp tokens, v2's CTC aligner)
    default_language: str = "en"  # the model's prompt default source language
    family: str = ""  # the release it has the shape of ("canary-1b-flash"), else a description
    decoding: str = "greedy"  # how requests are decoded: "greedy" or "beam search, beam N" (settings included)
    timestamp_source: str | None = None  # "tokens" (flash), "ctc" (canary-1b-v2's aligner) or None

    @property
    def supports_context(self) -> bool:
        return self.prompt_format == "canary2"


@dataclass(frozen=True)
class StreamEvent:
    """`delta`: more text (chunks in order, separated by one space); `done`: the per-chunk results."""

    kind: str  # "delta" | "done"
    delta: str = ""
    results: list[Any] | None = None


@dataclass(eq=False)
class _Stream:
    """Engine-thread bookkeeping of what a streaming request has been sent."""

    queue: asyncio.Queue
    chunk: int = 0  # the chunk whose text is being streamed
    sent: str = ""  # text of that chunk sent so far
    any_text: bool = False  # some earlier chunk had text (a separating space is due)


@dataclass(eq=False)
class _Job:
    """One request: its audio pieces, and the future the event loop awaits."""

    audios: list[np.ndarray]
    spec: Any  # model.prompt.PromptSpec
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    seconds: float = 0.0  # of audio, counted against the engine's queued-audio budget
    cancelled: threading.Event = field(default_factory=threading.Event)
    items: list[Any] = field(default_factory=list)
    results: dict[int, Any] = field(default_factory=dict)
    started: bool = False
    stream: _Stream | None = None
    beam_size: int | None = None  # None: the engine's
    language: Any = None  # pipeline.language.LanguageChoice: detect the source language (None: the spec's)

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
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._thread_main, name="canary-model", daemon=True)
        self._finished = threading.Event()  # the engine loop has ended (the thread itself stays parked)
        self._jobs: list[_Job] = []  # submitted, not yet delivered (engine thread only)
        self._open_jobs = 0  # submitted and not finished, counted from the event loop side
        self._open_seconds = 0.0  # their audio
        self._lock = threading.Lock()  # accepting, the counters, and the order of jobs and _STOP in the queue
        self._accepting = True
        self._deadline: float | None = None  # monotonic time by which running requests are failed (shutdown)
        self.state = EngineState.LOADING
        self.error: BaseException | None = None
        self.info: ModelInfo | None = None
        self.stats = {"completed": 0, "failed": 0, "cancelled": 0, "refused": 0}
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
    ) -> list[TranscriptionLike]:
        """Several clips of one request (e.g. the chunks of long audio); one result per clip, in order.

        Cancelling the awaiting task (client disconnect) removes the request's sequences from the batch.
        `language`: a `pipeline.language.LanguageChoice` to detect the source language (the scheduler decides it
        from the encoder output; source_lang / target_lang are then only the fallback)."""
        job = self._new_job(
            audios,
            source_lang,
            target_lang,
            pnc,
            context,
            timestamps=timestamps,
            beam_size=beam_size,
            language=language,
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
    ) -> AsyncIterator[StreamEvent]:
        """Like `transcribe_batch`, yielding text deltas as the decoder produces them, then a `done` event.

        Closing the iterator early (client disconnect) cancels the request."""
        job = self._new_job(
            audios, source_lang, target_lang, pnc, context, stream=True, beam_size=beam_size, language=language
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
    ) -> _Job:
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
        )
        seconds = sum(a.shape[0] for a in audios) / self.info.sample_rate
        job = _Job(
            list(audios), spec, loop, loop.create_future(), seconds=seconds, beam_size=beam_size, language=language
        )
        if stream:
            job.stream = _Stream(asyncio.Queue())
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

    def _release(self, job: _Job) -> None:
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
        stopping, worked, idle_since = False, False, time.monotonic()
        while not (stopping and not self._jobs):
            # Block for work only when nothing is in flight; otherwise just take what has arrived. Idle, wait at
            # most until the next idle timer: memory release, then model unload.
            idle = not self._jobs and not stopping
            timers = self._idle_timers(idle_since, worked) if idle and batcher is not None else {}
            jobs = self._intake(
                block=idle, timeout=max(0.0, min(timers.values()) - time.monotonic()) if timers else None
            )
            if jobs is None:  # an idle timer passed
                now = time.monotonic()
                if now >= timers.get("release", float("inf")):  # the work ran out a while ago: memory goes back
                    self._release_memory(batcher)
                    worked = False
                if now >= timers.get("unload", float("inf")):
                    batcher = None  # the only reference to the model (its batcher holds it)
                    self._unload()
                continue
            for job in jobs:
                if job is _STOP:
                    stopping = True
                    if batcher is not None:
                        self._fail_unstarted(batcher)
                elif stopping:
                    job.deliver(error=EngineNotReady("the server is shutting down; retry shortly"))
                elif batcher is None and (batcher := self._reload()) is None:
                    job.deliver(error=EngineNotReady(f"the model failed to load again: {self.error}"))
                else:
                    self._submit(batcher, job)
            if stopping and self._deadline is not None and time.monotonic() >= self._deadline:
                if batcher is not None:
                    self._fail_all(batcher, "the server shut down before this request finished; retry it")
                return
            if batcher is None:
                continue
            self._drop_cancelled(batcher)
            idle_since = time.monotonic()  # idle timers count from the last moment there was work
            if not len(batcher):
                continue
            worked = True
            try:
                for item in batcher.step():
                    self._complete(batcher, item)
                self._stream_progress(batcher)
            except Exception as exc:  # a bug, never bad input: fail what is in flight, keep serving
                log.exception("engine step failed; failing %d request(s)", len(self._jobs))
                for job in list(self._jobs):
                    self._end(batcher, job, error=exc)

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
            self.info = ModelInfo(
                languages=tuple(model.languages),
                sample_rate=int(model.sample_rate),
                prompt_format=str(getattr(model.config, "prompt_format", "canary")),
                supports_timestamps=bool(getattr(model, "supports_timestamps", False)),
                default_language=str(getattr(model.config, "prompt_defaults", {}).get("source_lang", "en")),
                family=_family(model.config),
                decoding="greedy" if beam_size <= 1 else f"beam search, beam {beam_size}",
                timestamp_source=getattr(model, "timestamp_source", None),
            )
            batcher = self._batcher_factory(
                model,
                max_batch=self.batch_size,
                encode_seconds=self.encode_seconds,
                beam_size=beam_size,
                length_penalty=self.length_penalty
                if self.length_penalty is not None
                else getattr(decoding, "length_penalty", 0.0),
                **({} if self.long_request_share is None else {"long_request_share": self.long_request_share}),
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
        """After the batcher (which holds the model) was dropped: collect it, and give MLX's buffer cache and,
        on Linux, the C heap's free pages back to the system."""
        log.info("no requests for %g s: unloading the model", self.idle_unload_seconds)
        gc.collect()
        with contextlib.suppress(Exception):
            import mlx.core as mx

            mx.clear_cache()
        if sys.platform.startswith("linux"):
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
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

    def _submit(self, batcher: BatcherLike, job: _Job) -> None:
        from canary_server.pipeline.scheduler import WorkItem

        seconds = sum(a.shape[0] for a in job.audios) / self.info.sample_rate
        # Shortest request first: a 5 s clip is admitted before the remaining chunks of a long file.
        job.items = [
            WorkItem(
                a, job.spec, tag=(job, i), priority=seconds, group=job, beam_size=job.beam_size, language=job.language
            )
            for i, a in enumerate(job.audios)
        ]
        self._jobs.append(job)
        batcher.submit(job.items)

    def _complete(self, batcher: BatcherLike, item: Any) -> None:
        job, index = item.tag
        if job not in self._jobs:  # already failed or cancelled
            return
        job.started = True
        if item.error is not None:
            self._end(batcher, job, error=item.error)
            return
        job.results[index] = item.result
        if job.stream is not None:
            self._stream_progress(batcher, job)
        if len(job.results) == len(job.items):
            self._end(batcher, job, result=[job.results[i] for i in range(len(job.items))])

    def _end(self, batcher: BatcherLike, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        self._jobs.remove(job)
        pending = [it for i, it in enumerate(job.items) if i not in job.results]
        if pending:
            batcher.cancel(pending)
        # Items and job, items and their decoder sequences refer to each other: break the cycles, so the request's
        # audio and encoder states are freed now rather than at some later garbage collection.
        for item in job.items:
            item._seq = None
        job.items, job.audios = [], []
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            return
        self.stats["failed" if error is not None else "completed"] += 1
        job.deliver(result, error)

    def _stream_progress(self, batcher: BatcherLike, job: _Job | None = None) -> None:
        """Send streaming requests the text decoded since the last step, chunk by chunk, in order."""
        for j in [job] if job else [j for j in self._jobs if j.stream is not None]:
            st = j.stream
            while st.chunk < len(j.items):
                text = batcher.partial_text(j.items[st.chunk])
                if text.startswith(st.sent) and len(text) > len(st.sent):
                    sep = " " if st.any_text and not st.sent else ""
                    delta, st.sent = sep + text[len(st.sent) :], text
                    j.loop.call_soon_threadsafe(st.queue.put_nowait, StreamEvent("delta", delta))
                if st.chunk not in j.results:
                    break
                st.any_text, st.chunk, st.sent = st.any_text or bool(st.sent), st.chunk + 1, ""

    def _drop_cancelled(self, batcher: BatcherLike) -> None:
        for job in [j for j in self._jobs if j.cancelled.is_set()]:
            log.info("request cancelled by the client: dropping %d piece(s)", len(job.items) - len(job.results))
            self._end(batcher, job)

    def _fail_unstarted(self, batcher: BatcherLike) -> None:
        """Shutdown: requests that have not produced anything yet are failed clearly; the rest finish."""
        for job in [j for j in self._jobs if not j.started and not any(it._seq for it in j.items)]:
            self._end(batcher, job, error=EngineNotReady("the server is shutting down; retry shortly"))

    def _fail_all(self, batcher: BatcherLike, message: str) -> None:
        """The shutdown deadline passed: everything still in flight fails (503: retry)."""
        if self._jobs:
            log.warning("shutdown deadline passed: failing %d running request(s)", len(self._jobs))
        for job in list(self._jobs):
            self._end(batcher, job, error=EngineNotReady(message))

    @staticmethod
    def _release_memory(batcher: BatcherLike) -> None:
        release = getattr(getattr(batcher, "model", None), "release_memory", None)
        if release is not None:
            try:
                release()
            except Exception:  # noqa: BLE001 - an optimisation, never a reason to stop serving
                log.exception("releasing memory failed")

    def _fail_queued(self, error: BaseException) -> None:
        for job in self._intake(block=False) or []:
            if job is not _STOP:
                job.deliver(error=error)


def _family(config: Any) -> str:
    from canary_server.model.config import ModelConfig, family

    return family(config) if isinstance(config, ModelConfig) else ""


def load_model(spec: str, cache_dir: Any = None, dtype: str = "auto") -> ModelLike:
    """Resolve a MODEL spec (converting a .nemo on first use) and load it. Runs on the engine thread."""
    from canary_server import model
    from canary_server.convert.cache import resolve_model

    path = resolve_model(spec, cache_dir=cache_dir)
    log.info("loading model from %s", path)
    return model.load(path, dtype=model.default_dtype() if dtype == "auto" else dtype)
