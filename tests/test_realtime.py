"""OpenAI Realtime transcription (`/v1/realtime?intent=transcription`) against a real `serve` process on the espeak
model, driven by the official `openai` SDK's realtime client: manual commit (NeMo's streaming text, deltas while
the audio is still being sent), server VAD (turns found and committed by the server), silence, and the hostile
side (Origin, Host and key refused at the handshake, bad events answered with `error`, caps, idle deadline)."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

from canary_server.model.audio import load_audio
from canary_server.server.realtime_config import LOGPROBS, SessionConfig, SessionError, update_beta, update_ga
from conftest import ESPEAK_CLIPS, FIXTURES
from server_process import start_server, stop_server

openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

KEY = "realtime-test-key"
IDLE = 5.0
ENV = {
    "CANARY_API_KEY": KEY,
    "CANARY_REALTIME_MAX_SESSIONS": "3",
    "CANARY_REALTIME_IDLE_SECONDS": str(IDLE),
    "CANARY_REALTIME_MAX_TURN_SECONDS": "8",
    "CANARY_REALTIME_MAX_FRAME_MB": "1",
    "CANARY_REALTIME_MAX_HELD_MB": "0.75",  # 12.3 s of 16 kHz float32 for all turns together
    "CANARY_DEFAULT_LANGUAGE": "en",
}
GOLDEN = json.loads((FIXTURES / "streaming" / "golden.json").read_text())
WAIT = 120.0  # the longest any one event may take on a loaded CI machine


@pytest.fixture(scope="module")
def server(espeak_dir):
    proc = start_server(espeak_dir, env=ENV)
    try:
        yield proc
    finally:
        stop_server(proc)


def _golden_text(audio: str) -> str:
    (case,) = [
        c for c in GOLDEN["cases"]
        if (c["model"], c["audio"], c["context"], c["policy"]) == ("espeak-tiny-en", audio, "c1_l10_r0.5", "alignatt")
    ]  # fmt: skip
    return case["text"]


def _pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()


def _b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


def _pieces(pcm: bytes, rate: int, seconds: float = 0.25) -> list[bytes]:
    n = int(rate * seconds) * 2
    return [pcm[i : i + n] for i in range(0, len(pcm), n)]


def _ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"


def _client(server):
    return openai.AsyncOpenAI(api_key=KEY, base_url=server.url + "/v1")


def _connect(server):
    return _client(server).realtime.connect(model="whisper-1", extra_query={"intent": "transcription"})


async def _until(conn, kind: str, seen: list) -> object:
    """Events until one of `kind` (all of them kept in `seen`)."""
    while True:
        event = await asyncio.wait_for(conn.recv(), WAIT)
        seen.append(event)
        assert event.type != "error", event
        if event.type == kind:
            return event


def _session(rate: int, vad: dict | None) -> dict:
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": rate},
                "transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": vad,
            }
        },
    }


def test_manual_commit_streams_deltas_while_audio_arrives_and_completes_with_nemo_text(server):
    pcm = _pcm(load_audio(ESPEAK_CLIPS / "clip00.wav"))
    pieces = _pieces(pcm, 16000)
    early = 10  # 2.5 s: the first chunk with its look-ahead, and more

    async def main():
        seen: list = []
        async with _connect(server) as conn:
            created = await asyncio.wait_for(conn.recv(), WAIT)
            assert created.type == "session.created" and created.session.type == "transcription"
            await conn.send({"type": "session.update", "session": _session(16000, None)})
            await _until(conn, "session.updated", seen)
            for piece in pieces[:early]:
                await conn.send({"type": "input_audio_buffer.append", "audio": _b64(piece)})
            first = await _until(conn, "conversation.item.input_audio_transcription.delta", seen)
            for piece in pieces[early:]:  # the rest of the speech goes out only after the first delta came
                await conn.send({"type": "input_audio_buffer.append", "audio": _b64(piece)})
            await conn.send({"type": "input_audio_buffer.commit"})
            done = await _until(conn, "conversation.item.input_audio_transcription.completed", seen)
        return created, first, done, seen

    created, first, done, seen = asyncio.run(main())
    assert first.delta and first.item_id == done.item_id
    kinds = [e.type for e in seen]
    assert kinds.index("input_audio_buffer.committed") < kinds.index("conversation.item.added")
    assert kinds.index("conversation.item.added") < kinds.index("conversation.item.done") < len(kinds) - 1
    assert done.transcript == _golden_text("clip00")  # NeMo's streaming decoding, chunk 1 s, alignatt
    deltas = "".join(e.delta for e in seen if e.type.endswith(".delta"))
    assert deltas.strip() == done.transcript
    assert done.usage.type == "duration" and done.usage.seconds == pytest.approx(len(pcm) / 2 / 16000, abs=0.01)
    assert all(e.event_id for e in [created, *seen])
    assert "<|" not in done.transcript
    assert done.logprobs is None and first.logprobs is None  # not asked for


def test_logprobs_when_the_session_includes_them(server):
    """`include: [LOGPROBS]`: each delta carries its new tokens' log-probs, `.completed` all of them."""
    pcm = _pcm(load_audio(ESPEAK_CLIPS / "clip00.wav"))

    async def main():
        seen: list = []
        async with _connect(server) as conn:
            await conn.send({"type": "session.update", "session": _session(16000, None) | {"include": [LOGPROBS]}})
            updated = await _until(conn, "session.updated", seen)
            for piece in _pieces(pcm, 16000):
                await conn.send({"type": "input_audio_buffer.append", "audio": _b64(piece)})
            await conn.send({"type": "input_audio_buffer.commit"})
            done = await _until(conn, "conversation.item.input_audio_transcription.completed", seen)
        return updated, done, [e for e in seen if e.type.endswith(".delta")]

    updated, done, deltas = asyncio.run(main())
    assert updated.session.include == [LOGPROBS]
    assert done.transcript == _golden_text("clip00") and done.logprobs
    assert "".join(lp.token for lp in done.logprobs).strip() == done.transcript
    assert all(lp.logprob <= 0 and bytes(lp.bytes).decode() == lp.token for lp in done.logprobs)
    assert deltas and all(d.logprobs is not None for d in deltas)
    assert [lp for d in deltas for lp in d.logprobs] == done.logprobs[: sum(len(d.logprobs) for d in deltas)]


