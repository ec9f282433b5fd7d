"""Server pieces without HTTP: settings and config.example.toml, chunking, subtitle times, the upload limit,
and the engine's micro-batching and failure isolation (on the fake model from server_fakes)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import tomllib

from canary_server.cli.serve import add_serve_arguments, settings_from_args
from canary_server.pipeline.chunking import split_audio
from canary_server.pipeline.engine import Engine
from canary_server.pipeline.errors import EngineBusy, EngineNotReady
from canary_server.pipeline.formats import srt_timestamp, vtt_timestamp
from canary_server.server.limits import UploadLimitMiddleware
from canary_server.server.settings import Settings, SettingsError
from server_fakes import SR, FakeCanary, fake_batcher, fake_engine, tone

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


# ---- settings --------------------------------------------------------------------------------------------
def test_config_example_documents_every_setting_with_its_default():
    text = EXAMPLE.read_text()
    values = tomllib.loads(text)
    defaults = {k: f.get_default(call_default_factory=True) for k, f in Settings.model_fields.items()}
    for name, default in defaults.items():
        if default is None:  # optional settings are shown commented out
            assert f"\n# {name} = " in text, name
        else:
            assert values.get(name) == default, name
    assert set(values) <= set(defaults)


def test_env_overrides_the_toml_file_and_flags_override_both(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 9001\nhost = "0.0.0.0"\napi_key = "from-file"\nmodel_aliases = ["a"]\n')
    monkeypatch.setenv("CANARY_PORT", "9002")
    s = Settings.load(cfg)
    assert (s.port, s.host, s.api_key, s.served_models) == (9002, "0.0.0.0", "from-file", [s.model_id, "a"])
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    s = settings_from_args(parser.parse_args(["--config", str(cfg), "--port", "9003", "--model", "/m/x.nemo"]))
    assert (s.port, s.model_id) == (9003, "x")


def test_unknown_settings_and_missing_config_files_are_rejected(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot' \\(did you mean 'port'"):
        Settings.load(cfg)
    with pytest.raises(SettingsError, match="missing.toml: no such file"):
        Settings.load(tmp_path / "missing.toml")


def test_hub_repo_ids_are_served_under_their_own_name():
    assert Settings(model="nvidia/canary-180m-flash").model_id == "nvidia/canary-180m-flash"


# ---- chunking and times ----------------------------------------------------------------------------------
def test_short_audio_is_one_chunk():
    chunks = split_audio(tone(3.0), SR, 30)
    assert len(chunks) == 1 and (chunks[0].start, chunks[0].end) == (0, 3.0)


def test_long_audio_is_cut_in_pauses_covering_everything_once():
    speech, pause = tone(7.0), np.zeros(SR, np.float32)
    audio = np.concatenate([speech, pause, speech, pause, speech])  # 23 s
    chunks = split_audio(audio, SR, 10)
    assert [round(c.start, 2) for c in chunks] == [0, 7.97, 15.97]
    assert np.array_equal(np.concatenate([c.audio for c in chunks]), audio)
    assert all(c.end - c.start <= 10 for c in chunks)


def test_audio_without_pauses_is_cut_at_the_window_length():
    chunks = split_audio(tone(25.0), SR, 10)
    assert [(c.start, c.end) for c in chunks] == [(0, 10), (10, 20), (20, 25)]


def test_subtitle_timestamps_are_formatted_per_spec():
    assert srt_timestamp(3723.4567) == "01:02:03,457" and vtt_timestamp(0.0) == "00:00:00.000"
    assert srt_timestamp(59.9996) == "00:01:00,000"


# ---- upload limit ----------------------------------------------------------------------------------------
def test_upload_limit_stops_reading_a_streamed_body_once_it_is_exceeded():
    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # an endless body

    async def app(scope, receive, send):
        while True:
            await receive()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": []}
    with pytest.raises(Exception, match="upload limit"):
        asyncio.run(UploadLimitMiddleware(app, max_bytes=10_000)(scope, receive, send))
    assert len(pulled) == 11  # stopped right after passing 10 kB


def test_upload_limit_answers_413_from_content_length_without_reading():
    sent = []

    async def receive():
        raise AssertionError("the body must not be read")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-length", b"10001")]}
    asyncio.run(UploadLimitMiddleware(None, max_bytes=10_000)(scope, receive, send))
    assert sent[0]["status"] == 413 and b"upload limit" in sent[1]["body"]


# ---- engine ----------------------------------------------------------------------------------------------
def _with_engine(engine: Engine, coro_fn):
    """Start the engine, run `coro_fn()` once the model is loaded, close the engine."""

    async def when_ready():
        while not engine.ready:
            await asyncio.sleep(0)
        return await coro_fn()

    engine.start()
    try:
        return asyncio.run(when_ready())
    finally:
        engine.close()


async def _until_a_step_is_held(fake: FakeCanary) -> None:
    """Yield to the loop until the engine thread has submitted work and its step waits at the fake's gate."""
    while not getattr(fake, "last_batcher", None) or not fake.last_batcher.waiting:
        await asyncio.sleep(0)


