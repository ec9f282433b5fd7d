"""The engine's continuous batching with real models: concurrent requests get exactly their single-request output;
a full queue answers 429 and a client that disconnects has its work cancelled (over HTTP, with the SDK)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import openai
import pytest

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.model.audio import load_audio
from canary_server.pipeline.engine import Engine
from canary_server.server.app import create_app
from canary_server.server.settings import Settings
from conftest import ESPEAK_CLIPS, FIXTURES, run_engine
from server_fakes import FakeCanary, fake_batcher, running_server, tone, wait_ready, wav_bytes


@pytest.fixture(scope="module")
def flash(tmp_path_factory) -> model.Canary:
    """The flash-style random-weight parity fixture (canary2, en/de/es/fr, encoder_decoder_proj)."""
    return model.load(convert_nemo(FIXTURES / "flash_agg" / "model.nemo", tmp_path_factory.mktemp("f") / "m"))


def test_many_concurrent_requests_each_equal_their_single_request_nemo_output(flash):
    meta = json.loads((FIXTURES / "flash_agg" / "golden.json").read_text())
    g = dict(np.load(FIXTURES / "flash_agg" / "golden.npz"))
    nemo = {c["name"]: c["tokens"][0] for c in meta["transcribe"] if c["batch_size"] == 1}
    audios = {i: g[f"audio_{i}"] for i in range(4)}
    # (audio, target language, pnc, expected tokens): NeMo's own single-item output where it exists
    jobs = [(i, "en", True, nemo[f"asr_en_{i}"]) for i in range(3)]
    jobs += [(1, "en", False, nemo["asr_en_nopnc_1"]), (3, "en", True, nemo["asr_en_short_3"])]
    jobs += [
        (i, t, True, flash.generate(audios[i], source_lang="en", target_lang=t).tokens)
        for i, t in [(0, "de"), (1, "es"), (2, "fr"), (2, "de")]
    ]
    jobs = jobs * 3  # 27 requests in flight at once, 8 rows at a time
    engine = Engine(lambda: flash, batch_size=8, encode_seconds=4.0)

    async def main():
        return await asyncio.gather(*[engine.transcribe(audios[i], "en", t, pnc, None) for i, t, pnc, _ in jobs])

    results = run_engine(engine, main)
    assert [r.tokens for r in results] == [expected for *_, expected in jobs]
    assert engine.stats["completed"] == len(jobs)


def test_a_short_request_finishes_while_a_long_file_is_still_decoding(espeak_model):
    """Shortest-request-first admission + continuous batching: a 2 s clip does not wait for 12 chunks."""
    long_chunks = [load_audio(ESPEAK_CLIPS / f"clip{i:02d}.wav") for i in range(12)]
    short = load_audio(ESPEAK_CLIPS / "clip03.wav")
    engine = Engine(lambda: espeak_model, batch_size=4, encode_seconds=6.0)
    order = []

    async def main():
        async def one(name, coro):
            res = await coro
            order.append(name)
            return res

        long = asyncio.ensure_future(one("long", engine.transcribe_batch(long_chunks, "en", "en", True, None)))
        await asyncio.sleep(0)
        quick = await one("short", engine.transcribe(short, "en", "en", True, None))
        return quick, await long

    quick, long = run_engine(engine, main)
    assert order == ["short", "long"]
    assert quick.tokens == espeak_model.generate(short).tokens
    assert [r.tokens for r in long] == [espeak_model.generate(c).tokens for c in long_chunks]


def test_the_server_decodes_with_beam_search_when_configured(espeak_dir, espeak_model):
    settings = Settings(model=str(espeak_dir), beam_size=3)
    app = create_app(settings)
    with running_server(app) as url:
        wait_ready(url)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            path = ESPEAK_CLIPS / "clip06.wav"
            res = client.audio.transcriptions.create(model="whisper-1", file=path.read_bytes())
    assert res.text == espeak_model.generate(str(path), beam_size=3).text


def test_a_full_queue_answers_429_with_retry_after_over_http():
    fake = FakeCanary()
    fake.gate = threading.Event()
    app = create_app(
        Settings(model="/models/fake", max_queued_requests=1),
        engine=Engine(lambda: fake, batcher=fake_batcher, max_queue=1),
    )
    with running_server(app) as url:
        wait_ready(url)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            audio = ("a.wav", wav_bytes(tone(1.0)), "audio/wav")
            create = client.audio.transcriptions.create
            held = threading.Thread(target=create, kwargs={"model": "whisper-1", "file": audio})
            held.start()
            deadline = time.monotonic() + 30
            while app.state.engine.queued < 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            with pytest.raises(openai.RateLimitError) as err:
                client.audio.transcriptions.create(model="whisper-1", file=audio)
            fake.gate.set()
            held.join(30)
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.response.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_client_that_disconnects_has_its_request_cancelled():
    fake = FakeCanary()
    fake.gate = threading.Event()
    engine = Engine(lambda: fake, batcher=fake_batcher)
    app = create_app(Settings(model="/models/fake"), engine=engine)
    with running_server(app) as url:
        wait_ready(url)
        host, port = url.removeprefix("http://").split(":")
        body, boundary = _multipart(wav_bytes(tone(1.0))), "canaryboundary"
        head = (
            f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            deadline = time.monotonic() + 30
            while not (getattr(fake, "last_batcher", None) and fake.last_batcher.waiting):
                assert time.monotonic() < deadline
                time.sleep(0.001)
        # the socket is closed: the client went away while its request was being decoded
        deadline = time.monotonic() + 30
        while not any(job.cancelled.is_set() for job in list(engine._jobs)):
            assert time.monotonic() < deadline, engine.stats
            time.sleep(0.001)
        fake.gate.set()  # let the step in progress end: the engine then drops the cancelled request
        while engine.stats["cancelled"] == 0:
            assert time.monotonic() < deadline, engine.stats
            time.sleep(0.001)
    assert engine.stats == {"completed": 0, "failed": 0, "cancelled": 1, "refused": 0}


def _multipart(wav: bytes, boundary: str = "canaryboundary") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode()
        + wav
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def test_streamed_deltas_arrive_per_piece_in_chunk_order_and_add_up_to_the_text(espeak_model):
    chunks = [load_audio(ESPEAK_CLIPS / f"clip{i:02d}.wav") for i in (0, 3, 5)]
    engine = Engine(lambda: espeak_model, batch_size=4)

    async def main():
        events = [ev async for ev in engine.stream_batch(chunks, "en", "en", True, None)]
        return events

    events = run_engine(engine, main)
    deltas = [e.delta for e in events if e.kind == "delta"]
    assert events[-1].kind == "done" and len(deltas) > len(chunks)  # piece by piece, not chunk by chunk
    expected = [espeak_model.generate(c).text for c in chunks]
    assert "".join(deltas) == " ".join(expected)
    assert [r.text for r in events[-1].results] == expected


def test_closing_a_stream_early_cancels_the_request(espeak_model):
    long = [load_audio(ESPEAK_CLIPS / f"clip{i:02d}.wav") for i in range(12)]
    engine = Engine(lambda: espeak_model, batch_size=2)

    async def main():
        stream = engine.stream_batch(long, "en", "en", True, None)
        first = await anext(stream)
        await stream.aclose()  # what the HTTP layer does when the client goes away
        while engine.stats["cancelled"] == 0:
            await asyncio.sleep(0)
        return first

    assert run_engine(engine, main).kind == "delta"
    assert engine.stats["cancelled"] == 1 and engine.stats["completed"] == 0
