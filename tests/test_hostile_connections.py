"""Hostile connections against a real `canary-server serve` process (the espeak-trained test model, not a real
Canary), with short deadlines so the tests are quick: idle and half-sent connections past the descriptor limit,
stalled uploads and their spool files, the spool budget, a client stuck mid-body at shutdown, X-Forwarded-For,
a foreign origin's form POST, /health after a failed reload of a model under a path with spaces. In process: the
Origin rule in detail and WebSocket handshakes (main has no WebSocket route yet for a real server to refuse)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from server_process import ServerProcess, start_server, stop_server

DEADLINES = {  # seconds: short, so that the tests see them pass
    "CANARY_HEADER_TIMEOUT_SECONDS": "2",
    "CANARY_BODY_TIMEOUT_SECONDS": "2",
    "CANARY_KEEP_ALIVE_SECONDS": "1",
}
DESCRIPTORS = 1024  # the child's `ulimit -n`, soft and hard: the default of a systemd service
MIB = 1024 * 1024
# The server's descriptors are read from /proc (Linux)
needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/PID/fd")


def _address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _descriptors(server: ServerProcess) -> list[str]:
    """Where the server's open file descriptors point."""
    fd_dir = Path(f"/proc/{server.proc.pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            targets.append(os.readlink(fd))
    return targets


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closes `sock` (EOF, after any answer) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def many_files():
    """This test process may open 2500 sockets (raised within its own hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2500 if hard == resource.RLIM_INFINITY else min(hard, 2500)
    if wanted < 2500:
        pytest.skip(f"this test needs 2500 open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _multipart_head(host: str, port: int, length: int) -> bytes:
    return (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {length}\r\n\r\n"
        '--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()


# ---- idle and half-sent connections past the descriptor limit -------------------------------------------
@needs_proc
def test_1100_idle_and_half_sent_connections_do_not_take_the_server_down(espeak_dir, many_files):
    server = start_server(espeak_dir, descriptor_limit=DESCRIPTORS, env=DEADLINES)
    try:
        host, port = _address(server)
        log_lines = len(server.lines)
        socks = []
        for i in range(1100):
            sock = socket.create_connection((host, port), timeout=10)
            if i % 2:  # half a request line and headers
                sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\nContent-Ty".encode())
            socks.append(sock)
            if i % 10 == 5:  # not HTTP at all: a 400 each, and one log line for all of them
                with socket.create_connection((host, port), timeout=10) as bad:
                    bad.sendall(b"GARBAGE\r\n\r\n")
                    assert bad.recv(100).startswith(b"HTTP/1.1 400") and _closed_by_server(bad, timeout=5)
            if i % 100 == 99:  # the front door keeps answering during the flood
                assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        began = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert server.alive()
        closed = [_closed_by_server(s, timeout=6) for s in socks]  # all of them by their 2 s deadline (+ slack)
        assert all(closed), f"{closed.count(False)} connections still open after {time.monotonic() - began:.1f} s"
        for s in socks:
            s.close()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        _wait_until(lambda: sum(t.startswith("socket:") for t in _descriptors(server)) < 10, 5, "sockets left")
        new_log = server.lines[log_lines:]
        assert len(new_log) < 40, "".join(new_log[-40:])  # a summary line at most every 10 s, access lines
        assert "Traceback" not in "".join(new_log)
        assert "max_connections 512 lowered to 352" in server.log()
        # a kept-alive connection is closed after keep_alive_seconds (1 s), before the header deadline (2 s)
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            answered = time.monotonic()
            assert _closed_by_server(sock, timeout=5) and time.monotonic() - answered < 1.8
        # no X-Forwarded-For believed without trusted_proxies: the access log names the real client
        httpx.get(f"{server.url}/health", headers={"X-Forwarded-For": "203.0.113.9"})
        _wait_until(lambda: "/health" in server.lines[-1], 5, server.log())
        assert "203.0.113.9" not in server.log() and "127.0.0.1" in server.lines[-1]
    finally:
        stop_server(server)


# ---- stalled uploads, the spool budget -------------------------------------------------------------------
@needs_proc
def test_stalled_uploads_lose_their_spool_files_at_the_deadline_and_their_budget(espeak_dir, tmp_path):
    """20 uploads send 2 MiB each (past the 1 MiB kept in memory) and stall. Within the 45 MiB budget a 21st
    of 10 MiB is refused (429) while they hold theirs; at the body deadline they are closed, their spool files
    gone, and the same upload is let in."""
    spool = tmp_path / "spool"
    spool.mkdir()
    env = {**DEADLINES, "TMPDIR": str(spool), "CANARY_BODY_MIN_RATE": str(MIB), "CANARY_MAX_SPOOLED_UPLOADS_MB": "45"}
    server = start_server(espeak_dir, env=env)
    try:
        host, port = _address(server)
        socks = []
        for _ in range(20):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(_multipart_head(host, port, 5 * MIB) + b"\0" * (2 * MIB))
            socks.append(sock)
        in_spool = lambda: sum(t.startswith(str(spool)) for t in _descriptors(server))  # noqa: E731
        _wait_until(lambda: in_spool() == 20, 10, f"{in_spool()} spool files, not 20")
        big = {"file": ("a.wav", b"\0" * (10 * MIB))}
        r = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=big)
        assert r.status_code == 429 and r.headers["retry-after"], r.text
        assert r.json()["error"]["type"] == "rate_limit_error"
        began = time.monotonic()
        assert all(_closed_by_server(s, timeout=10) for s in socks)
        # the deadline: 2 s + 2 s for 2 MiB at 1 MiB/s after the headers
        assert time.monotonic() - began < 8
        _wait_until(lambda: in_spool() == 0, 2, f"{in_spool()} spool files held after the deadline")
        r = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=big)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio", r.text  # let in: decoded
        _wait_until(lambda: in_spool() == 0, 2, "the decoded upload's spool file is held")  # closed after the answer
        assert "Traceback" not in server.log()
        for s in socks:
            s.close()
    finally:
        stop_server(server)


# ---- shutdown with a client stuck mid-body; X-Forwarded-For from a trusted proxy ----------------------------
@needs_proc
def test_a_client_stuck_mid_body_does_not_hold_the_shutdown(espeak_dir, tmp_path):
    env = {"TMPDIR": str(tmp_path), "CANARY_TRUSTED_PROXIES": '["127.0.0.1"]'}  # default deadlines: 20 s for a body
    server = start_server(espeak_dir, env=env)
    try:
        httpx.get(f"{server.url}/health", headers={"X-Forwarded-For": "203.0.113.9"})
        _wait_until(lambda: "/health" in server.lines[-1], 5, server.log())
        assert "203.0.113.9" in server.lines[-1]  # believed from a trusted proxy
        host, port = _address(server)
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(_multipart_head(host, port, 5 * MIB) + b"\0" * (2 * MIB))
            spooling = lambda: any(t.startswith(str(tmp_path)) for t in _descriptors(server))  # noqa: E731
            _wait_until(spooling, 10, "the upload never reached its spool file")  # the app is reading the body
            sent = server.signal(signal.SIGTERM)
            status, exited = server.wait_exit(timeout=15)
    finally:
        stop_server(server)
    assert status == -signal.SIGTERM
    assert exited - sent < 3.0, exited - sent  # not the 10 s of uvicorn's graceful timeout
    assert "Traceback" not in server.log(), server.log()


# ---- foreign origins, against the real server -----------------------------------------------------------------
@needs_proc
def test_the_server_refuses_uploads_from_pages_of_other_origins(espeak_dir, espeak_nemo_transcripts):
    """A browser page elsewhere POSTs audio to the server on localhost: 403 `invalid_origin`; the origin listed in
    allowed_origins and the server's own pages (/docs) are let in, and clients that are not browsers (no Origin)."""
    from conftest import ESPEAK_CLIPS

    server = start_server(espeak_dir, env={"CANARY_ALLOWED_ORIGINS": '["https://app.example"]'})
    try:
        clip = (ESPEAK_CLIPS / "clip00.wav").read_bytes()
        expected = espeak_nemo_transcripts["clip00.wav"].strip()

        def post(origin: str | None) -> httpx.Response:
            headers = {"Origin": origin} if origin is not None else {}
            form = {"model": "whisper-1", "language": "en", "response_format": "text"}
            files = {"file": ("a.wav", clip)}
            return httpx.post(f"{server.url}/v1/audio/transcriptions", headers=headers, data=form, files=files)

        for origin in ["https://evil.example", "null", "http://localhost:1"]:
            r = post(origin)
            assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_origin", (origin, r.text)
        for origin in ["https://app.example", server.url, None]:
            r = post(origin)
            assert r.status_code == 200 and r.text.strip() == expected, (origin, r.text)
        assert post("https://app.example").headers["access-control-allow-origin"] == "https://app.example"
        assert "Traceback" not in server.log()
    finally:
        stop_server(server)


# ---- in process: the Origin rule -----------------------------------------------------------------------------
def test_browser_pages_of_other_origins_are_refused_unless_allowed():
    from canary_server.server.app import create_app
    from canary_server.server.settings import Settings
    from server_fakes import fake_engine, running_server, tone, wait_ready, wav_bytes

    wav = wav_bytes(tone(1.0))

    def post(url: str, origin: str | None) -> httpx.Response:
        headers = {"Origin": origin} if origin is not None else {}
        data = {"model": "whisper-1"}
        return httpx.post(f"{url}/v1/audio/transcriptions", headers=headers, data=data, files={"file": wav})

    plain = create_app(Settings(model="/models/fake-canary"), engine=fake_engine())
    listed = create_app(
        Settings(model="/models/fake-canary", allowed_origins=["https://app.example"]), engine=fake_engine()
    )
    with running_server(plain) as url, running_server(listed) as url2:
        wait_ready(url)
        wait_ready(url2)
        for origin in ["https://evil.example", "null", "http://localhost.evil.example", "https://app.example"]:
            r = post(url, origin)  # a page on another site POSTs a form: no CORS preflight protects this
            assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_origin", (origin, r.text)
        assert httpx.get(f"{url}/health", headers={"Origin": "https://evil.example"}).status_code == 403
        assert post(url, url).status_code == 200  # the server's own pages (/docs)
        assert post(url, None).status_code == 200  # not a browser

        r = post(url2, "https://app.example")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        preflight["Access-Control-Request-Headers"] = "authorization"
        assert httpx.options(f"{url2}/v1/audio/transcriptions", headers=preflight).status_code == 200
        assert post(url2, "https://evil.example").status_code == 403


def test_a_websocket_handshake_from_a_foreign_origin_is_refused():
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from canary_server.server.security import OriginCheckMiddleware

    async def hello(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    app = OriginCheckMiddleware(Starlette(routes=[WebSocketRoute("/ws", hello)]), allowed=["https://app.example"])
    client = TestClient(app, base_url="http://testserver")
    for origin in ["http://testserver", "https://app.example", None]:
        headers = {"Origin": origin} if origin else {}
        with client.websocket_connect("/ws", headers=headers) as ws:
            assert ws.receive_text() == "hello"
    for origin in ["https://evil.example", "null"]:
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws", headers={"Origin": origin}):
            pass
        assert refused.value.code == 1008


# ---- in process: /health after a failed reload names no local path, spaces or not ----------------------------
def test_health_after_a_failed_reload_names_no_local_path_with_spaces(espeak_dir, tmp_path):
    import shutil

    from canary_server.pipeline.engine import EngineState
    from canary_server.server.app import create_app
    from canary_server.server.settings import Settings
    from conftest import ESPEAK_CLIPS
    from server_fakes import running_server, wait_ready

    model = tmp_path / "secret dir" / "my model"
    shutil.copytree(espeak_dir, model)
    app = create_app(Settings(model=str(model), idle_unload_seconds=0.2))
    clip = {"file": (ESPEAK_CLIPS / "clip00.wav").read_bytes()}
    with running_server(app) as url:
        wait_ready(url)
        _wait_until(lambda: app.state.engine.state is EngineState.UNLOADED, 30, "never unloaded")
        model.rename(tmp_path / "secret dir" / "gone")  # the reload fails
        r = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=clip)
        body = httpx.get(f"{url}/health").json()
    assert r.status_code == 503 and body["error"], (r.text, body)
    for text in (r.text, body["error"]):
        assert "secret dir" not in text and str(tmp_path) not in text and "secret" not in text, text
    assert "my model" in body["error"]  # what failed, by its name


@needs_proc
def test_a_real_server_after_a_failed_reload_names_no_local_path_with_spaces(espeak_dir, tmp_path):
    """The same through `canary-server serve` (the model path from its --model flag, spaces and all)."""
    import shutil

    from conftest import ESPEAK_CLIPS

    model = tmp_path / "secret dir" / "my model"
    shutil.copytree(espeak_dir, model)
    server = start_server(model, env={"CANARY_IDLE_UNLOAD_SECONDS": "0.2"})
    try:
        health = lambda: httpx.get(f"{server.url}/health").json()  # noqa: E731
        _wait_until(lambda: health()["status"] == "unloaded", 30, "never unloaded")
        model.rename(tmp_path / "secret dir" / "gone")  # the reload fails
        clip = {"file": (ESPEAK_CLIPS / "clip00.wav").read_bytes()}
        r = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=clip, timeout=60)
        body = health()
    finally:
        stop_server(server)
    assert r.status_code == 503 and body["error"], (r.text, body)
    for text in (r.text, body["error"]):
        assert "secret dir" not in text and str(tmp_path) not in text and "secret" not in text, text
    assert "my model" in body["error"]


