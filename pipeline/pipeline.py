"""One pipeline beneath every front door: audio in -> limits -> cutting at pauses -> the engine -> a transcript.

`Pipeline` owns the engine (its thread loads the model and makes every MLX call). Front doors (HTTP routes, the
CLI, the Python API, Wyoming) validate their own input format, build `TranscribeOptions` with
`Pipeline.options()`, then await `transcribe()` or iterate `stream()`; they only render what comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from canary_server.model.audio import MIN_AUDIO_SECONDS, check_samples, pad_to_min_duration
from canary_server.model.errors import UnsupportedLanguageError
from canary_server.pipeline.chunking import Chunk, merge_short_tail, split_audio
from canary_server.pipeline.engine import Engine, EngineState, ModelInfo, ModelLike
from canary_server.pipeline.errors import (
    AudioTooLong,
    EngineBusy,
    EngineNotReady,
    InvalidAudio,
    LanguageDetectionUnavailable,
)
from canary_server.pipeline.keywords import MAX_SERVER_PHRASES, check_spelling, clean_keywords
from canary_server.pipeline.language import AUTO, LanguageChoice, LanguageDetection
from canary_server.pipeline.live import LiveAudio
from canary_server.pipeline.live_stream import LiveJob
from canary_server.pipeline.options import PipelineConfig, TranscribeOptions
from canary_server.pipeline.results import TranscriptResult, assemble
from canary_server.pipeline.speech import has_speech, speech_probabilities, split_at_pauses
from canary_server.pipeline.stats import PipelineStats, StatsSnapshot
from canary_server.pipeline.vad import SAMPLE_RATE as VAD_RATE

log = logging.getLogger("canary.pipeline")

# An encoded file (bytes, a path, or a binary file object read when its turn to decode comes), or 16 kHz float32.
AudioInput = bytes | bytearray | memoryview | str | Path | BinaryIO | np.ndarray
AudioDecoder = Callable[[bytes, float], np.ndarray]  # (encoded file, max seconds) -> 16 kHz mono float32
Progress = Callable[[float, float], None]  # (seconds of audio decoded, seconds in all)

# A token never spans more characters than this (SentencePiece's default max piece length): a prompt longer than
# max_prompt_tokens x this is cut to its end before it is tokenized, so tokenizing costs the engine little.
CHARS_PER_TOKEN = 16


def default_decoder(config: PipelineConfig | None = None) -> AudioDecoder:
    """model/audio.py's decoder, with the config's decode budget (work and time per file)."""
    from canary_server.model.audio import DecodeLimits, load_audio

    config = config or PipelineConfig()
    limits = DecodeLimits(config.max_decode_samples, config.max_decode_seconds, config.max_decode_cpu_seconds)
    return lambda data, max_seconds: load_audio(data, max_seconds=max_seconds, limits=limits)


@dataclass(frozen=True)
class PreparedAudio:
    """Decoded, validated and cut audio of one request, with what to ask of the model."""

    chunks: list[Chunk]
    duration: float
    options: TranscribeOptions


@dataclass(frozen=True)
class TextDelta:
    """More text of a streamed transcript (chunks in order, separated by one space)."""

    text: str


class Pipeline:
    """Limits, cutting and joining around one `Engine`. Use from one event loop at a time per call; any number
    of calls may be in flight together (they share the engine's continuous batching)."""

    def __init__(
        self,
        loader: Callable[[], ModelLike] | None = None,
        config: PipelineConfig | None = None,
        *,
        engine: Engine | None = None,
        decode_audio: AudioDecoder | None = None,
    ) -> None:
        self.config = config or PipelineConfig()
        if engine is None:
            if loader is None:
                raise ValueError("Pipeline needs a model loader or an engine")
            engine = Engine(
                self._checked(loader),
                batch_size=self.config.batch_size,
                encode_seconds=self.config.encode_batch_seconds,
                max_queue=self.config.max_queued_requests,
                beam_size=self.config.beam_size,
                length_penalty=self.config.length_penalty,
                long_request_share=self.config.long_request_share,
                idle_unload_seconds=self.config.idle_unload_seconds,
                max_queued_seconds=self.config.max_queued_audio_seconds,
                max_context_tokens=self.config.max_prompt_tokens,
                release_after_idle=self.config.idle_release_seconds,
                keywords_alpha=self.config.boosting_tree_alpha,
            )
        self.engine = engine
        self.decode_audio = decode_audio or default_decoder(self.config)
        self._decode_gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> Semaphore
        self._decoding = 0  # requests waiting for a decode slot or decoding (all event loops)
        self._decoding_lock = threading.Lock()

    def _checked(self, loader: Callable[[], ModelLike]) -> Callable[[], ModelLike]:
        """`loader`, then the config checked against the model it loaded (a failure fails the load)."""

        def load() -> ModelLike:
            model = loader()
            self.check_config(list(model.languages))
            masked = getattr(model.config, "prompt_loss_masked", False)
            detects = (self.config.default_language or "").lower() == AUTO  # (None: the model's own default)
            if masked and len(model.languages) > 1 and detects:
                log.warning(
                    "this model was trained with its prompt masked (use_loss_mask_for_prompt): it cannot detect "
                    "the language, so requests must name one; or set default_language to a code"
                )
            return model

        return load

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()

    def shutdown(self, grace: float | None = None) -> None:
        """Begin shutting down (returns at once): new and queued requests fail (EngineNotReady), running ones
        get `grace` seconds (default: the config's shutdown_grace_seconds) to finish, then fail too."""
        self.engine.shutdown(self.config.shutdown_grace_seconds if grace is None else grace)

    def close(self) -> None:
        """`shutdown()` and wait for the engine to stop."""
        self.engine.close(self.config.shutdown_grace_seconds)

    @property
    def ready(self) -> bool:
        return self.engine.ready

    @property
    def state(self) -> EngineState:
        return self.engine.state

    @property
    def stats(self) -> PipelineStats:
        """Monitoring's record (front doors count their sessions in it)."""
        return self.engine.monitor

    def snapshot(self) -> StatsSnapshot:
        """What the engine has done and holds now (queue, rows, times, memory), from any thread."""
        return self.engine.snapshot()

    @property
    def info(self) -> ModelInfo:
        """Facts about the loaded model; raises EngineNotReady while it loads (or if it failed)."""
        if not self.engine.ready or self.engine.info is None:
            raise EngineNotReady(self.engine.not_ready_message())
        return self.engine.info

    async def wait_ready(self) -> ModelInfo:
        """Wait until the model is loaded; raises EngineNotReady if loading failed."""
        while self.engine.state is EngineState.LOADING:
            await asyncio.sleep(0.01)
        return self.info

    # ---- requests ---------------------------------------------------------------------------------------
    def check_language(self, language: str, role: str = "language") -> str:
        """A language the loaded model supports, else UnsupportedLanguageError listing the ones it does."""
        supported = list(self.info.languages)
        if language not in supported:
            raise UnsupportedLanguageError(language, supported, role)
        return language

    @property
    def fixed_language(self) -> str | None:
        """The source language of a request that names none, when the config fixes one (None: "auto", detect it;
        also detection's fallback)."""
        lang = self.config.default_language or self.info.default_language
        return None if lang.lower() == AUTO else lang

    def options(
        self,
        language: str | None = None,
        target_language: str | None = None,
        *,
        languages: Sequence[str] | None = None,
        pnc: bool = True,
        context: str | None = None,
        timestamps: bool = False,
        language_role: str = "language",
        target_role: str = "target_language",
        languages_role: str = "languages",
        keywords: Sequence[str] | None = None,
        keywords_role: str = "keywords",
    ) -> TranscribeOptions:
        """Validated options: languages the model supports; context and timestamps only where the model has
        them (decoder context is a canary2 prompt slot; timestamps need the flash tokens or v2's aligner).
        `timestamps` on a model without them: pieces cut at pauses of at most `cue_seconds`, one segment each.

        `language`: a code, "auto" (detect it from the audio), or None (detection, unless the config fixes a
        `default_language`; `languages` narrows detection's choice). The target defaults to the source decoded:
        never a translation the caller did not ask for.
        `keywords`: phrases to boost; None: the configured list, empty: none (pipeline/keywords.py)."""
        info = self.info
        target = self.check_language(target_language, target_role) if target_language else None
        detect = None
        if self._wants_detection(language, languages):
            candidates = self._candidates(languages, languages_role)
            if len(candidates) > 1:
                if not info.detects_language:
                    raise LanguageDetectionUnavailable(language_role)
                fixed = self.fixed_language
                fallback = fixed if fixed in candidates else None
                detect = LanguageDetection(tuple(candidates), fallback, self.config.detect_threshold, target)
                source = fallback or candidates[0]  # provisional: the scheduler decides from the audio
            else:  # nothing to choose between
                source = candidates[0]
        else:
            source = self.check_language(language or self.fixed_language or "", language_role)
        return TranscribeOptions(
            source,
            target or source,
            pnc,
            self._context(context) if info.supports_context else None,
            timestamps and info.supports_timestamps,
            cue_seconds=self.config.cue_seconds if timestamps and not info.supports_timestamps else None,
            detect=detect,
            keywords=self._keywords(keywords, detect.candidates if detect else (source,), keywords_role),
        )

    def _keywords(self, keywords: Sequence[str] | None, langs: Sequence[str], role: str) -> tuple[str, ...]:
        """The request's list (checked), or the configured one; spellable in every language it may decode in."""
        if keywords is None:
            role = "keywords (setting)"
            phrases = clean_keywords(self.config.keywords, MAX_SERVER_PHRASES, role)
        else:
            phrases = clean_keywords(keywords, param=role)
        check_spelling(phrases, langs, self.info.spell, role)
        return phrases

    def _wants_detection(self, language: str | None, languages: Sequence[str] | None) -> bool:
        if language:
            return language.lower() == AUTO
        return bool(languages or self.config.detect_language or self.fixed_language is None)

    def _candidates(self, languages: Sequence[str] | None, role: str) -> list[str]:
        """The languages detection may pick: the model's, narrowed by the config and the request."""
        allow = self.config.detect_languages
        allowed = [lang for lang in self.info.languages if not allow or lang in allow] or list(self.info.languages)
        if not languages:
            return allowed
        wanted = {self.check_language(lang, role) for lang in languages}
        picked = [lang for lang in allowed if lang in wanted]
        if not picked:
            raise UnsupportedLanguageError(sorted(wanted)[0], allowed, role)
        return picked

    def check_config(self, languages: Sequence[str]) -> None:
        """At load: the config's languages are the model's (else one ValueError line naming the setting), so a
        bad `default_language` stops the server at start instead of failing every request."""
        checks = [("default_language", self.config.default_language, [AUTO])]
        checks += [("detect_languages", lang, []) for lang in self.config.detect_languages]
        for name, lang, extra in checks:
            if lang and lang.lower() not in extra and lang not in languages:
                options = ", ".join([*extra, *languages])
                raise ValueError(f"setting {name} = {lang!r} is not a language of this model (use one of: {options})")

    def live_audio(self, rate: int, width: int, channels: int) -> LiveAudio:
        """An accumulator for raw PCM arriving in pieces (Wyoming, microphones): converted to the model's format
        as it arrives, `max_audio_seconds` enforced while it grows. Pass `finish()`'s array to `transcribe()` or
        `stream()`."""
        return LiveAudio(
            rate, width, channels, sample_rate=self.info.sample_rate, max_seconds=self.config.max_audio_seconds
        )

    def open_stream(self, options: TranscribeOptions, config: Any = None, max_seconds: float | None = None) -> LiveJob:
        """A live stream (`Engine.open_stream`) for `options` (from `options()`): where they detect the language
        (no language given on a multilingual model), the engine holds the first `live_detect_seconds` of audio,
        detects the language from them and only then decodes, in that language. `max_seconds`: None for
        `max_audio_seconds`."""
        limit = self.config.max_audio_seconds if max_seconds is None else max_seconds
        choice = LanguageChoice(options.detect) if options.detect else None
        return self.engine.open_stream(
            options.source_lang, options.target_lang, options.pnc, config, limit,
            language=choice, detect_seconds=self.config.live_detect_seconds,
        )  # fmt: skip

    def _context(self, text: str | None) -> str | None:
        """The prompt, cut to its end when it is far longer than the max_prompt_tokens the model keeps of it (the
        engine keeps its last max_prompt_tokens tokens; OpenAI's convention). The cut falls on a word boundary
        where there is one; shorter prompts are untouched."""
        if not text:
            return None
        most = self.config.max_prompt_tokens * CHARS_PER_TOKEN
        if len(text) <= most:
            return text
        tail = text[-most:]
        space = next((i for i, c in enumerate(tail) if c.isspace()), -1)
        return tail[space + 1 :] if 0 <= space < len(tail) - 1 else tail

    async def prepare(self, audio: AudioInput, options: TranscribeOptions) -> PreparedAudio:
        """Decode (off the event loop, at most max_concurrent_decodes at once, never past max_audio_seconds),
        check the limits, cut at pauses."""
        samples = await self._samples(audio)
        sample_rate = self.info.sample_rate
        duration = len(samples) / sample_rate
        if len(samples) == 0:
            raise InvalidAudio("the audio contains no samples")
        if duration > self.config.max_audio_seconds:
            raise AudioTooLong(duration, self.config.max_audio_seconds)
        longest = min(self.config.chunk_seconds, self.info.max_chunk_seconds or self.config.chunk_seconds)
        probs = await self._speech(samples, sample_rate)
        if probs is not None and not has_speech(probs, options.vad):  # silence, noise: empty text, nothing decoded
            return PreparedAudio([], duration, options)
        if options.cue_seconds is None and probs is not None:
            chunks = split_at_pauses(samples, sample_rate, longest, probs, options.vad)
        elif options.cue_seconds is None:
            chunks = split_audio(samples, sample_rate, longest)
        else:  # times wanted from a model without them: short pieces cut at pauses, one segment / cue each
            pieces = split_audio(samples, sample_rate, min(options.cue_seconds, longest))
            chunks = merge_short_tail(pieces, samples, sample_rate, longest)
        if not isinstance(audio, np.ndarray) and self.info.pads_short_audio:
            # A piece under 1 s is padded here as NeMo's file loader (lhotse) pads it; arrays are padded by the
            # model as NeMo's in-memory path does (model/audio.py, pad_to_min_duration).
            min_samples = int(MIN_AUDIO_SECONDS * sample_rate)
            chunks = [dataclasses.replace(c, audio=pad_to_min_duration(c.audio, min_samples, from_file=True))
                      for c in chunks]  # fmt: skip
        return PreparedAudio(chunks, duration, options)

    async def _speech(self, samples: np.ndarray, sample_rate: int) -> np.ndarray | None:
        """The VAD's speech probabilities (off the event loop: 5 ms of CPU per audio second), None when it is off
        or the model's rate is not the VAD's."""
        if not self.config.vad or sample_rate != VAD_RATE:
            return None
        return await asyncio.to_thread(speech_probabilities, samples, sample_rate)

    async def _samples(self, audio: AudioInput) -> np.ndarray:
        if isinstance(audio, np.ndarray):
            if audio.ndim != 1:
                raise InvalidAudio(f"audio arrays must be 1-D float32 at 16 kHz, got shape {audio.shape}")
            samples = audio.astype(np.float32, copy=False)
            check_samples(samples)
            return samples
        if isinstance(audio, str | Path) and not Path(audio).is_file():
            raise InvalidAudio(f"audio file not found: {audio}")
        # Reading, decoding and resampling are CPU work (not MLX): a worker thread keeps the event loop free. The
        # gate bounds the files held decoded-in-progress at once (memory: about max_audio_seconds of 16 kHz
        # float32 each, plus the encoded file). Those waiting for it count in max_queued_requests.
        self._enter_decode()
        gate = self._decode_gate()
        try:
            await gate.acquire()
        except BaseException:
            self._leave_decode()
            raise
        work = asyncio.ensure_future(asyncio.to_thread(self._read_and_decode, audio))

        def done(finished: asyncio.Future) -> None:  # not at cancellation: the thread holds its slot until it ends
            gate.release()
            self._leave_decode()
            if not finished.cancelled():
                finished.exception()  # retrieved: nobody may await a cancelled request's decode

        work.add_done_callback(done)
        return await asyncio.shield(work)

    def _enter_decode(self) -> None:
        """Count a request about to wait for a decode slot; EngineBusy when the queues are full already."""
        with self._decoding_lock:
            waiting = self._decoding + self.engine.queued
            if waiting >= self.config.max_queued_requests:
                raise EngineBusy(f"the server is busy ({waiting} requests queued); retry shortly")
            self._decoding += 1

    def _leave_decode(self) -> None:
        with self._decoding_lock:
            self._decoding -= 1

    def _read_and_decode(self, audio: AudioInput) -> np.ndarray:
        if isinstance(audio, str | Path):
            data = Path(audio).read_bytes()
        elif hasattr(audio, "read"):
            data = audio.read()
        else:
            data = bytes(audio)
        if not data:
            raise InvalidAudio("the audio file is empty")
        return self.decode_audio(data, self.config.max_audio_seconds)

    def _decode_gate(self) -> asyncio.Semaphore:
        """The event loop's semaphore of max_concurrent_decodes (asyncio primitives belong to one loop)."""
        loop = asyncio.get_running_loop()
        gate = self._decode_gates.get(loop)
        if gate is None:
            gate = self._decode_gates[loop] = asyncio.Semaphore(self.config.max_concurrent_decodes)
        return gate

    async def transcribe(
        self,
        audio: AudioInput | PreparedAudio,
        options: TranscribeOptions,
        *,
        beam_size: int | None = None,
        progress: Progress | None = None,
    ) -> TranscriptResult:
        """The whole transcript of one input. Cancelling the awaiting task removes its work from the engine.
        `beam_size`: None for the engine's decoding (the model's config unless the settings override it).
        `progress(done, total)`: seconds of audio decoded and in all, on this loop, as each piece finishes."""
        prepared = audio if isinstance(audio, PreparedAudio) else await self.prepare(audio, options)
        if not prepared.chunks:  # no speech
            return self._assemble(prepared, [], None)
        o = prepared.options
        choice = LanguageChoice(o.detect) if o.detect else None
        results = await self.engine.transcribe_batch(
            *self._engine_args(prepared),
            o.timestamps,
            beam_size,
            language=choice,
            progress=None if progress is None else _piece_progress(prepared, progress),
            keywords=o.keywords,
        )
        return self._assemble(prepared, results, choice)

    async def stream(
        self, audio: AudioInput | PreparedAudio, options: TranscribeOptions, *, beam_size: int | None = None
    ) -> AsyncIterator[TextDelta | TranscriptResult]:
        """`TextDelta`s as the decoder produces text, then the `TranscriptResult`. Errors before the first event
        (bad audio, busy, loading) raise from the first `__anext__`; closing the iterator cancels the work.
        With beam search the text comes at the end of each chunk (beams are only final then)."""
        prepared = audio if isinstance(audio, PreparedAudio) else await self.prepare(audio, options)
        if not prepared.chunks:  # no speech
            yield self._assemble(prepared, [], None)
            return
        choice = LanguageChoice(prepared.options.detect) if prepared.options.detect else None
        events = self.engine.stream_batch(
            *self._engine_args(prepared), beam_size, language=choice, keywords=prepared.options.keywords
        )
        try:
            async for event in events:
                if event.kind == "delta":
                    yield TextDelta(event.delta)
                else:
                    yield self._assemble(prepared, event.results, choice)
        finally:
            await events.aclose()

    @staticmethod
    def _engine_args(prepared: PreparedAudio) -> tuple[Any, ...]:
        o = prepared.options
        return [c.audio for c in prepared.chunks], o.source_lang, o.target_lang, o.pnc, o.context

    @staticmethod
    def _assemble(prepared: PreparedAudio, results: list[Any], choice: LanguageChoice | None) -> TranscriptResult:
        o = prepared.options
        source, target = o.source_lang, o.target_lang
        if choice is not None and choice.result is not None:  # the languages detection decoded
            source, target = choice.result.language, o.detect.target or choice.result.language
        return assemble(
            prepared.chunks,
            results,
            duration=prepared.duration,
            language=target,
            task="transcribe" if source == target else "translate",
            source_language=source,
            timestamps=o.timestamps,
            detected_language=choice.result if choice is not None else None,
        )


def _piece_progress(prepared: PreparedAudio, progress: Progress) -> Callable[[int], None]:
    """The engine reports finished pieces by index; `progress` hears seconds of audio."""
    seconds = [c.end - c.start for c in prepared.chunks]
    done = 0.0

    def on_piece(index: int) -> None:
        nonlocal done
        done += seconds[index]
        progress(min(done, prepared.duration), prepared.duration)

    return on_piece