def test_include_in_either_session_shape_and_nothing_else():
    config = SessionConfig(model="whisper-1")
    assert update_beta(config, {"include": [LOGPROBS]}).include == (LOGPROBS,)
    assert update_ga(config, {"include": [LOGPROBS]}).beta("s")["include"] == [LOGPROBS]
    assert update_ga(update_ga(config, {"include": [LOGPROBS]}), {"include": None}).include == ()
    with pytest.raises(SessionError, match="the one choice"):
        update_beta(config, {"include": ["item.input_audio_transcription.words"]})


def test_keywords_on_a_live_session_are_refused_not_dropped():
    config = SessionConfig(model="whisper-1")
    ga = {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1", "keywords": ["Nadia"]}}}}
    with pytest.raises(SessionError, match="keywords are not applied") as e:
        update_ga(config, ga)
    assert e.value.code == "unsupported_keywords" and e.value.param.endswith("transcription.keywords")
    with pytest.raises(SessionError, match="keywords are not applied"):
        update_beta(config, {"input_audio_transcription": {"model": "whisper-1", "keywords": ["Nadia"]}})
    assert update_beta(config, {"input_audio_transcription": {"model": "whisper-1", "keywords": []}}).model


def test_server_vad_finds_the_turn_and_commits_it(server):
    import soxr

    speech = soxr.resample(load_audio(ESPEAK_CLIPS / "clip00.wav"), 16000, 24000)
    pcm = _pcm(np.concatenate([speech, np.zeros(24000, np.float32)]))  # speech, then 1 s of silence
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 0, "silence_duration_ms": 500}

    async def main():
        seen: list = []
        async with _connect(server) as conn:
            await conn.send({"type": "session.update", "session": _session(24000, vad)})
            await _until(conn, "session.updated", seen)
            for piece in _pieces(pcm, 24000):
                await conn.send({"type": "input_audio_buffer.append", "audio": _b64(piece)})
            done = await _until(conn, "conversation.item.input_audio_transcription.completed", seen)
        return done, seen

    done, seen = asyncio.run(main())
    kinds = [e.type for e in seen]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order)
    started, stopped = (next(e for e in seen if e.type == k) for k in order[:2])
    assert started.item_id == stopped.item_id == done.item_id
    assert 0 <= started.audio_start_ms < 300 and 4700 <= stopped.audio_end_ms <= 5900
    words = set(_golden_text("clip00").split())
    assert len(words & set(done.transcript.split())) >= len(words) // 2, done.transcript


