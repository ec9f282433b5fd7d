"""Two real `canary-server serve` processes (espeak-trained test model, not a real Canary) behind HAProxy with the
repository's bench/router/haproxy.cfg, all on loopback: 50 concurrent requests, plain and streamed, are answered
exactly as one server answers them, and the instances' /metrics add up to what was sent; then one instance is
killed (SIGKILL) in the middle of another 50: every plain request is still answered exactly once (the router
retries on the other instance what failed before a response began), and a stream can only be cut short if its
instance died after the stream had begun (the router cannot replay half an answer; the client sees no `done`)."""

from __future__ import annotations

import json
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from conftest import ESPEAK_CLIPS
from router_process import haproxy_binary, missing_haproxy_reason, start_router, stop_router
from server_process import start_server, stop_server

pytestmark = pytest.mark.slow
ROUTE = "/v1/audio/transcriptions"
N = 50


@dataclass
class Answer:
    status: int
    instance: str
    request_id: str
    text: str | None  # the transcript (streams: the done event's), None for a stream cut short
    body: dict | None = None  # plain requests' JSON body
    deltas: str = ""  # streams: the deltas joined


@pytest.fixture(scope="module")
def haproxy() -> str:
    binary = haproxy_binary()
    if binary is None:
        if __import__("sys").platform == "darwin":
            pytest.skip(missing_haproxy_reason())
        pytest.fail(missing_haproxy_reason())  # Linux: the project's set-up installs it
    return binary


@pytest.fixture(scope="module")
def clips() -> list[tuple[bytes, float]]:
    paths = sorted(ESPEAK_CLIPS.glob("*.wav"))
    return [(p.read_bytes(), sf.info(str(p)).duration) for p in paths]


def ask(client: httpx.Client, clip: bytes, stream: bool, request_id: str) -> Answer:
    form = {"model": "whisper-1", "stream": "true" if stream else "false"}
    headers = {"X-Request-ID": request_id}
    with client.stream("POST", ROUTE, files={"file": ("clip.wav", clip, "audio/wav")}, data=form,
                       headers=headers) as r:  # fmt: skip
        instance, rid = r.headers.get("X-Canary-Instance", ""), r.headers.get("X-Request-ID", "")
        try:
            raw = r.read().decode()
        except httpx.RemoteProtocolError:  # the instance died mid-stream
            return Answer(r.status_code, instance, rid, None)
    if not stream or r.status_code != 200:
        body = json.loads(raw)
        return Answer(r.status_code, instance, rid, body.get("text"), body=body)
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    deltas = "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta")
    done = [e["text"] for e in events if e["type"] == "transcript.text.done"]
    return Answer(r.status_code, instance, rid, done[0] if done else None, deltas=deltas)


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def answered(url: str) -> float:
    return metric(url, "canary_http_requests_total", route=ROUTE, status="200", model="whisper-1")


def retried(log: str) -> int:
    """Requests HAProxy's log shows retried (the retries field of `actconn/feconn/beconn/srv_conn/retries`)."""
    return sum(int(m) for m in re.findall(r" \d+/\d+/\d+/\d+/\+?(\d+) ", log))


def check_exact(answer: Answer, reference: dict, stream: bool, request_id: str) -> None:
    assert answer.status == 200 and answer.request_id == request_id, answer
    if stream:
        assert answer.text == reference["text"] and answer.deltas == reference["text"], answer
    else:
        assert answer.body == reference, answer


def send_all(router_url: str, clips, phase: str, when_some_done=None) -> list[Answer]:
    """N concurrent requests (odd ones streamed) through the router; `when_some_done` runs once 10 are answered."""
    done = threading.Semaphore(0)

    def one(i: int) -> Answer:
        with httpx.Client(base_url=router_url, timeout=300) as client:
            try:
                return ask(client, clips[i % len(clips)][0], i % 2 == 1, f"{phase}-{i}")
            finally:
                done.release()

    with ThreadPoolExecutor(N) as pool:
        futures = [pool.submit(one, i) for i in range(N)]
        if when_some_done is not None:
            for _ in range(10):
                done.acquire(timeout=300)
            when_some_done()
        return [f.result() for f in futures]


def test_two_instances_behind_haproxy_answer_like_one_and_survive_losing_one(haproxy, espeak_dir: Path, clips):
    env = {"CANARY_CHUNK_SECONDS": "8"}
    a, b = start_server(espeak_dir, env=env), start_server(espeak_dir, env=env)
    router = None
    try:
        with httpx.Client(base_url=a.url, timeout=120) as direct:  # one server's answers, one at a time
            references = [ask(direct, clip, False, f"ref-{i}").body for i, (clip, _) in enumerate(clips)]
        router = start_router(a.url, b.url)
        no_id = httpx.get(f"{router.url}/health").headers["X-Request-ID"]
        assert len(no_id) == 36 and no_id.count("-") == 4  # the router's uuid (an instance's own: 32 hex digits)
        sent_before = answered(a.url) + answered(b.url)

        answers = send_all(router.url, clips, "both")
        for i, answer in enumerate(answers):
            check_exact(answer, references[i % len(clips)], i % 2 == 1, f"both-{i}")
        by_instance = {name: sum(x.instance == name for x in answers) for name in "ab"}
        assert by_instance["a"] > 0 and by_instance["b"] > 0, by_instance  # both took work
        assert answered(a.url) + answered(b.url) - sent_before == N
        seconds = sum(clips[i % len(clips)][1] for i in range(N)) + sum(d for _, d in clips)  # + the references
        audio = metric(a.url, "canary_audio_seconds_total") + metric(b.url, "canary_audio_seconds_total")
        assert audio == pytest.approx(seconds, abs=0.01)

        a_before = answered(a.url)
        answers = send_all(router.url, clips, "kill", when_some_done=lambda: b.signal(signal.SIGKILL))
        cut_short = [x for x in answers if x.text is None]
        for i, answer in enumerate(answers):
            if answer.text is None:  # only a stream whose instance died after its answer had begun
                assert i % 2 == 1 and answer.instance == "b" and answer.status == 200, answer
                continue
            check_exact(answer, references[i % len(clips)], i % 2 == 1, f"kill-{i}")
        assert len(cut_short) < N // 2
        # The kill hit requests in flight on b: retried on a (plain ones, and streams not yet begun) or cut short.
        assert retried(router.log()) + len(cut_short) > 0, router.log()
        # Exactly once: every answer from the survivor is one request it decoded, and it decoded no other.
        assert answered(a.url) - a_before == sum(x.instance == "a" for x in answers)
        assert not b.alive()
    finally:
        if router is not None:
            stop_router(router)
        stop_server(a)
        stop_server(b)


def test_with_no_instance_up_the_router_answers_503_in_openais_shape_with_retry_after(haproxy):
    from router_process import free_port

    closed = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens there
    router = start_router(*closed, wait_for_both=False)
    try:
        r = httpx.post(f"{router.url}{ROUTE}", files={"file": ("a.wav", b"RIFF")}, data={"model": "whisper-1"})
    finally:
        stop_router(router)
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "no_instance_available"
