"""The Wyoming front door with Home Assistant's own client (`wyoming.client.AsyncTcpClient`).

Real models: the espeak-trained tiny ones in ../shared/models (NOT real Canary checkpoints), served by
`canary-server serve`'s composition (cli/serve.py `build_app`: HTTP and Wyoming on one pipeline, one event loop),
compared with NeMo's own transcripts. Errors, loading and overload: the fake model (server_fakes).
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info

from canary_server.cli.serve import build_app
from canary_server.server.settings import Settings
from conftest import ESPEAK_CLIPS, ESPEAK_MULTI_CLIPS
from server_fakes import SR, FakeCanary, fake_batcher, running_server, tone, wait_ready

TIMEOUT = 120  # seconds for one event on a busy 2-core machine


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1 - 2**-15) * 32768).round().astype("<i2").tobytes()


def clip_pcm(folder, name: str) -> bytes:
    data, rate = sf.read(folder / name, dtype="int16")
    assert rate == SR and data.ndim == 1
    return data.tobytes()


async def utterance(
    port: int,
    pcm: bytes,
    *,
    rate: int = SR,
    width: int = 2,
    channels: int = 1,
    language: str | None = None,
    chunk: int = 2048,
    audio_start: bool = True,
) -> list[Event]:
    """One request as Home Assistant sends it; every event the server answers until transcript-stop, an error,
    or the connection closing (then the last item is None)."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        if language is not None:
            await client.write_event(Transcribe(language=language).event())
        if audio_start:
            await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        for i in range(0, len(pcm), chunk):
            piece = pcm[i : i + chunk]
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=piece).event())
        await client.write_event(AudioStop().event())
        events: list[Event | None] = []
        while True:
            event = await asyncio.wait_for(client.read_event(), TIMEOUT)
            events.append(event)
            if event is None or event.type == "transcript-stop":
                return events
            if event.type == "error":  # the server closes the connection after an error in an utterance
                events.append(await asyncio.wait_for(client.read_event(), TIMEOUT))
                return events


async def describe(port: int) -> Event:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        return await asyncio.wait_for(client.read_event(), TIMEOUT)


def text_of(events: list[Event]) -> tuple[str, str | None]:
    """The transcript's text and language, checking the streaming events around it."""
    types = [e.type for e in events]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"], types
    assert set(types[1:-2]) <= {"transcript-chunk"}
    transcript = Transcript.from_event(events[-2])
    assert "".join(e.data["text"] for e in events[1:-2]) == transcript.text  # the chunks add up to the text
    return transcript.text, transcript.language


def serve(settings: Settings, engine=None):
    app = build_app(settings, wyoming_port=0, engine=engine)
    return app, running_server(app)


@pytest.fixture(scope="module")
def nemo_en() -> dict[str, str]:
    return {k: v.strip() for k, v in json.loads((ESPEAK_CLIPS / "nemo_transcripts.json").read_text()).items()}


@pytest.fixture(scope="module")
def en_server(espeak_dir):
    """(HTTP base URL, Wyoming port) of `serve` on the English espeak model."""
    app, server = serve(Settings(model=str(espeak_dir), batch_size=8))
    with server as url:
        wait_ready(url)
        yield url, app.state.wyoming.port


# ---- real models ------------------------------------------------------------------------------------------
def test_describe_answers_the_loaded_model_and_its_languages(en_server, espeak_dir):
    info = Info.from_event(asyncio.run(describe(en_server[1])))
    (program,) = info.asr
    assert program.name == "canary-server" and program.supports_transcript_streaming and program.requires_external_vad
    assert program.attribution.url and program.installed and program.version
    (model,) = program.models
    assert model.name == espeak_dir.name and model.languages == ["en"]


def test_a_transcript_streams_its_text_and_equals_nemo(en_server, nemo_en):
    for name in ("clip00.wav", "clip06.wav"):
        events = asyncio.run(utterance(en_server[1], clip_pcm(ESPEAK_CLIPS, name), language="en"))
        assert text_of(events) == (nemo_en[name], "en")
        assert len(events) > 4  # several transcript-chunk events: the decoder's text as it came


