"""The blocking Python API (and the CLI's): a `Pipeline` driven from a private event loop thread.

    import canary_server
    m = canary_server.load("./canary-180m-flash-mlx")
    r = m.transcribe("talk.wav", source_lang="en")      # any length: cut at pauses, decoded together
    print(r.text, r.segments)

Works from plain scripts and from inside a running event loop (a notebook): calls block the caller, the engine
and its loop run on their own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from canary_server.model.errors import CanaryError
from canary_server.pipeline.engine import ModelLike, load_model
from canary_server.pipeline.options import PipelineConfig
from canary_server.pipeline.pipeline import AudioInput, Pipeline
from canary_server.pipeline.results import TranscriptResult

T = TypeVar("T")


class Transcriber:
    """A loaded model behind the full pipeline. `model`: a converted directory, a `.nemo` file (converted once
    into the cache), a Hugging Face repo id, or an already loaded `canary_server.model.Canary`."""

    def __init__(
        self,
        model: str | Path | ModelLike,
        *,
        cache_dir: str | Path | None = None,
        dtype: str = "auto",
        decoder_bits: int = 0,
        config: PipelineConfig | None = None,
    ) -> None:
        if isinstance(model, str | Path):
            spec = str(model)
            loader = lambda: load_model(spec, cache_dir, dtype, decoder_bits)  # noqa: E731
        else:
            loader = lambda: model  # noqa: E731
        self.pipeline = Pipeline(loader, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="canary-api-loop", daemon=True)
        self._thread.start()
        self.pipeline.start()
        try:
            self._run(self.pipeline.wait_ready())
        except BaseException:
            self.close()
            if self.pipeline.engine.error is not None:  # the load error itself (a bad path, a bad .nemo, ...)
                raise self.pipeline.engine.error from None
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def languages(self) -> list[str]:
        return list(self.pipeline.info.languages)

    @property
    def sample_rate(self) -> int:
        return self.pipeline.info.sample_rate

    @property
    def supports_timestamps(self) -> bool:
        """The model gives word and segment times (`timestamps=True`): the flash models and canary-1b-v2."""
        return self.pipeline.info.supports_timestamps

    def transcribe(
        self,
        audio: AudioInput | Sequence[AudioInput],
        source_lang: str | None = None,
        target_lang: str | None = None,
        pnc: bool = True,
        context: str | None = None,
        batch_size: int = 8,
        beam_size: int | None = None,
        timestamps: bool = False,
        keywords: Sequence[str] | None = None,
    ) -> TranscriptResult | list[TranscriptResult]:
        """Transcribe (target_lang None or == source_lang) or translate one input or a list of inputs of any
        length: paths, encoded bytes, or 16 kHz mono float32 arrays. `source_lang` None or "auto" detects the
        spoken language (`result.detected_language`) unless the config fixes a `default_language`. Long audio is
        cut at pauses and its pieces decoded together, exactly as the server does. At most `batch_size` inputs are
        in flight at once;
        `beam_size` (default: the model's decoding config) picks NeMo's beam search; `timestamps=True` adds
        word and segment times on models that have them (flash models, canary-1b-v2). `keywords`: phrases to
        boost (NeMo's boosting tree; None: the config's `keywords`, [] none); a phrase the model cannot spell
        raises `pipeline.keywords.InvalidKeywords` naming it."""
        single = not isinstance(audio, list | tuple)
        items = [audio] if single else list(audio)
        results = []
        each = self.transcribe_each(
            items, source_lang, target_lang, pnc, context, batch_size, beam_size, timestamps, keywords=keywords
        )
        with contextlib.closing(each):  # closing it cancels the inputs still in flight
            for result in each:
                if isinstance(result, Exception):
                    raise result
                results.append(result)
        return results[0] if single else results

    def transcribe_each(
        self,
        audio: Sequence[AudioInput],
        source_lang: str | None = None,
        target_lang: str | None = None,
        pnc: bool = True,
        context: str | None = None,
        batch_size: int = 8,
        beam_size: int | None = None,
        timestamps: bool = False,
        progress: Callable[[int, float, float], None] | None = None,
        keywords: Sequence[str] | None = None,
    ) -> Iterator[TranscriptResult | CanaryError]:
        """`transcribe` for a list whose inputs fail alone: yields, in input order as soon as it is done, each
        input's result or the `CanaryError` it raised (a file that is not audio, too long, ...). Other errors
        raise. `progress(index, seconds_done, seconds_total)` is called (on another thread) as each piece of
        an input is decoded. Closing the iterator early (or Ctrl-C) cancels the inputs still in flight."""
        options = self.pipeline.options(
            source_lang,  # None: detected (or the config's fixed default_language); "auto": detected
            target_lang,
            pnc=pnc,
            context=context,
            timestamps=timestamps,
            language_role="source language",
            target_role="target language",
            keywords=keywords,
        )
        gate = asyncio.Semaphore(max(1, batch_size))  # binds to the private loop on first use

        async def one(index: int, item: AudioInput) -> TranscriptResult:
            report = None if progress is None else functools.partial(progress, index)
            async with gate:
                return await self.pipeline.transcribe(item, options, beam_size=beam_size, progress=report)

        futures = [asyncio.run_coroutine_threadsafe(one(i, x), self._loop) for i, x in enumerate(audio)]
        try:
            for future in futures:
                try:
                    yield future.result()
                except CanaryError as exc:
                    yield exc
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        """Stop the engine and the private loop (idempotent)."""
        self.pipeline.close()
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Transcriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    model: str | Path | ModelLike,
    *,
    cache_dir: str | Path | None = None,
    dtype: str = "auto",
    decoder_bits: int = 0,
    **config: Any,
) -> Transcriber:
    """`Transcriber(model, ...)`; `decoder_bits=8` quantizes the decoder as it loads (model.load); extra keyword
    arguments are `PipelineConfig` fields (chunk_seconds, ...)."""
    return Transcriber(
        model, cache_dir=cache_dir, dtype=dtype, decoder_bits=decoder_bits, config=PipelineConfig(**config)
    )