def test_silence_alone_gives_no_turn(server):
    rng = np.random.default_rng(0)
    quiet = _pcm(rng.normal(0, 0.001, 24000 * 3).astype(np.float32))

    async def main():
        seen: list = []
        async with _connect(server) as conn:
            for piece in _pieces(quiet, 24000):  # the default session: 24 kHz, server VAD
                await conn.send({"type": "input_audio_buffer.append", "audio": _b64(piece)})
            await conn.send({"type": "input_audio_buffer.clear"})
            await _until(conn, "input_audio_buffer.cleared", seen)
        return [e.type for e in seen]

    kinds = asyncio.run(main())
    assert kinds == ["session.created", "input_audio_buffer.cleared"]


def _refused(server, **headers) -> int:
    async def main():
        try:
            async with websockets.connect(_ws_url(server), additional_headers=headers):
                return 101
        except websockets.exceptions.InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(main())


def test_handshake_refused_for_a_foreign_origin_a_bad_key_or_host(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert _refused(server, **auth) == 101
    assert _refused(server, Origin="http://evil.example", **auth) == 403
    assert _refused(server) == 403
    assert _refused(server, Authorization="Bearer wrong") == 403


def test_handshake_refused_for_a_host_not_allowed(espeak_dir):
    """Without a key only loopback names and IPs pass (DNS rebinding); the WebSocket is held to it too."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from canary_server.server.app import create_app
    from canary_server.server.settings import Settings

    client = TestClient(create_app(Settings(model=str(espeak_dir))), base_url="http://attacker.example")
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/v1/realtime?intent=transcription"):
        pass
    assert refused.value.code == 1008


async def _raw(server, subprotocols=None):
    if subprotocols:
        return await websockets.connect(_ws_url(server), subprotocols=subprotocols)
    return await websockets.connect(_ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"})


async def _sessions_closed(server) -> None:
    """Until the server has ended every Realtime session of the tests before (a client's close is seen first)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        while 'canary_sessions{kind="realtime"} 0.0' not in (await http.get("/metrics")).text:
            assert asyncio.get_running_loop().time() < deadline, "Realtime sessions still open"
            await asyncio.sleep(0.02)


async def _next(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), WAIT))


async def _next_of(ws, kind: str) -> dict:
    """The next event of type `kind`, past any other (the partial transcripts a held turn may send meanwhile); an
    error event is returned at once, so a refusal fails the caller's assertion instead of timing out."""
    while (event := await _next(ws))["type"] not in (kind, "error"):
        pass
    return event


def test_only_transcription_intent_is_served(server):
    async def main():
        url = _ws_url(server).replace("intent=transcription", "intent=conversation")
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            refused = await _next(ws)
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT)
            return refused

    assert asyncio.run(main())["error"]["code"] == "unsupported_intent"


def test_bad_events_get_error_events_and_the_session_goes_on(server):
    bad = [
        ("not json", "invalid_json"),
        ("[" * 200_000, "invalid_json"),  # deeper than Python's recursion limit
        (json.dumps([1, 2]), "invalid_event"),
        (json.dumps({"type": "response.create"}), "unknown_event"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_base64"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": 5}), "invalid_value"),
        (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
        (json.dumps({"type": "session.update", "session": {"type": "realtime"}}), "invalid_value"),
        (json.dumps({"type": "session.update", "session": {"include": [LOGPROBS, "item.x"]}}), "invalid_value"),
        (
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
                }
            ),
            "unsupported_turn_detection",
        ),  # fmt: skip
        (
            json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcma"}}}}}),
            "invalid_value",
        ),  # fmt: skip
        (
            json.dumps(
                {
                    "type": "session.update",
                    "session": _session(16000, None) | {"audio": {"input": {"transcription": {"language": "xx"}}}},
                }
            ),
            "unsupported_language",
        ),  # fmt: skip
    ]

    async def main():
        ws = await _raw(server, ["realtime", f"openai-insecure-api-key.{KEY}"])  # the browser's way
        try:
            assert ws.subprotocol == "realtime"
            assert (await _next(ws))["type"] == "session.created"
            got = []
            for text, _ in bad:
                await ws.send(text)
                got.append(await _next(ws))
            await ws.send(b"\x00\x01")
            got.append(await _next(ws))
            beta = {"type": "transcription_session.update", "event_id": "mine", "session": {
                "input_audio_format": "pcm16", "turn_detection": None}}  # fmt: skip
            await ws.send(json.dumps(beta))
            return got, await _next(ws)
        finally:
            await ws.close()

    got, updated = asyncio.run(main())
    assert [g["error"]["code"] for g in got] == [code for _, code in bad] + ["invalid_event"]
    assert all(g["type"] == "error" and g["event_id"] and g["error"]["message"] for g in got)
    assert updated["type"] == "transcription_session.updated" and updated["session"]["turn_detection"] is None
    assert "Traceback" not in server.log()


