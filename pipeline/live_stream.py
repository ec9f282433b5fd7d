"""Live streams in the engine: audio fed as it arrives, committed text back after every chunk (NeMo's streaming
Canary decoding, model/streaming.py), the final text at the end of the audio.

The event-loop side holds a `LiveJob` (`feed`, `end`, `close`, `updates()`); every call becomes a `LiveMessage` on
the engine's queue, so MLX stays on the engine thread. There `LiveStreams` keeps one `StreamingDecoder` per
streaming configuration and steps the streams that have a chunk ready between the file batcher's steps; a stream
waiting for audio is in no batch. Every sample a stream holds is counted against `max_seconds`.

A stream opened without a language on a multilingual model (`language`: a `LanguageChoice`) is held until
`detect_samples` of audio have arrived (or it ends earlier): the language is detected from them as a file request's
is (one encoder pass, then the decoder's language slot), and only then does its streaming decoder open, in that
language (source = target: never a translation), and take the held audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from canary_server.model.audio import MIN_AUDIO_SECONDS, check_samples, pad_to_min_duration
from canary_server.pipeline.errors import AudioTooLong
from canary_server.pipeline.language import DetectedLanguage, LanguageChoice
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
    detected: DetectedLanguage | None = None  # what detection decided (None: the stream was opened in a language)
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
    language: LanguageChoice | None = None  # detect the language before decoding (None: `spec` names it)
    detect_samples: int = 0  # audio held for detection (it decides earlier if the stream ends first)
    stream: Any = None  # model.streaming.Stream (engine thread only)
    sent: str = ""  # text sent so far (engine thread only)
    held: list[np.ndarray] = field(default_factory=list)  # audio waiting for detection (engine thread only)
    held_samples: int = 0  # (engine thread only)
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
        self.detecting: list[LiveJob] = []  # opened, holding their first audio until the language is detected
        self._decoders: dict[Any, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.jobs or self.detecting)

    def handle(self, msg: LiveMessage, model: Any) -> None:
        job = msg.job
        if msg.kind == "open":
            if job.language is not None and not job.language.decided:
                self.detecting.append(job)
            else:
                self._open(job, model)
        elif job in self.detecting:
            self._hold(msg, model)
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

    def _open(self, job: LiveJob, model: Any, audio: np.ndarray | None = None) -> None:
        try:  # a prompt the model cannot build (a language it lacks) fails this stream alone
            job.stream = self._decoder(model, job.config).open(model.prompt_ids(job.spec))
        except Exception as exc:  # noqa: BLE001 - delivered to the stream's reader
            job.send(exc)
            return
        self.jobs.append(job)
        if audio is not None and len(audio):
            job.stream.append(audio)

    def _hold(self, msg: LiveMessage, model: Any) -> None:
        """A message for a stream still waiting for its language: audio is held until there is enough to detect
        it from (or the stream ends), then the stream opens in the detected language with the held audio."""
        job = msg.job
        if msg.kind == "close":
            self.detecting.remove(job)
            return
        if msg.kind == "audio" and msg.audio is not None:
            job.held.append(msg.audio)
            job.held_samples += len(msg.audio)
        if msg.kind == "end" or job.held_samples >= job.detect_samples:
            self.detecting.remove(job)
            audio = np.concatenate(job.held) if job.held else np.zeros(0, np.float32)
            job.held, job.held_samples = [], 0
            try:
                detect_language(model, job, audio)
            except Exception as exc:  # noqa: BLE001 - fails this stream alone
                job.send(exc)
                return
            self._open(job, model, audio)
            if msg.kind == "end" and job in self.jobs:
                job.stream.end()

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
        for job in self.jobs + self.detecting:
            job.send(error)
        self.jobs, self.detecting = [], []
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
            detected = job.language.result if job.language is not None else None
            s = job.stream
            pieces = model.token_pieces(s.tokens)  # as include[]=logprobs shows them for files
            logprobs = [TokenLogprob(p, lp) for p, lp in zip(pieces, s.logprobs, strict=True)]
            new, job.sent_tokens = logprobs[job.sent_tokens :], len(logprobs)
            job.send(LiveUpdate(delta, text, list(s.tokens), final, detected, logprobs=logprobs, new_logprobs=new))
        if final:
            self.jobs.remove(job)


def detect_language(model: Any, job: LiveJob, audio: np.ndarray) -> None:
    """The stream's language from its first audio (engine thread): one encoder pass and the decoder's language
    slot (`Canary.language_log_probs`), decided by the stream's policy; its prompt then names that language."""
    import mlx.core as mx

    choice = job.language
    assert choice is not None
    wave = pad_to_min_duration(audio, int(MIN_AUDIO_SECONDS * model.sample_rate))
    enc, enc_lens = model.encode(mx.array(wave)[None], mx.array([wave.shape[0]]))  # (1, T, H), (1,)
    log_probs = np.array(model.language_log_probs(enc, enc_lens))[0].tolist()
    result = choice.decide(dict(zip(model.languages, log_probs, strict=True)))
    job.spec = choice.apply(job.spec)
    log.info(
        "live stream: language %s detected from %.2f s (p=%.2f%s)", result.language, len(audio) / model.sample_rate,
        result.probability, ", not confident: fallback" if result.fell_back else "",
    )  # fmt: skip