def test_any_rate_width_and_channel_count_is_converted_like_an_uploaded_file(en_server, nemo_en):
    """48 kHz 24-bit stereo and 8 kHz 8-bit over Wyoming give what the same audio gives as a WAV upload."""
    url, port = en_server
    audio, _ = sf.read(ESPEAK_CLIPS / "clip03.wav", dtype="float32")
    cases = [(48000, 3, 2, "PCM_24"), (8000, 1, 1, "PCM_U8"), (44100, 4, 1, "PCM_32")]
    for rate, width, channels, subtype in cases:
        resampled = soxr.resample(audio, SR, rate).astype(np.float32)
        frames = np.stack([resampled] * channels, axis=1) if channels > 1 else resampled
        wav = _wav(frames, rate, subtype)
        http = httpx.post(
            f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": ("a.wav", wav)}, timeout=60
        ).json()["text"]
        raw = sf.read(_io(wav), dtype="float32")[0]  # the exact samples the WAV holds
        pcm = _to_pcm(raw, width)
        events = asyncio.run(utterance(port, pcm, rate=rate, width=width, channels=channels, chunk=1001))
        assert text_of(events)[0] == http, (rate, width, channels)
    assert http == nemo_en["clip03.wav"]  # 44.1 kHz 32-bit survives the round trip exactly


def test_audio_chunks_without_audio_start_carry_their_own_format(en_server, nemo_en):
    events = asyncio.run(utterance(en_server[1], clip_pcm(ESPEAK_CLIPS, "clip03.wav"), audio_start=False))
    assert text_of(events)[0] == nemo_en["clip03.wav"]


def test_concurrent_wyoming_and_http_requests_each_get_their_own_exact_text(en_server, nemo_en):
    url, port = en_server
    names = sorted(nemo_en)
    over_http, over_wyoming = names[::2], names[1::2]
    http_texts: dict[str, str] = {}

    def post(name: str) -> None:
        files = {"file": (name, (ESPEAK_CLIPS / name).read_bytes())}
        r = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files, timeout=TIMEOUT)
        http_texts[name] = r.json()["text"]

    async def both():
        threads = [threading.Thread(target=post, args=(n,)) for n in over_http]
        for t in threads:
            t.start()
        results = await asyncio.gather(*(utterance(port, clip_pcm(ESPEAK_CLIPS, n)) for n in over_wyoming))
        for t in threads:
            await asyncio.to_thread(t.join, TIMEOUT)
        return results

    wyoming_events = asyncio.run(both())
    assert {n: text_of(e)[0] for n, e in zip(over_wyoming, wyoming_events, strict=True)} == {
        n: nemo_en[n] for n in over_wyoming
    }
    assert http_texts == {n: nemo_en[n] for n in over_http}


def test_a_bad_language_is_an_error_event_and_the_connection_closes(en_server):
    events = asyncio.run(utterance(en_server[1], clip_pcm(ESPEAK_CLIPS, "clip03.wav"), language="de"))
    assert [e and e.type for e in events] == ["error", None]
    assert events[0].data["code"] == "unsupported_language" and "supports: en" in events[0].data["text"]


def test_a_locale_is_taken_for_its_language_and_silence_gives_an_empty_transcript(en_server):
    assert text_of(asyncio.run(utterance(en_server[1], b"", language="en-US"))) == ("", None)


def test_language_auto_detects_each_clips_language_over_wyoming(espeak_multi_dir):
    nemo = {k: v.strip() for k, v in json.loads((ESPEAK_MULTI_CLIPS / "nemo_transcripts.json").read_text()).items()}
    names = ["en_01.wav", "de_02.wav", "es_00.wav", "fr_02.wav"]
    app, server = serve(Settings(model=str(espeak_multi_dir), wyoming_zeroconf=False))
    with server as url:
        wait_ready(url)

        async def all_at_once():
            port = app.state.wyoming.port
            return await asyncio.gather(
                *(utterance(port, clip_pcm(ESPEAK_MULTI_CLIPS, n), language="auto") for n in names)
            )

        for name, events in zip(names, asyncio.run(all_at_once()), strict=True):
            assert text_of(events) == (nemo[name], name[:2])


# ---- fakes: limits, loading, overload, formats ------------------------------------------------------------
def test_audio_longer_than_the_limit_is_refused_while_it_streams_in():
    fake = FakeCanary()
    from canary_server.pipeline.engine import Engine

    app, server = serve(Settings(model="/models/fake", max_audio_seconds=2), Engine(lambda: fake, batcher=fake_batcher))
    with server as url:
        wait_ready(url)
        events = asyncio.run(utterance(app.state.wyoming.port, pcm16(tone(3.0))))
    assert [e and e.type for e in events] == ["error", None] and events[0].data["code"] == "audio_too_long"
    assert fake.calls == []  # refused before anything reached the engine