def test_caps_sessions_frames_turn_length_and_idle(server):
    async def main():
        await _sessions_closed(server)
        held = [await _raw(server) for _ in range(3)]
        for ws in held:
            assert (await _next(ws))["type"] == "session.created"
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            metrics = (await http.get("/metrics")).text
        extra = await _raw(server)
        refused = await _next(extra)
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(extra.recv(), WAIT)
        await asyncio.gather(*(ws.close() for ws in held))

        ws = await _raw(server)
        await _next(ws)
        await ws.send(json.dumps({"type": "session.update", "session": _session(16000, None)}))
        await _next(ws)
        nine_seconds = _b64(bytes(16000 * 2 * 9))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": nine_seconds}))
        too_long = await _next(ws)
        await ws.send("x" * (1024 * 1024 + 1))
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT)

        idle = await _raw(server)
        await _next(idle)
        timed_out = await asyncio.wait_for(idle.recv(), IDLE + WAIT)
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(idle.recv(), WAIT)
        return refused, too_long, closed.value, json.loads(timed_out), metrics

    refused, too_long, closed, timed_out, metrics = asyncio.run(main())
    assert 'canary_sessions{kind="realtime"} 3.0' in metrics
    assert refused["error"]["code"] == "rate_limit_exceeded"
    assert too_long["error"]["code"] == "audio_too_long"
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    assert timed_out["error"]["code"] == "idle_timeout"


def test_turn_audio_held_by_all_sessions_is_capped(server):
    seven_seconds = json.dumps({"type": "input_audio_buffer.append", "audio": _b64(bytes(16000 * 2 * 7))})
    update = json.dumps({"type": "session.update", "session": _session(16000, None)})

    async def main():
        await _sessions_closed(server)
        a, b = await _raw(server), await _raw(server)
        try:
            for ws in (a, b):
                await _next(ws)
                await ws.send(update)
                await _next(ws)
            await a.send(seven_seconds)
            # a's audio is held before b's arrives: one connection's events are handled in order, two connections'
            # are not (under load b's append could come first, be held, and a's be refused instead)
            await a.send(update)
            await _next_of(a, "session.updated")
            await b.send(seven_seconds)  # 14 s held together: past 0.75 MiB
            refused = await _next(b)
            await a.send(json.dumps({"type": "input_audio_buffer.clear"}))
            cleared = await _next_of(a, "input_audio_buffer.cleared")  # (after any partial transcript of a's audio)
            await b.send(seven_seconds)  # room again
            await b.send(json.dumps({"type": "input_audio_buffer.clear"}))
            return refused, cleared, await _next_of(b, "input_audio_buffer.cleared")
        finally:
            await asyncio.gather(a.close(), b.close())

    refused, cleared, after = asyncio.run(main())
    assert refused["error"]["code"] == "rate_limit_exceeded"
    assert cleared["type"] == after["type"] == "input_audio_buffer.cleared"


def test_sigterm_closes_open_sessions_and_the_server_exits(espeak_dir):
    import signal

    proc = start_server(espeak_dir, env={"CANARY_SHUTDOWN_GRACE_SECONDS": "2"})
    try:

        async def main():
            ws = await websockets.connect(_ws_url(proc))
            assert (await _next(ws))["type"] == "session.created"
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _b64(bytes(32000))}))
            sent = proc.signal(signal.SIGTERM)
            status, exited = await asyncio.to_thread(proc.wait_exit, 60)
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), WAIT)
            return status, exited - sent, closed.value

        status, took, closed = asyncio.run(main())
    finally:
        stop_server(proc)
    assert status == -signal.SIGTERM and took < 2 + 15
    assert closed.rcvd is not None and closed.rcvd.code == 1012  # "service restart": uvicorn closes it
    assert "Traceback" not in proc.log()
