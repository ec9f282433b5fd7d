"""Monitoring on one app (fake engine, in process): /metrics counts what was sent, /health/ready tells a router
ready from busy or loading, every response carries X-Request-ID, and log lines about a request carry its id.
(Two real servers behind a router: test_router.py.)"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient

from canary_server.pipeline.engine import Engine
from canary_server.pipeline.jobs import Job
from canary_server.server.app import create_app
from canary_server.server.request_log import JsonFormatter, install_request_logging, request_id
from canary_server.server.settings import Settings
from server_fakes import FakeCanary, fake_batcher, running_server, tone, wait_ready, wav_bytes

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def post(url: str, seconds: float = 1.0, headers: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    files = {"file": ("a.wav", wav_bytes(tone(seconds)), "audio/wav")}
    data = {"model": "whisper-1", **fields}
    return httpx.post(f"{url}/v1/audio/transcriptions", files=files, data=data, headers={**AUTH, **(headers or {})})


@pytest.fixture
def served():
    fake = FakeCanary()
    engine = Engine(lambda: fake, batcher=fake_batcher, max_queue=2)
    with running_server(create_app(Settings(model="/models/fake-canary", api_key=KEY), engine=engine)) as url:
        wait_ready(url)
        yield url, fake


def test_metrics_count_requests_audio_tokens_and_times_of_what_was_sent(served):
    url, _ = served
    for seconds in (1.0, 2.0):
        assert post(url, seconds).status_code == 200
    assert post(url, stream="true").status_code == 200
    assert httpx.post(f"{url}/v1/audio/transcriptions", headers=AUTH, data={"model": "nope"}).status_code == 400
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    route = "/v1/audio/transcriptions"
    assert sample(text, "canary_http_requests_total", route=route, status="200", model="whisper-1") == 3
    assert sample(text, "canary_http_requests_total", route=route, status="400", model="") == 1
    assert sample(text, "canary_engine_requests_total", outcome="completed") == 3
    assert sample(text, "canary_audio_seconds_total") == pytest.approx(4.0)
    assert sample(text, "canary_tokens_total") == 9  # the fake model's 3 tokens per piece
    assert sample(text, "canary_queue_wait_seconds_count") == 3
    assert sample(text, "canary_decode_seconds_count") == 3
    assert sample(text, "canary_http_request_duration_seconds_count", route=route) == 4
    assert sample(text, "canary_engine_state", state="ready") == 1
    assert sample(text, "canary_queue_requests") == 0 and sample(text, "canary_sessions", kind="wyoming") == 0
    assert "canary_mlx_peak_memory_bytes" in text and "canary_decoder_active_rows" in text


class SlowCanary(FakeCanary):
    """Its work takes 0.5 s, as a real model's first encoder stage takes time after a piece leaves the queue."""

    def transcribe(self, audio, **kwargs):
        time.sleep(0.5)  # the work itself, not a wait for anything
        return super().transcribe(audio, **kwargs)


def test_queue_wait_ends_when_the_work_starts_not_after_its_first_step():
    fake = SlowCanary()
    engine = Engine(lambda: fake, batcher=fake_batcher)
    with running_server(create_app(Settings(model="/models/fake-canary", api_key=KEY), engine=engine)) as url:
        wait_ready(url)
        assert post(url).status_code == 200
        text = httpx.get(f"{url}/metrics", headers=AUTH).text
    # An idle engine starts the request at once: the 0.5 s of its first step is decoding, not waiting
    assert sample(text, "canary_queue_wait_seconds_sum") < 0.4
    assert sample(text, "canary_decode_seconds_sum") >= 0.5


def test_metrics_are_behind_the_api_key_and_unknown_paths_do_not_grow_the_labels(served):
    url, _ = served
    assert httpx.get(f"{url}/metrics").status_code == 401
    for i in range(3):
        httpx.get(f"{url}/no/such/path/{i}")
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert sample(text, "canary_http_requests_total", route="other", status="404") == 3
    assert sample(text, "canary_http_requests_total", route="/metrics", status="401") == 1


def test_metrics_loopback_only_refuses_other_clients():
    settings = Settings(model="/models/fake-canary", metrics_loopback_only=True)
    app = create_app(settings, engine=Engine(FakeCanary, batcher=fake_batcher))  # not started: /metrics still reads
    # (the TCP peer decides, so the router-less test client stands in for a remote client)
    r = TestClient(app, base_url="http://10.0.0.1", client=("10.0.0.7", 5000)).get("/metrics")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = TestClient(app, base_url="http://localhost", client=("127.0.0.1", 5000)).get("/metrics")
    assert r.status_code == 200 and "canary_engine_state" in r.text


