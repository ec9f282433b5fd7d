"""Hostile input, in process: prompts past the decoder's position table, lying audio headers, absurd sample
rates and sample values, the queued-audio budget, shutdown deadlines, stale conversion debris, the Host
allow-list and /health's error text. (Real processes under signals and memory caps: test_hostile_server.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import threading
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from canary_server.model.audio import load_audio, resample
from canary_server.model.batch_decoder import BatchDecoder, Sequence
from canary_server.model.errors import AudioDecodeError, AudioTooLong, PromptTooLong
from canary_server.model.prompt import PromptSpec, build_prompt
from canary_server.pipeline import Pipeline
from canary_server.pipeline.engine import Engine, EngineState
from canary_server.pipeline.errors import EngineBusy, EngineNotReady
from canary_server.pipeline.options import PipelineConfig
from canary_server.pipeline.scheduler import ContinuousBatcher, WorkItem
from conftest import ESPEAK_CLIPS
from hostile_files import flac_silence, float_wav, wav_claiming_rate
from server_fakes import SR, FakeCanary, fake_batcher, tone

LONG_PROMPT = " ".join(["hello world"] * 10_000)  # 20,000 words, 120 KB


# ---- the decoder's position table ------------------------------------------------------------------------
def test_a_prompt_longer_than_the_position_table_is_refused_by_every_decode_path(espeak_model):
    m = espeak_model
    table = m.config.decoder.max_sequence_length
    wave = load_audio(ESPEAK_CLIPS / "clip00.wav")
    for beam in (1, 2):  # Canary.generate: greedy_decode and beam_decode
        with pytest.raises(PromptTooLong, match=f"at most {table}"):
            m.generate(wave, context=LONG_PROMPT, beam_size=beam)
    long_prompt = m.prompt_ids(PromptSpec("en", "en", context=LONG_PROMPT))
    assert len(long_prompt) > table
    enc, _ = m.encode(*_batch([wave]))
    for decoder in (BatchDecoder(m), ContinuousBatcher(m, beam_size=2).decoder):  # the step machines
        with pytest.raises(PromptTooLong):
            decoder.add([Sequence(enc[0], enc.shape[1], long_prompt, 10)])
        assert len(decoder) == 0


def test_in_the_scheduler_a_prompt_too_long_fails_its_own_request_only(espeak_model, espeak_nemo_transcripts):
    wave = load_audio(ESPEAK_CLIPS / "clip00.wav")
    good = WorkItem(wave, PromptSpec("en", "en"))
    bad = WorkItem(wave, PromptSpec("en", "en", context=LONG_PROMPT))
    batcher = ContinuousBatcher(espeak_model)
    batcher.submit([bad, good])
    done = []
    while len(batcher):
        done += batcher.step()
    assert isinstance(bad.error, PromptTooLong)
    assert good.error is None and good.result.raw_text == espeak_nemo_transcripts["clip00.wav"]


def test_a_long_prompt_keeps_its_last_tokens_and_a_short_one_is_untouched(espeak_model):
    tok, fmt = espeak_model.tokenizer, espeak_model.config.prompt_format
    words = " ".join(f"word{i}" for i in range(200))
    full = build_prompt(tok, fmt, PromptSpec("en", "en", context=words))
    kept = build_prompt(tok, fmt, PromptSpec("en", "en", context=words, max_context_tokens=20))
    context = tok.text_to_ids(words, "en")
    assert len(context) > 20
    assert kept == full[:1] + context[-20:] + full[1 + len(context) :]
    short = PromptSpec("en", "en", context="hello world")
    capped = PromptSpec("en", "en", context="hello world", max_context_tokens=20)
    assert build_prompt(tok, fmt, short) == build_prompt(tok, fmt, capped)


def test_the_pipeline_cuts_a_huge_prompt_at_a_word_boundary_before_tokenizing():
    p = Pipeline(engine=Engine(lambda: FakeCanary(), batcher=fake_batcher), config=PipelineConfig(max_prompt_tokens=4))
    assert p._context("short one") == "short one"
    cut = p._context(LONG_PROMPT)
    assert len(cut) <= 4 * 16 and LONG_PROMPT.endswith(cut) and cut.startswith(("hello", "world"))
    assert p._context("") is None


# ---- audio headers, rates and samples ---------------------------------------------------------------------
def _peak_traced(fn) -> tuple[BaseException | None, int]:
    """Run `fn`; its exception (or None) and the peak of traced (numpy/Python) memory, in bytes."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except Exception as exc:  # noqa: BLE001
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