def test_a_format_change_mid_utterance_is_invalid_audio():
    from canary_server.pipeline.engine import Engine

    app, server = serve(Settings(model="/models/fake"), Engine(lambda: FakeCanary(), batcher=fake_batcher))

    async def two_formats(port):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(AudioStart(rate=SR, width=2, channels=1).event())
            await client.write_event(AudioChunk(rate=SR, width=2, channels=1, audio=pcm16(tone(0.5))).event())
            await client.write_event(AudioChunk(rate=8000, width=2, channels=1, audio=pcm16(tone(0.5))).event())
            await client.write_event(AudioStop().event())
            return [await client.read_event(), await client.read_event()]

    with server as url:
        wait_ready(url)
        error, closed = asyncio.run(two_formats(app.state.wyoming.port))
    assert error.data["code"] == "invalid_audio" and "16000 Hz" in error.data["text"] and closed is None


def test_while_the_model_loads_describe_and_requests_answer_model_not_ready():
    from canary_server.pipeline.engine import Engine

    gate = threading.Event()
    engine = Engine(lambda: gate.wait(30) and FakeCanary(), batcher=fake_batcher)
    app, server = serve(Settings(model="/models/fake"), engine)
    with server:
        port = app.state.wyoming.port
        first = asyncio.run(describe(port))
        events = asyncio.run(utterance(port, pcm16(tone(1.0))))
        gate.set()
    assert first.type == "error" and first.data["code"] == "model_not_ready"
    assert events[0].data["code"] == "model_not_ready"


def test_a_full_queue_answers_rate_limit_exceeded_and_the_queued_request_still_finishes():
    from canary_server.pipeline.engine import Engine

    fake = FakeCanary()
    fake.gate = threading.Event()  # holds the fake batcher's step
    engine = Engine(lambda: fake, batcher=fake_batcher, max_queue=1)
    app, server = serve(Settings(model="/models/fake"), engine)

    async def two(port):
        first = asyncio.ensure_future(utterance(port, pcm16(tone(1.0))))
        while engine.queued < 1:
            await asyncio.sleep(0.005)
        second = await utterance(port, pcm16(tone(1.0)))
        fake.gate.set()
        return await first, second

    with server as url:
        wait_ready(url)
        first, second = asyncio.run(two(app.state.wyoming.port))
    assert text_of(first) == ("hello world 1.00", "en")
    assert [e and e.type for e in second] == ["error", None] and second[0].data["code"] == "rate_limit_exceeded"


def test_wyoming_port_zero_in_the_settings_turns_it_off():
    app = build_app(Settings(model="/models/fake", wyoming_port=0))
    assert app.state.wyoming is None
    app = build_app(Settings(model="/models/fake", wyoming_port=10399, wyoming_host="0.0.0.0"))
    assert (app.state.wyoming.config.port, app.state.wyoming.config.host) == (10399, "0.0.0.0")


def _io(data: bytes):
    import io

    return io.BytesIO(data)


