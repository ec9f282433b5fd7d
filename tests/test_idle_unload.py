"""idle_unload_seconds: the engine frees the model after that long without requests, /health says "unloaded", and
the next request loads it again and waits for it."""

from __future__ import annotations

import threading
import time

import httpx
from openai import OpenAI

import canary_server
from canary_server.pipeline import Pipeline
from canary_server.pipeline.engine import Engine, EngineState
from canary_server.server.app import create_app
from canary_server.server.settings import Settings
from conftest import ESPEAK_CLIPS
from server_fakes import FakeCanary, fake_batcher, running_server, tone, wait_ready, wav_bytes


def wait_for_state(engine: Engine, state: EngineState, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.state is not state:
        assert time.monotonic() < deadline, f"engine stayed {engine.state.value}, expected {state.value}"
        time.sleep(0.005)


class CountingLoader:
    """Returns the fake model, counting loads; `fail` makes the next load raise; `gate` holds a load."""

    def __init__(self) -> None:
        self.fake, self.loads, self.fail = FakeCanary(), 0, False
        self.gate: threading.Event | None = None

    def __call__(self) -> FakeCanary:
        if self.gate is not None:
            self.gate.wait(30)
        self.loads += 1
        if self.fail:
            self.fail = False
            raise OSError("the model directory went away")
        return self.fake


def test_the_setting_reaches_the_engine():
    settings = Settings(model="/m", idle_unload_seconds=900)
    assert Pipeline(lambda: None, settings.pipeline_config()).engine.idle_unload_seconds == 900
    assert Settings(model="/m").pipeline_config().idle_unload_seconds is None


def test_an_idle_model_is_unloaded_health_says_so_and_the_next_request_reloads_it():
    loader = CountingLoader()
    engine = Engine(loader, batcher=fake_batcher, idle_unload_seconds=0.05)
    with running_server(create_app(Settings(model="/models/fake-canary"), engine=engine)) as url:
        wait_ready(url)
        wait_for_state(engine, EngineState.UNLOADED)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "unloaded"
        loader.gate = threading.Event()  # hold the reload: the request waits, /health says reloading
        with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            result: list[str] = []
            file = ("a.wav", wav_bytes(tone(1.0)))
            call = threading.Thread(
                target=lambda: result.append(client.audio.transcriptions.create(model="whisper-1", file=file).text)
            )
            call.start()
            wait_for_state(engine, EngineState.RELOADING)
            assert httpx.get(f"{url}/health").json()["status"] == "reloading"
            loader.gate.set()
            call.join(30)
        assert result == ["hello world 1.00"] and loader.loads == 2 and engine.unloads >= 1
        assert engine.load_seconds is not None


def test_a_failed_reload_fails_that_request_and_the_next_one_tries_again():
    loader = CountingLoader()
    engine = Engine(loader, batcher=fake_batcher, idle_unload_seconds=0.05)
    with running_server(create_app(Settings(model="/models/fake-canary"), engine=engine)) as url:
        wait_ready(url)
        wait_for_state(engine, EngineState.UNLOADED)
        loader.fail = True
        files = {"file": ("a.wav", wav_bytes(tone(1.0)))}
        first = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files)
        assert first.status_code == 503 and "went away" in first.json()["error"]["message"]
        assert engine.state is EngineState.UNLOADED
        second = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files)
        assert second.status_code == 200 and second.json()["text"] == "hello world 1.00" and loader.loads == 3


def test_the_real_model_is_freed_and_reloaded_with_the_same_output(espeak_dir):
    import mlx.core as mx

    weights = sum(f.stat().st_size for f in espeak_dir.glob("*.safetensors"))  # float32 on disk, as loaded
    clip = str(ESPEAK_CLIPS / "clip03.wav")
    with canary_server.load(espeak_dir, dtype="float32", idle_unload_seconds=1.0) as m:
        before = m.transcribe(clip).text
        loaded = mx.get_active_memory()
        engine = m.pipeline.engine
        wait_for_state(engine, EngineState.UNLOADED)
        assert engine.unloads == 1
        assert loaded - mx.get_active_memory() > 0.9 * weights  # the weights are gone
        assert m.transcribe(clip).text == before