def test_a_wav_header_with_an_absurd_sample_rate_is_refused_before_decoding():
    data = wav_claiming_rate(1)  # 64 KB: 32,000 s at 1 Hz, 512 M samples at 16 kHz
    error, peak = _peak_traced(lambda: load_audio(data, max_seconds=3600))
    assert isinstance(error, AudioDecodeError) and "1 Hz" in str(error)
    assert peak < 2_000_000
    with pytest.raises(AudioDecodeError, match="sample rate"):
        load_audio(wav_claiming_rate(500_000))


def test_a_header_longer_than_the_limit_is_refused_before_decoding():
    data = flac_silence(1.0, claimed_frames=3 * 3600 * 48000)  # says 3 h of 48 kHz stereo (8 GB as float32)
    error, peak = _peak_traced(lambda: load_audio(data, max_seconds=3600))
    assert isinstance(error, AudioTooLong) and "10800.0 s" in str(error)
    assert peak < 2_000_000


def test_a_lying_header_stops_decoding_at_the_limit():
    data = flac_silence(40.0, rate=48000, claimed_frames=0)  # 0: 'unknown length'; really 40 s
    error, peak = _peak_traced(lambda: load_audio(data, max_seconds=5))
    assert isinstance(error, AudioTooLong) and "more than 5 s" in str(error)
    # 5 s of 16 kHz float32 is 320 KB (plus a 1 MB decode block); all 40 s of 48 kHz stereo would be 15 MB and more
    assert peak < 6_000_000
    assert load_audio(data, max_seconds=41).shape[0] == 40 * SR


@pytest.mark.parametrize(
    ("rate", "channels", "fmt"), [(44100, 2, "FLAC"), (22050, 1, "OGG"), (8000, 1, "WAV"), (16000, 1, "MP3")]
)
def test_streaming_decode_gives_the_same_samples_as_decoding_whole_files(rate, channels, fmt):
    rng = np.random.default_rng(rate)
    wave = (0.1 * rng.standard_normal((int(rate * 20.3), channels))).astype(np.float32)  # several decode blocks
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt)
    whole, whole_rate = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
    expected = resample(whole, whole_rate)  # the one-shot path: downmix, then soxr over the whole file
    for limit in (None, 60.0):
        assert np.array_equal(load_audio(buf.getvalue(), max_seconds=limit), expected)


def test_a_truncated_file_decodes_to_the_samples_really_in_it_every_time():
    buf = io.BytesIO()
    sf.write(buf, tone(4.0), SR, format="MP3")  # its header says 4 s
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    decoded = [load_audio(cut) for _ in range(3)]
    expected = resample(*sf.read(io.BytesIO(cut), dtype="float32", always_2d=True))
    assert 0 < expected.shape[0] < 3 * SR
    assert all(np.array_equal(d, expected) for d in decoded)


@pytest.mark.parametrize("scale", [1e20, np.inf, np.nan])
def test_huge_or_non_finite_samples_are_refused_everywhere(espeak_model, scale):
    wave = tone(1.0)
    wave[100:200] = scale
    with pytest.raises(AudioDecodeError, match="samples"):
        load_audio(float_wav(wave))
    with pytest.raises(AudioDecodeError, match="samples"):
        espeak_model.generate(wave)
    # int16-scaled float files (some tools write them) are still accepted
    assert load_audio(float_wav(tone(1.0) * 32767)).shape == (SR,)