def _wav(frames: np.ndarray, rate: int, subtype: str) -> bytes:
    buf = _io(b"")
    sf.write(buf, frames, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _to_pcm(samples: np.ndarray, width: int) -> bytes:
    """float samples read from a WAV back to its integer PCM bytes (exact for those samples)."""
    scale = 2.0 ** (8 * width - 1)
    ints = np.rint(samples.astype(np.float64) * scale).astype(np.int64)
    if width == 1:
        return (ints + 128).astype(np.uint8).tobytes()
    if width == 3:
        u = ints.reshape(-1) & 0xFFFFFF
        return np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()
    return ints.astype("<i2" if width == 2 else "<i4").reshape(-1).tobytes()


# ---- zeroconf (no network: a fake zeroconf.asyncio) --------------------------------------------------------
class FakeZeroconfApi:
    """Stands in for `zeroconf.asyncio`: records what would be announced and withdrawn."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        api = self

        class AsyncServiceInfo:
            def __init__(self, type_, name, addresses, port):
                self.type, self.name, self.addresses, self.port = type_, name, addresses, port

        class AsyncZeroconf:
            async def async_register_service(self, info, allow_name_change=False):
                api.calls.append(("register", info, allow_name_change))

            async def async_unregister_service(self, info):
                api.calls.append(("unregister", info))

            async def async_close(self):
                api.calls.append(("close",))

        self.AsyncServiceInfo, self.AsyncZeroconf = AsyncServiceInfo, AsyncZeroconf


def test_zeroconf_announces_the_wyoming_service_as_home_assistant_expects_and_withdraws_it():
    import socket

    from canary_server.wyoming_server.zeroconf import ZeroconfAnnouncement

    api = FakeZeroconfApi()
    announcement = ZeroconfAnnouncement(10300, "192.168.1.20", name="canary-server-box", api=api)

    async def lifecycle():
        await announcement.start()
        await announcement.stop()

    asyncio.run(lifecycle())
    (_, info, rename), unregister, close = api.calls
    assert (info.type, info.name, info.port) == (
        "_wyoming._tcp.local.",
        "canary-server-box._wyoming._tcp.local.",
        10300,
    )
    assert info.addresses == [socket.inet_aton("192.168.1.20")] and rename
    assert unregister == ("unregister", info) and close == ("close",)


def test_the_wyoming_server_starts_and_stops_its_announcement_with_the_bound_port():
    from canary_server.pipeline import Pipeline
    from canary_server.pipeline.engine import Engine
    from canary_server.wyoming_server import WyomingConfig, WyomingServer

    class Announcement:
        def __init__(self):
            self.events = []

        async def start(self):
            self.events.append(("start", server.port))

        async def stop(self):
            self.events.append(("stop",))

    announcement = Announcement()
    pipeline = Pipeline(engine=Engine(lambda: FakeCanary(), batcher=fake_batcher))
    server = WyomingServer(pipeline, WyomingConfig(port=0, zeroconf=True), announcement=announcement)

    async def lifecycle():
        async with server:
            assert server.port

    asyncio.run(lifecycle())
    assert announcement.events == [("start", server.port), ("stop",)]


def test_zeroconf_without_the_optional_package_says_how_to_install_it(monkeypatch):
    import sys

    from canary_server.wyoming_server.zeroconf import ZeroconfAnnouncement

    monkeypatch.setitem(sys.modules, "zeroconf", None)  # import zeroconf -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'canary-server\[zeroconf\]'"):
        asyncio.run(ZeroconfAnnouncement(10300, "192.168.1.20").start())


def test_wyoming_and_http_cannot_share_a_port():
    with pytest.raises(ValueError, match="wyoming_port and port are both 9000"):
        Settings(model="/models/fake", port=9000, wyoming_port=9000)
    assert Settings(model="/models/fake", port=9000, wyoming_port=0).wyoming_port == 0


def test_stopping_lets_a_transcription_in_progress_finish_and_closes_idle_connections():
    from canary_server.pipeline import Pipeline
    from canary_server.pipeline.engine import Engine
    from canary_server.wyoming_server import WyomingConfig, WyomingServer

    fake = FakeCanary()
    fake.gate = threading.Event()  # holds the engine step: the transcription stays in progress
    pipeline = Pipeline(engine=Engine(lambda: fake, batcher=fake_batcher))

    async def main():
        pipeline.start()
        await pipeline.wait_ready()
        server = WyomingServer(pipeline, WyomingConfig(port=0, shutdown_grace_seconds=60))
        await server.start()
        idle = AsyncTcpClient("127.0.0.1", server.port)
        await idle.connect()
        busy = asyncio.ensure_future(utterance(server.port, pcm16(tone(1.0))))
        while not any(h.busy for h in server._handlers.values()):
            await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(server.stop())
        while server._server.is_serving():  # stop() has begun: no new connections
            await asyncio.sleep(0.005)
        fake.gate.set()
        await stopping
        closed = await asyncio.wait_for(idle.read_event(), TIMEOUT)
        await idle.disconnect()
        return await busy, closed

    try:
        events, closed = asyncio.run(main())
    finally:
        fake.gate.set()
        pipeline.close()
    assert text_of(events) == ("hello world 1.00", "en") and closed is None


def test_open_wyoming_connections_are_counted_in_metrics():
    from canary_server.pipeline.engine import Engine

    app, server = serve(Settings(model="/models/fake"), Engine(FakeCanary, batcher=fake_batcher))

    def sessions(url: str) -> str:
        lines = httpx.get(f"{url}/metrics").text.splitlines()
        return next(line for line in lines if line.startswith('canary_sessions{kind="wyoming"}'))

    async def while_open(port: int, url: str) -> str:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            await asyncio.wait_for(client.read_event(), TIMEOUT)  # the server has taken the connection
            return await asyncio.to_thread(sessions, url)

    with server as url:
        wait_ready(url)
        during = asyncio.run(while_open(app.state.wyoming.port, url))
        closed = asyncio.run(_session_closed(app.state.pipeline))
    assert during.endswith(" 1.0") and closed


async def _session_closed(pipeline, timeout: float = 10) -> bool:
    """The server notices the closed connection (a moment after the client closed it): polled, bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pipeline.snapshot().sessions.get("wyoming") != 0:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True
