"""Requests in flight on the engine: each `Job` is one request (its audio pieces, the asyncio future its caller
awaits, its streaming state), and `JobBook` is the engine thread's bookkeeping of them: turning a job into work
items for the scheduler, collecting their results, streaming deltas, ending jobs (delivered, failed or cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from canary_server.pipeline.errors import EngineNotReady
from canary_server.pipeline.stats import PipelineStats, request_id

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


@dataclass(frozen=True)
class StreamEvent:
    """`delta`: more text (chunks in order, separated by one space); `done`: the per-chunk results."""

    kind: str  # "delta" | "done"
    delta: str = ""
    results: list[Any] | None = None


@dataclass(eq=False)
class Stream:
    """Engine-thread bookkeeping of what a streaming request has been sent."""

    queue: asyncio.Queue
    chunk: int = 0  # the chunk whose text is being streamed
    sent: str = ""  # text of that chunk sent so far
    any_text: bool = False  # some earlier chunk had text (a separating space is due)


@dataclass(eq=False)
class Job:
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
    stream: Stream | None = None
    beam_size: int | None = None  # None: the engine's
    language: Any = None  # pipeline.language.LanguageChoice: detect the source language (None: the spec's)
    progress: Callable[[int], None] | None = None  # called on the job's loop with each finished piece's index
    accepted_at: float = field(default_factory=time.monotonic)
    began_at: float | None = None  # when its first piece left the scheduler's waiting list (monitoring)
    request_id: str | None = field(default_factory=request_id.get)  # for the engine thread's log lines about it

    def report(self, index: int) -> None:
        """Tell the awaiting side (on its loop) that piece `index` is decoded."""
        if self.progress is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                self.loop.call_soon_threadsafe(self.progress, index)

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


class JobBook:
    """The jobs the engine thread has submitted and not yet ended, and what became of them (`stats`)."""

    def __init__(self, stats: dict[str, int], monitor: PipelineStats | None = None) -> None:
        self.jobs: list[Job] = []
        self.stats = stats
        self.monitor = monitor or PipelineStats()

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def submit(self, batcher: BatcherLike, job: Job) -> None:
        from canary_server.pipeline.scheduler import WorkItem

        # Shortest request first: a request's pieces all have its length as priority, so a 5 s clip is admitted
        # before the remaining chunks of a long file.
        job.items = [
            WorkItem(a, job.spec, tag=(job, i), priority=job.seconds, group=job, beam_size=job.beam_size,
                     language=job.language, streams=job.stream is not None)
            for i, a in enumerate(job.audios)
        ]  # fmt: skip
        self.jobs.append(job)
        batcher.submit(job.items)

    def complete(self, batcher: BatcherLike, item: Any) -> None:
        """A work item came back from the scheduler (result or error)."""
        job, index = item.tag
        if job not in self.jobs:  # already failed or cancelled
            return
        job.started = True
        if item.error is not None:
            self.end(batcher, job, error=item.error)
            return
        job.results[index] = item.result
        job.report(index)
        if job.stream is not None:
            self.stream_progress(batcher, job)
        if len(job.results) == len(job.items):
            self.end(batcher, job, result=[job.results[i] for i in range(len(job.items))])

    def end(self, batcher: BatcherLike, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        self.jobs.remove(job)
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
        if error is None:
            began = job.began_at if job.began_at is not None else job.accepted_at
            tokens = sum(len(getattr(r, "tokens", ())) for r in result)
            self.monitor.completed(job.seconds, tokens, time.monotonic() - began)
        job.deliver(result, error)

    def note_started(self, batcher: BatcherLike, step_began: float) -> None:
        """After a step that began at `step_began` (monotonic): record the queue wait of jobs whose first piece
        has left the scheduler's waiting list (a batcher without a `waiting` list: on submission). Pieces leave it
        as a step begins, before its work (the first encoder stage), so they began then: that work is decoding
        time, not waiting."""
        fresh = [j for j in self.jobs if j.began_at is None]
        if not fresh:
            return
        waiting = {id(it) for it in getattr(batcher, "waiting", ())}
        for job in fresh:
            if job.results or any(id(it) not in waiting for it in job.items):
                job.began_at = max(step_began, job.accepted_at)
                self.monitor.started(job.began_at - job.accepted_at)

    def stream_progress(self, batcher: BatcherLike, job: Job | None = None) -> None:
        """Send streaming requests the text decoded since the last step, chunk by chunk, in order."""
        for j in [job] if job else [j for j in self.jobs if j.stream is not None]:
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

    def drop_cancelled(self, batcher: BatcherLike) -> None:
        for job in [j for j in self.jobs if j.cancelled.is_set()]:
            dropped = len(job.items) - len(job.results)
            log.info(
                "request cancelled by the client: dropping %d piece(s)", dropped, extra={"request_id": job.request_id}
            )
            self.end(batcher, job)

    def fail_unstarted(self, batcher: BatcherLike) -> None:
        """Shutdown: requests that have not produced anything yet are failed clearly; the rest finish."""
        for job in [j for j in self.jobs if not j.started and not any(it._seq for it in j.items)]:
            self.end(batcher, job, error=EngineNotReady("the server is shutting down; retry shortly"))

    def fail_all(self, batcher: BatcherLike, error: BaseException) -> None:
        """Everything still in flight fails with `error` (the shutdown deadline passed, or an engine step broke)."""
        for job in list(self.jobs):
            self.end(batcher, job, error=error)