def test_requests_arriving_while_a_step_runs_join_the_next_step_whatever_their_language():
    fake = FakeCanary()
    fake.gate = threading.Event()
    engine = Engine(lambda: fake, batcher=fake_batcher)

    async def main():
        first = asyncio.ensure_future(engine.transcribe(tone(1.0), "en", "en", True, None))
        await _until_a_step_is_held(fake)
        pairs = [(2, "en"), (3, "de"), (4, "en")]
        rest = [asyncio.ensure_future(engine.transcribe(tone(s), "en", t, True, None)) for s, t in pairs]
        await asyncio.sleep(0)  # all three are queued now, while the first step is held
        fake.gate.set()
        return await asyncio.gather(first, *rest)

    results = _with_engine(engine, main)
    texts = ["hello world 1.00", "hello world 2.00", "hallo welt 3.00", "hello world 4.00"]
    assert [r.text for r in results] == texts
    steps = [[it.spec.target_lang for it in step] for step in fake.last_batcher.steps if step]
    assert steps == [["en"], ["en", "de", "en"]]


def test_a_full_queue_is_refused_with_engine_busy():
    fake = FakeCanary()
    fake.gate = threading.Event()
    engine = Engine(lambda: fake, batcher=fake_batcher, max_queue=2)

    async def main():
        held = [asyncio.ensure_future(engine.transcribe(tone(1.0), "en", "en", True, None)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(EngineBusy, match="busy"):
            await engine.transcribe(tone(1.0), "en", "en", True, None)
        fake.gate.set()
        return await asyncio.gather(*held)

    assert len(_with_engine(engine, main)) == 2
    assert engine.stats["refused"] == 1 and engine.queued == 0


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish():
    fake = FakeCanary()
    fake.gate = threading.Event()
    engine = Engine(lambda: fake, batcher=fake_batcher)

    async def main():
        first = asyncio.ensure_future(engine.transcribe(tone(1.0), "en", "en", True, None))
        await _until_a_step_is_held(fake)
        doomed = asyncio.ensure_future(engine.transcribe_batch([tone(2.0), tone(3.0)], "en", "en", True, None))
        await asyncio.sleep(0)
        doomed.cancel()  # what a client disconnect does
        while not doomed.done():  # the cancellation reaches the job's future on the next loop iterations
            await asyncio.sleep(0)
        fake.gate.set()
        out = await first
        while engine.stats["cancelled"] == 0 and engine.stats["completed"] < 2:
            await asyncio.sleep(0)
        return out

    assert _with_engine(engine, main).text == "hello world 1.00"
    assert engine.stats["cancelled"] == 1 and engine.stats["completed"] == 1


def test_shutdown_fails_requests_that_have_not_started():
    fake = FakeCanary()
    fake.gate = threading.Event()
    engine = Engine(lambda: fake, batcher=fake_batcher)

    async def main():
        while not engine.ready:
            await asyncio.sleep(0)
        first = asyncio.ensure_future(engine.transcribe(tone(1.0), "en", "en", True, None))
        await _until_a_step_is_held(fake)
        queued = asyncio.ensure_future(engine.transcribe(tone(2.0), "en", "en", True, None))
        await asyncio.sleep(0)
        closing = asyncio.get_running_loop().run_in_executor(None, engine.close)
        fake.gate.set()
        await closing
        return await asyncio.gather(first, queued, return_exceptions=True)

    engine.start()
    first, queued = asyncio.run(main())
    assert first.text == "hello world 1.00"
    assert isinstance(queued, EngineNotReady) and "shutting down" in str(queued)


def test_a_failing_request_fails_alone_and_the_thread_lives_on():
    fake = FakeCanary()
    engine = Engine(lambda: fake, batcher=fake_batcher)

    async def main():
        good = [engine.transcribe(tone(1.0), "en", "en", True, None) for _ in range(3)]
        bad = engine.transcribe(tone(1.0), "en", "en", True, "explode")
        return await asyncio.gather(*good, bad, return_exceptions=True)

    *good, bad = _with_engine(engine, main)
    assert [g.text for g in good] == ["hello world 1.00"] * 3 and isinstance(bad, RuntimeError)


def test_requests_before_the_model_is_loaded_are_refused():
    engine = Engine(FakeCanary, batcher=fake_batcher)  # not started
    with pytest.raises(EngineNotReady, match="loading"):
        asyncio.run(engine.transcribe(tone(1.0), "en", "en", True, None))


def test_a_failing_engine_step_fails_the_requests_in_flight_and_the_engine_goes_on():
    fake = FakeCanary()
    engine = Engine(lambda: fake, batcher=fake_batcher)
    boom = {"left": 1}

    async def main():
        step = fake.last_batcher.step

        def failing_once():
            if boom["left"]:
                boom["left"] -= 1
                raise RuntimeError("decoder exploded")
            return step()

        fake.last_batcher.step = failing_once
        first = await asyncio.gather(engine.transcribe(tone(1.0), "en", "en", True, None), return_exceptions=True)
        second = await engine.transcribe(tone(2.0), "en", "en", True, None)
        return first[0], second

    first, second = _with_engine(engine, main)
    assert isinstance(first, RuntimeError) and second.text == "hello world 2.00"


def test_a_closed_engines_thread_stays_parked_instead_of_exiting():
    """An exiting MLX thread runs thread-local destructors that take the GIL; at interpreter shutdown that aborted
    the process (2 of 10 CLI runs). close() ends the engine loop but the thread must not return."""
    engine = fake_engine()
    engine.start()
    engine.close()
    assert engine._finished.is_set() and engine._thread.is_alive()
    assert engine.state.value == "closed"
