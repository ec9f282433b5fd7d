"""The HTTP API against a fake in-process model (fast): formats, errors, limits, auth, loading states.

The real-model end-to-end tests are in test_server_e2e.py."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from canary_server.pipeline.engine import Engine
from canary_server.server.app import create_app
from canary_server.server.settings import Settings
from server_fakes import SR, FakeCanary, fake_batcher, running_server, tone, wait_ready, wav_bytes

KEY = "test-key"


@pytest.fixture(scope="module")
def fake():
    return FakeCanary()


@pytest.fixture(scope="module")
def base_url(fake):
    settings = Settings(
        model="/models/fake-canary", api_key=KEY, max_upload_mb=0.5, chunk_seconds=4, max_audio_seconds=30
    )
    app = create_app(settings, engine=Engine(lambda: fake, batcher=fake_batcher, batch_size=4))
    with running_server(app) as url:
        wait_ready(url)
        yield url


@pytest.fixture
def client(base_url):
    with OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def clip(seconds: float = 1.5) -> tuple[str, bytes, str]:
    return ("clip.wav", wav_bytes(tone(seconds)), "audio/wav")


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_json_transcription_returns_the_models_text(client):
    res = client.audio.transcriptions.create(model="whisper-1", file=clip())
    assert res.text == "hello world 1.50"


def test_every_served_model_name_is_accepted_and_unknown_names_are_400(client):
    for name in ("fake-canary", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"):
        assert client.audio.transcriptions.create(model=name, file=clip()).text == "hello world 1.50"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="no-such-model", file=clip())
    assert error_of(e.value)["param"] == "model"


def test_text_srt_and_vtt_formats_carry_cue_times(client):
    text = client.audio.transcriptions.create(model="whisper-1", file=clip(), response_format="text")
    assert text == "hello world 1.50\n"
    srt = client.audio.transcriptions.create(model="whisper-1", file=clip(), response_format="srt")
    assert srt == "1\n00:00:00,000 --> 00:00:01,500\nhello world 1.50\n"
    vtt = client.audio.transcriptions.create(model="whisper-1", file=clip(), response_format="vtt")
    assert vtt == "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello world 1.50\n"


def test_verbose_json_segments_are_the_chunks_with_every_sdk_field(client):
    audio = wav_bytes(tone(10.0))  # chunk_seconds=4 -> three chunks of a steady tone
    res = client.audio.transcriptions.create(
        model="whisper-1", file=("long.wav", audio, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["segment"],
    )  # fmt: skip
    assert res.language == "english" and res.duration == pytest.approx(10.0)
    assert len(res.segments) == 3 and res.segments[0].start == 0 and res.segments[-1].end == pytest.approx(10.0)
    for a, b in zip(res.segments, res.segments[1:], strict=False):
        assert a.end == b.start and a.end - a.start <= 4.0
    required = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                "compression_ratio", "no_speech_prob"}  # fmt: skip
    raw = res.model_dump()
    assert all(required <= set(s) for s in raw["segments"])
    assert res.text == " ".join(s.text for s in res.segments)
    assert res.words is None


def test_word_timestamps_are_refused_rather_than_invented(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(
            model="whisper-1", file=clip(), response_format="verbose_json", timestamp_granularities=["word"]
        )
    assert "word" in error_of(e.value)["message"]


def test_prompt_becomes_context_and_pnc_and_target_language_reach_the_model(client, fake):
    res = client.audio.transcriptions.create(
        model="whisper-1", file=clip(), language="en", prompt="ctx",
        extra_body={"target_language": "de", "pnc": "false"},
    )  # fmt: skip
    assert res.text == "hallo welt 1.50 nopnc ctx"
    assert fake.calls[-1] | {"n": 1} == {"n": 1, "source": "en", "target": "de", "pnc": False, "context": "ctx"}


def test_translation_goes_to_english_from_the_given_language(client, fake):
    res = client.audio.translations.create(model="whisper-1", file=clip(), extra_body={"language": "fr"})
    assert res.text == "hello world 1.50"
    assert (fake.calls[-1]["source"], fake.calls[-1]["target"]) == ("fr", "en")
    verbose = client.audio.translations.create(model="whisper-1", file=clip(), response_format="verbose_json")
    assert verbose.language == "english" and verbose.segments[0].end == pytest.approx(1.5)


def test_streaming_gives_deltas_that_add_up_to_the_done_text(client):
    audio = ("long.wav", wav_bytes(tone(6.0)), "audio/wav")
    events = list(client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) == 2 and events[-1].type == "transcript.text.done"
    assert "".join(deltas) == events[-1].text == "hello world 4.00 hello world 2.00"


def test_unsupported_language_is_400_listing_the_supported_ones(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=clip(), language="xx")
    err = error_of(e.value)
    assert err["param"] == "language" and "en, de, es, fr" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=clip(), extra_body={"target_language": "zz"})
    assert error_of(e.value)["param"] == "target_language"


def test_undecodable_and_empty_audio_are_400(client):
    for data in (b"this is not audio at all" * 100, b""):
        with pytest.raises(openai.BadRequestError) as e:
            client.audio.transcriptions.create(model="whisper-1", file=("x.mp3", data, "audio/mpeg"))
        assert error_of(e.value)["param"] == "file"


def test_audio_longer_than_the_limit_is_400_not_truncated(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("l.wav", wav_bytes(tone(31.0, sr=8000), 8000)))
    assert "at most 30 s" in error_of(e.value)["message"]


def test_bad_fields_are_400_in_openai_shape(client):
    bad = [{"response_format": "diarized_json"}, {"temperature": 2.0}, {"extra_body": {"pnc": "maybe"}},
           {"response_format": "srt", "stream": True}]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.audio.transcriptions.create(model="whisper-1", file=clip(), **kwargs)
        assert error_of(e.value)["type"] == "invalid_request_error"


def test_missing_file_is_400_naming_the_field(base_url):
    r = httpx.post(f"{base_url}/v1/audio/transcriptions", data={"model": "whisper-1"}, headers=_auth())
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_unknown_path_is_404_in_openai_shape(base_url):
    r = httpx.get(f"{base_url}/v1/nothing", headers=_auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_missing_or_wrong_api_key_is_401(base_url):
    for key in ("wrong", None):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        r = httpx.get(f"{base_url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with (
        OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.audio.transcriptions.create(model="whisper-1", file=clip())


def test_upload_over_the_limit_is_413(client):
    big = ("big.wav", wav_bytes(tone(20.0)), "audio/wav")  # 640 kB > 0.5 MiB
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=big)
    assert e.value.status_code == 413 and "upload limit" in error_of(e.value)["message"]


def test_chunked_upload_without_length_is_cut_off_at_the_limit(base_url, client):
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(64):
            yield b"x" * 65536  # 4 MiB in all, no Content-Length

    r = httpx.post(
        f"{base_url}/v1/audio/transcriptions", content=body(),
        headers={**_auth(), "Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body exceeds")
    assert client.audio.transcriptions.create(model="whisper-1", file=clip()).text  # still serving


def test_a_failing_request_is_500_and_the_server_keeps_serving(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=clip(), prompt="explode")
    assert e.value.status_code == 500 and error_of(e.value)["type"] == "server_error"
    assert client.audio.transcriptions.create(model="whisper-1", file=clip()).text == "hello world 1.50"


def test_models_list_has_the_loaded_model_and_aliases(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "fake-canary" and "whisper-1" in ids and "gpt-4o-transcribe" in ids
    assert client.models.retrieve("whisper-1").id == "whisper-1"


def test_health_is_open_and_ok_when_ready(base_url):
    r = httpx.get(f"{base_url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_async_client_gets_concurrent_answers_each_its_own(base_url):
    lengths = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0]  # >= 1 s: a shorter file reaches the model padded to 1 s, as in NeMo

    async def main():
        async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0) as c:
            calls = (c.audio.transcriptions.create(model="whisper-1", file=clip(s)) for s in lengths)
            return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert [r.text for r in results] == [f"hello world {s:.2f}" for s in lengths]


def test_health_and_requests_are_503_while_loading_then_ready():
    gate = threading.Event()

    def slow_loader():
        gate.wait(60)
        return FakeCanary()

    app = create_app(Settings(model="slow-model"), engine=Engine(slow_loader, batcher=fake_batcher))
    with running_server(app) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as e:
                c.audio.transcriptions.create(model="whisper-1", file=clip())
            assert e.value.status_code == 503 and "loading" in error_of(e.value)["message"]
            gate.set()
            wait_ready(url)
            assert c.audio.transcriptions.create(model="whisper-1", file=clip()).text == "hello world 1.50"


def test_a_model_that_fails_to_load_reports_why_with_503():
    def broken_loader():
        raise FileNotFoundError("no such model directory")

    app = create_app(Settings(model="broken"), engine=Engine(broken_loader, batcher=fake_batcher))
    with running_server(app) as url:
        deadline_polls = 0
        while (r := httpx.get(f"{url}/health")).json()["status"] == "loading" and deadline_polls < 10_000:
            deadline_polls += 1
        assert r.status_code == 503 and "no such model directory" in r.json()["error"]
        r = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": clip()})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_sse_lines_are_plain_json_events(base_url):
    r = httpx.post(
        f"{base_url}/v1/audio/transcriptions", headers=_auth(),
        data={"model": "whisper-1", "stream": "true"}, files={"file": clip()},
    )  # fmt: skip
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert [e["type"] for e in events] == ["transcript.text.delta", "transcript.text.done"]
    assert SR == 16000
