"""Shared test fixtures. `model` is imported first so OpenBLAS is preloaded before MLX."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from canary_server import model  # noqa: F401  (preloads OpenBLAS before anything imports mlx)

if TYPE_CHECKING:
    from canary_server.pipeline.engine import Engine

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# CI clones the repo with shared/ beside it; a developer checkout has ../shared too.
SHARED = REPO.parent / "shared"
ESPEAK_NEMO = SHARED / "models" / "espeak-tiny-en.nemo"
ESPEAK_CLIPS = SHARED / "models" / "espeak-tiny-en-clips"
ESPEAK_SERVER_CHUNK_SECONDS = 8.0  # long-audio chunking of the shared espeak server
ESPEAK_MULTI_NEMO = SHARED / "models" / "espeak-tiny-multi.nemo"
ESPEAK_MULTI_CLIPS = SHARED / "models" / "espeak-tiny-multi-clips"
# espeak-tiny-en fine-tuned on speech with silence and noise around it (NOT a real Canary); committed here.
SILENCE_ROBUST_NEMO = FIXTURES / "silence_robust" / "silence_robust.nemo"
SILENCE_ROBUST_CLIPS = FIXTURES / "silence_robust" / "clips"
# A log line of canary-server (ours and uvicorn's): "2026-12-07 01:20:00,123 INFO:     message".
LOG_LINE = re.compile(r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>[A-Z]+): +(?P<message>.*)")


def run_engine(engine: Engine, main):
    """Start `engine`, run the coroutine function `main` once the model is loaded, and close the engine."""
    engine.start()
    try:

        async def wrapped():
            while not engine.ready:
                await asyncio.sleep(0)
            return await main()

        return asyncio.run(wrapped())
    finally:
        engine.close()


def log_message(line: str, level: str = "INFO") -> str | None:
    """The message of a log line of `level`, or None for any other line (an error printed by the CLI, output)."""
    m = LOG_LINE.fullmatch(line)
    return m["message"] if m and m["level"] == level else None


def _require_espeak() -> None:
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")


@pytest.fixture(scope="session")
def espeak_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The espeak-trained tiny Canary-architecture model (NOT a real Canary), converted once per session."""
    _require_espeak()
    from canary_server.convert import convert_nemo

    return convert_nemo(ESPEAK_NEMO, tmp_path_factory.mktemp("espeak") / "model")


@pytest.fixture(scope="session")
def espeak_multi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The espeak-trained tiny en/de/es/fr model (NOT a real Canary; learned language-ID slot), converted once."""
    if not ESPEAK_MULTI_NEMO.is_file():
        pytest.skip(f"the multilingual espeak-trained test model is not at {ESPEAK_MULTI_NEMO}")
    from canary_server.convert import convert_nemo

    return convert_nemo(ESPEAK_MULTI_NEMO, tmp_path_factory.mktemp("espeak-multi") / "model")


@pytest.fixture(scope="session")
def silence_robust_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The silence-robust espeak test model (tests/fixtures/silence_robust; NOT a real Canary), converted once."""
    from canary_server.convert import convert_nemo

    return convert_nemo(SILENCE_ROBUST_NEMO, tmp_path_factory.mktemp("silence-robust") / "model")


@pytest.fixture(scope="session")
def streaming_models(tmp_path_factory: pytest.TempPathFactory):
    """`get(name)`: the model of tests/streaming's golden cases (a fixture family in tests/fixtures/NAME or one of
    the shared espeak models), converted once per session, float32; skips when its .nemo is not here."""
    from functools import cache

    from canary_server.convert import convert_nemo

    root = tmp_path_factory.mktemp("streaming")
    shared = {"espeak-tiny-en": ESPEAK_NEMO, "espeak-tiny-multi": ESPEAK_MULTI_NEMO}

    @cache
    def get(name: str):
        nemo = shared.get(name, FIXTURES / name / "model.nemo")
        if not Path(nemo).is_file():
            pytest.skip(f"{nemo} is not here")
        return model.load(convert_nemo(nemo, root / name), dtype="float32")

    return get


@pytest.fixture(scope="session")
def espeak_model(espeak_dir: Path):
    return model.load(espeak_dir, dtype="float32")


@pytest.fixture(scope="session")
def espeak_nemo_transcripts() -> dict[str, str]:
    _require_espeak()
    return json.loads((ESPEAK_CLIPS / "nemo_transcripts.json").read_text())


@pytest.fixture(scope="session")
def espeak_server(espeak_dir: Path):
    """The server on the espeak model (uvicorn on loopback), shared by the end-to-end test files: its base URL."""
    from canary_server.server.app import create_app
    from canary_server.server.settings import Settings
    from server_fakes import running_server, wait_ready

    settings = Settings(model=str(espeak_dir), chunk_seconds=ESPEAK_SERVER_CHUNK_SECONDS, batch_size=8)
    with running_server(create_app(settings)) as url:
        wait_ready(url)
        yield url


@pytest.fixture
def espeak_client(espeak_server: str):
    """The real `openai` SDK client for `espeak_server`."""
    from openai import OpenAI

    with OpenAI(base_url=f"{espeak_server}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(autouse=True)
def _vad_only_where_asked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake model's audio is pure tones, which the VAD rightly calls no speech (empty text, nothing decoded):
    in-process tests run without the VAD unless marked `vad`, so tests of other things can use tones. Servers
    started as processes (tests/server_process.py) keep it, as do the tests of the VAD itself."""
    if request.node.get_closest_marker("vad") is None:
        from canary_server.pipeline.pipeline import Pipeline

        async def no_vad(self, samples, sample_rate):
            return None

        monkeypatch.setattr(Pipeline, "_speech", no_vad)