def test_two_apps_in_one_process_count_separately():
    apps = [create_app(Settings(model="/m"), engine=Engine(FakeCanary, batcher=fake_batcher)) for _ in range(2)]
    TestClient(apps[0], base_url="http://localhost").get("/health")  # no `with`: the engines stay unstarted
    texts = [TestClient(app, base_url="http://localhost").get("/metrics").text for app in apps]
    assert [sample(t, "canary_http_requests_total", route="/health") for t in texts] == [1, 0]


def test_ready_says_busy_with_503_and_retry_after_while_the_queue_is_full(served):
    url, fake = served
    fake.gate = threading.Event()  # hold the engine's steps: requests stay queued
    try:
        calls = [threading.Thread(target=post, args=(url,)) for _ in range(2)]
        for call in calls:
            call.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["requests"] < 2:
            assert time.monotonic() < deadline
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert ready.json() == {"status": "busy", "requests": 2, "queued_audio_seconds": 2.0}
        refused = post(url)
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert httpx.get(f"{url}/health").json()["busy"] is True
    finally:
        fake.gate.set()
    for call in calls:
        call.join(30)
    ready = httpx.get(f"{url}/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_ready_is_503_with_retry_after_while_the_model_loads():
    gate = threading.Event()
    engine = Engine(lambda: gate.wait(30) and FakeCanary(), batcher=fake_batcher)
    with running_server(create_app(Settings(model="/m"), engine=engine)) as url:
        try:
            for path in ("/health/ready", "/health"):
                r = httpx.get(f"{url}{path}")
                assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["status"] == "loading"
        finally:
            gate.set()


def test_every_response_carries_a_request_id_the_clients_when_usable(served):
    url, _ = served
    given = "client-42.abc"
    assert post(url, headers={"X-Request-ID": given}).headers["X-Request-ID"] == given
    streamed = post(url, stream="true", headers={"X-Request-ID": given})
    assert "transcript.text.done" in streamed.text and streamed.headers["X-Request-ID"] == given
    for hostile in ("x" * 500, "a b", "id\x01", "<script>", "100%"):
        got = httpx.get(f"{url}/health", headers={"X-Request-ID": hostile}).headers["X-Request-ID"]
        assert got != hostile and len(got) == 32
    unauthorised = httpx.post(f"{url}/v1/audio/transcriptions")
    assert unauthorised.status_code == 401 and len(unauthorised.headers["X-Request-ID"]) == 32
    ids = {httpx.get(f"{url}/health").headers["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_lines_about_a_request_carry_its_id(log_format):
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_request_logging(log_format)
        log = logging.getLogger("canary.test")
        log.warning("outside any request")
        token = request_id.set("req-7")
        try:
            log.warning("about %s", "it")
            job = Job([], None, None, None)  # what the engine keeps of a request (made in the request's task)
        finally:
            request_id.reset(token)
        log.warning("on the engine thread", extra={"request_id": job.request_id})
    finally:
        root.removeHandler(handler)
    if log_format == "json":
        assert isinstance(handler.formatter, JsonFormatter)
        lines = [json.loads(r) for r in records]
        assert "request_id" not in lines[0] and lines[1]["request_id"] == "req-7"
        assert lines[1]["message"] == "about it" and lines[1]["level"] == "warning" and lines[1]["time"].endswith("Z")
        assert lines[2]["request_id"] == "req-7"
    else:
        assert records == [
            "WARNING outside any request",
            "WARNING about it [request req-7]",
            "WARNING on the engine thread [request req-7]",
        ]


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_served_requests_log_lines_carry_its_id(espeak_dir, log_format):
    from conftest import ESPEAK_CLIPS
    from server_process import start_server, stop_server

    server = start_server(espeak_dir, env={"CANARY_LOG_FORMAT": log_format})
    try:
        clip = (ESPEAK_CLIPS / "clip00.wav").read_bytes()
        r = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.wav", clip)},
                       data={"model": "nope"}, headers={"X-Request-ID": "trace-77"})  # fmt: skip
        assert r.status_code == 400 and r.headers["X-Request-ID"] == "trace-77"
    finally:
        stop_server(server)  # its stderr is complete once it has exited
    lines = [line for line in server.lines if "trace-77" in line]
    assert any("POST /v1/audio/transcriptions" in line for line in lines), server.log()  # uvicorn's access line
    if log_format == "json":
        entries = [json.loads(line) for line in server.lines if line.startswith("{")]
        access = [e for e in entries if e["logger"] == "uvicorn.access"]
        assert access and access[-1]["request_id"] == "trace-77" and "400" in access[-1]["message"]
    else:
        assert all(line.rstrip().endswith("[request trace-77]") for line in lines), lines