@contextlib.asynccontextmanager
async def _fake_pipeline(decode=None, **config):
    """A started, ready pipeline on the fake engine (`decode`: its audio decoder, None: the real one), closed after."""
    engine = Engine(lambda: FakeCanary(), batcher=fake_batcher)
    p = Pipeline(engine=engine, config=PipelineConfig(**config), decode_audio=decode)
    p.start()
    try:
        await p.wait_ready()
        yield p
    finally:
        p.close()


def test_the_pipeline_refuses_huge_array_samples_before_the_engine():
    async def main():
        async with _fake_pipeline() as p:
            options = p.options("en")
            with pytest.raises(AudioDecodeError):
                await p.transcribe(np.full(SR, 1e30, np.float32), options)
            return (await p.transcribe(tone(1.0), options)).text

    assert asyncio.run(main()) == "hello world 1.00"


def test_decodes_run_at_most_max_concurrent_decodes_at_once():
    running, most = 0, 0

    def decode(data: bytes, max_seconds: float) -> np.ndarray:
        nonlocal running, most
        running += 1
        most = max(most, running)
        time.sleep(0.02)  # a decode that takes a while (worker threads)
        running -= 1
        return tone(1.0)

    async def main():
        async with _fake_pipeline(decode, max_concurrent_decodes=2) as p:
            options = p.options("en")
            await asyncio.gather(*(p.prepare(b"x", options) for _ in range(8)))

    asyncio.run(main())
    assert most == 2


def test_requests_waiting_for_a_decode_slot_count_in_max_queued_requests():
    """Slow decodes (4 SDP uploads held both slots ~20 s each) queued everyone else without any 429."""
    release = threading.Event()

    def decode(data: bytes, max_seconds: float) -> np.ndarray:
        release.wait(10)
        return tone(1.0)

    async def main():
        async with _fake_pipeline(decode, max_concurrent_decodes=1, max_queued_requests=3) as p:
            options = p.options("en")
            waiting = [asyncio.ensure_future(p.prepare(b"x", options)) for _ in range(3)]
            await asyncio.sleep(0)  # they enter: one decodes, two wait for the slot
            with pytest.raises(EngineBusy, match="3 requests queued"):
                await p.prepare(b"x", options)
            release.set()
            await asyncio.gather(*waiting)
            assert (await p.transcribe(b"x", options)).text  # room again once they are through

    asyncio.run(main())


def test_a_cancelled_request_keeps_its_decode_slot_until_its_decode_ends():
    """The worker thread cannot be cancelled: releasing the slot at once would let disconnecting clients run any
    number of decodes at the same time."""
    started, release = threading.Event(), threading.Event()

    def decode(data: bytes, max_seconds: float) -> np.ndarray:
        started.set()
        release.wait(10)
        return tone(1.0)

    async def main():
        async with _fake_pipeline(decode, max_concurrent_decodes=1) as p:
            options = p.options("en")
            first = asyncio.ensure_future(p.prepare(b"x", options))
            await asyncio.to_thread(started.wait, 10)
            first.cancel()
            await asyncio.wait([first])
            assert p._decode_gate().locked() and p._decoding == 1  # still held by the running thread
            release.set()
            await p.prepare(b"x", options)
            assert not p._decode_gate().locked() and p._decoding == 0

    asyncio.run(main())


# ---- the engine: queued audio, shutdown ----------------------------------------------------------------
class _Endless:
    """A batcher whose work never finishes (each step costs 1 ms): requests stay running until failed."""

    def __init__(self, model, max_batch: int = 16, **settings) -> None:
        self.items: list = []
        self.max_batch = max_batch

    def __len__(self) -> int:
        return len(self.items)

    def submit(self, items) -> None:
        self.items += items

    def cancel(self, items) -> None:
        self.items = [it for it in self.items if not any(it is c for c in items)]

    def partial_text(self, item) -> str:
        return ""

    def step(self):
        for it in self.items[: self.max_batch]:
            it._seq = it._seq or object()  # started: it has a decoder row
        time.sleep(0.001)
        return []