def test_the_connection_cap_stays_below_the_descriptor_limit():
    from canary_server.server.connections import connection_cap

    assert connection_cap(512, 1024) == 352  # a hard limit of 1024: two descriptors each, an accept burst, a reserve
    assert connection_cap(512, 65536) == 512
    assert connection_cap(512, 100) == 1


def test_past_the_cap_a_connection_kept_alive_between_requests_is_evicted_last():
    """The soak found it: a burst near the cap evicted the httpx pool's kept-alive connections while their client
    was sending the next request on them (6 POSTs lost in 2236, reset). Connections still waiting for their first
    request go first, oldest first; a kept-alive one only when no other waits."""
    import asyncio

    from canary_server.server.connections import _Registry

    class Conn:
        def __init__(self, served: bool) -> None:
            self.served, self.closed = served, False

        def close_now(self) -> None:
            self.closed = True
            registry.forget(self)

    async def main() -> None:
        kept, first, second = Conn(True), Conn(False), Conn(False)
        for conn in (kept, first, second):
            assert registry.admit(conn)
            registry.waiting[conn] = None
        for _ in range(2):
            assert registry.admit(Conn(False))  # new connections, not waiting yet (their request came at once)
        assert (first.closed, second.closed, kept.closed) == (True, True, False)
        assert registry.admit(Conn(False)) and kept.closed  # the only one waiting
        assert not registry.admit(Conn(False))  # nothing waits: refused (503)

    registry = _Registry(cap=3)
    asyncio.run(main())
