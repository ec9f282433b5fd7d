"""Live streams in the engine: audio fed as it arrives, committed text back after every chunk (NeMo's streaming
Canary decoding, model/streaming.py), the final text at the end of the audio.

The event-loop side holds a `LiveJob` (`feed`, `end`, `close`, `updates()`); every call becomes a `LiveMessage` on
the engine's queue, so MLX stays on the engine thread. There `LiveStreams` keeps one `StreamingDecoder` per
streaming configuration and steps the streams that have a chunk ready between the file batcher's steps; a stream
waiting for audio is in no batch. Every sample a stream holds is counted against `max_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from canary_server.model.audio import check_samples
from canary_server.pipeline.errors import AudioTooLong
from canary_server.pipeline.results import TokenLogprob

log = logging.getLogger("canary.engine")


@dataclass(frozen=True)
class LiveUpdate:
    """What a stream committed: `delta` is the text added since the previous update (committed text is never
    revised), `text` all of it; `final` once the end of the audio was decoded. `logprobs`: each committed token's
    text and log-probability, all of them; `new_logprobs` those of the tokens committed since the previous update."""

    delta: str
    text: str
    tokens: list[int]
    final: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)
class LiveJob:
    """One live stream, event-loop side. `feed()` 16 kHz mono float32 pieces, `end()`, read `updates()`."""

    spec: Any  # model.prompt.PromptSpec
    config: Any  # model.stream_buffer.StreamingConfig
    loop: asyncio.AbstractEventLoop
    post: Any  # the engine's queue.put
    sample_rate: int
    max_seconds: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    samples: int = 0
    ended: bool = False
    stream: Any = None  # model.streaming.Stream (engine thread only)
    sent: str = ""  # text sent so far (engine thread only)
    sent_tokens: int = 0  # tokens whose log-probs went out (engine thread only)

    def feed(self, audio: np.ndarray) -> None:
        if self.ended:
            raise ValueError("audio after the end of the stream")
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        check_samples(audio)  # NaN, inf, absurd magnitudes: refused here, before the engine sees them
        if (self.samples + audio.shape[0]) / self.sample_rate > self.max_seconds:
            raise AudioTooLong((self.samples + audio.shape[0]) / self.sample_rate, self.max_seconds)
        self.samples += audio.shape[0]
        self.post(LiveMessage("audio", self, audio))

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.post(LiveMessage("end", self))

    def close(self) -> None:
        """The client went away: the stream leaves the engine."""
        self.ended = True
        self.post(LiveMessage("close", self))

    async def updates(self) -> AsyncIterator[LiveUpdate]:
        """Updates as chunks are decoded, until the final one (raises what failed the stream)."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.final:
                return

    # ---- engine thread -------------------------------------------------------------------------------------
    def send(self, item: LiveUpdate | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class LiveMessage:
    """A live stream's request to the engine thread: open, audio, end, close."""

    kind: str
    job: LiveJob
    audio: np.ndarray | None = None

    def deliver(self, result: Any = None, error: BaseException | None = None) -> None:
        """The engine could not take it (shutting down, model failed): the stream fails."""
        if error is not None:
            self.job.send(error)


class LiveStreams:
    """The engine thread's live streams, grouped by streaming configuration (one `StreamingDecoder` each)."""

    def __init__(self) -> None:
        self.jobs: list[LiveJob] = []
        self._decoders: dict[Any, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def handle(self, msg: LiveMessage, model: Any) -> None:
        job = msg.job
        if msg.kind == "open":
            try:  # a prompt the model cannot build (a language it lacks) fails this stream alone
                job.stream = self._decoder(model, job.config).open(model.prompt_ids(job.spec))
            except Exception as exc:  # noqa: BLE001 - delivered to the stream's reader
                job.send(exc)
                return
            self.jobs.append(job)
        elif job not in self.jobs:
            return  # closed or failed already
        elif msg.kind == "audio":
            job.stream.append(msg.audio)
        elif msg.kind == "end":
            job.stream.end()
        elif msg.kind == "close":
            self.jobs.remove(job)
            if not self.jobs:
                self._decoders.clear()

    def ready(self) -> bool:
        return any(j.stream.buffer.ready for j in self.jobs)

    def step(self, model: Any) -> None:
        """One step of every decoder with a ready stream; updates go out, finished streams leave."""
        for config, decoder in list(self._decoders.items()):
            jobs = [j for j in self.jobs if j.config == config and j.stream.buffer.ready]
            if not jobs:
                continue
            by_stream = {id(j.stream): j for j in jobs}
            for res in decoder.step([j.stream for j in jobs]):
                self._report(by_stream[id(res.stream)], decoder, res.final, model)
        if not self.jobs:
            self._decoders.clear()  # they hold the model (and its idle unload waits for no open stream)

    def fail_all(self, error: BaseException) -> None:
        for job in self.jobs:
            job.send(error)
        self.jobs = []
        self._decoders.clear()

    def _decoder(self, model: Any, config: Any) -> Any:
        from canary_server.model.streaming import StreamingDecoder

        if config not in self._decoders:
            self._decoders[config] = StreamingDecoder(model, config)
        return self._decoders[config]

    def _report(self, job: LiveJob, decoder: Any, final: bool, model: Any) -> None:
        text = decoder.text(job.stream)
        if text != job.sent or final:
            delta = text[len(job.sent) :] if text.startswith(job.sent) else text
            job.sent = text
            s = job.stream
            pieces = model.token_pieces(s.tokens)  # as include[]=logprobs shows them for files
            logprobs = [TokenLogprob(p, lp) for p, lp in zip(pieces, s.logprobs, strict=True)]
            new, job.sent_tokens = logprobs[job.sent_tokens :], len(logprobs)
            job.send(LiveUpdate(delta, text, list(s.tokens), final, logprobs=logprobs, new_logprobs=new))
        if final:
            self.jobs.remove(job)