def _engine(**kwargs) -> Engine:
    return Engine(lambda: FakeCanary(), batcher=kwargs.pop("batcher", _Endless), **kwargs)


async def _ready(engine: Engine) -> None:
    engine.start()
    while engine.state is EngineState.LOADING:
        await asyncio.sleep(0.001)


def test_queued_audio_beyond_the_budget_is_refused_but_one_request_always_fits():
    async def main():
        engine = _engine(max_queued_seconds=10.0)
        await _ready(engine)
        try:
            big = asyncio.ensure_future(engine.transcribe_batch([tone(30.0)], "en", "en", True, None))
            await asyncio.sleep(0)  # accepted: 30 s > the budget, but the engine was empty
            with pytest.raises(EngineBusy, match="30 s of audio queued"):
                await engine.transcribe_batch([tone(1.0)], "en", "en", True, None)
            big.cancel()
        finally:
            engine.close(0)

    asyncio.run(main())


def test_shutdown_fails_queued_requests_at_once_and_running_ones_at_the_deadline():
    async def outcome(fut, since: float) -> tuple[str, float]:
        try:
            await fut
            return "finished", time.monotonic() - since
        except EngineNotReady as exc:
            return str(exc), time.monotonic() - since

    async def main():
        engine = _engine(batch_size=1)
        await _ready(engine)
        running = asyncio.ensure_future(engine.transcribe_batch([tone(1.0)], "en", "en", True, None))
        while not (engine._jobs and engine._jobs[0].items[0]._seq):  # the engine thread started it
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(engine.transcribe_batch([tone(1.0)], "en", "en", True, None))
        await asyncio.sleep(0)
        engine.shutdown(grace=0.5)
        since = time.monotonic()
        with pytest.raises(EngineNotReady):  # new requests are refused
            await engine.transcribe_batch([tone(1.0)], "en", "en", True, None)
        results = [await outcome(queued, since), await outcome(running, since)]
        engine.close(0)
        return results, engine.state

    (queued, running), state = asyncio.run(main())
    assert queued[0] == "the server is shutting down; retry shortly" and queued[1] < 0.4  # at once
    assert running[0] == "the server shut down before this request finished; retry it"
    assert 0.5 <= running[1] < 2.0  # at the deadline
    assert state is EngineState.CLOSED


def test_the_engine_releases_memory_when_its_work_runs_out():
    calls = []
    fake = FakeCanary()
    fake.release_memory = lambda: calls.append(time.monotonic())

    async def main():
        engine = Engine(lambda: fake, batcher=fake_batcher, release_after_idle=0.05)
        await _ready(engine)
        try:
            for n in (1, 2):
                await engine.transcribe_batch([tone(1.0)], "en", "en", True, None)
                deadline = time.monotonic() + 5
                while len(calls) < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
        finally:
            engine.close(0)

    asyncio.run(main())
    assert len(calls) == 2  # once each time the work ran out, not while idle


# ---- convert debris ---------------------------------------------------------------------------------------
def test_convert_removes_stale_staging_dirs_of_its_output_and_says_so(tmp_path, caplog):
    import fcntl

    from canary_server.convert import convert_nemo
    from conftest import ESPEAK_NEMO

    if not ESPEAK_NEMO.is_file():
        pytest.skip("the espeak model is not available")
    out = tmp_path / "model"
    stale = tmp_path / ".model.partial-killed1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    live = tmp_path / ".model.partial-running"  # another conversion's, still held
    live.mkdir()
    other = tmp_path / ".other.partial-x"  # another output's: not ours to touch
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with caplog.at_level(logging.WARNING, logger="canary_server.convert"):
            convert_nemo(ESPEAK_NEMO, out)
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists() and other.exists()
    assert (out / "config.json").is_file()
    assert any(".model.partial-killed1" in r.getMessage() and "1.0 MB" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.partial-running", ".other.partial-x", "model"]


def _batch(waves):
    from canary_server.model.audio import pad_batch

    return pad_batch(waves)
