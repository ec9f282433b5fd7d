"""Language detection over HTTP with the real `openai` SDK, against the fake model (server_fakes: it "hears" a
language in a tone's pitch, and nothing in near-silence). The real model's detection: test_language_id.py."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from canary_server.pipeline.engine import Engine
from canary_server.server.app import create_app
from canary_server.server.settings import Settings
from server_fakes import PITCH, FakeCanary, fake_batcher, running_server, tone, wait_ready, wav_bytes


def _server(**settings):
    fake = FakeCanary()
    app = create_app(
        Settings(model="/models/fake-canary", chunk_seconds=4, **settings),
        engine=Engine(lambda: fake, batcher=fake_batcher, batch_size=4),
    )
    return running_server(app)


@pytest.fixture(scope="module")
def base_url():
    with _server() as url:
        wait_ready(url)
        yield url


@pytest.fixture
def client(base_url):
    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def spoken(lang: str, seconds: float = 1.5, amplitude: float = 1.0) -> tuple[str, bytes, str]:
    return ("clip.wav", wav_bytes(amplitude * tone(seconds, freq=PITCH[lang])), "audio/wav")


def test_language_auto_decodes_in_the_detected_language_and_reports_it(client):
    res = client.audio.transcriptions.create(model="whisper-1", file=spoken("de"), language="auto")
    assert res.text == "hallo welt 1.50" and [lang.code for lang in res.languages] == ["de"]
    verbose = client.audio.transcriptions.create(
        model="whisper-1", file=spoken("fr"), language="auto", response_format="verbose_json"
    )
    assert verbose.language == "french" and verbose.task == "transcribe" and verbose.text == "bonjour le monde 1.50"


def test_a_named_language_is_used_as_is_and_reports_no_detection(client):
    res = client.audio.transcriptions.create(model="whisper-1", file=spoken("de"), language="es")
    assert res.text == "hola mundo 1.50" and res.languages is None


def test_an_unsure_detection_decodes_the_most_likely_language_never_an_assumed_one(client):
    res = client.audio.transcriptions.create(model="whisper-1", file=spoken("de", amplitude=0.01), language="auto")
    assert res.text == "hello world 1.50" and [lang.code for lang in res.languages] == ["en"]  # en: the likeliest


def test_with_a_fixed_default_an_unsure_detection_decodes_it_and_says_so_with_an_empty_list():
    with _server(default_language="es") as url:
        wait_ready(url)
        with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            quiet = spoken("de", amplitude=0.01)
            res = client.audio.transcriptions.create(model="whisper-1", file=quiet, language="auto")
            assert res.text == "hola mundo 1.50" and res.languages == []


def test_a_request_without_a_language_is_detected_never_translated(client):
    for lang, text in [("de", "hallo welt 1.50"), ("fr", "bonjour le monde 1.50")]:
        res = client.audio.transcriptions.create(model="whisper-1", file=spoken(lang))
        assert res.text == text and [x.code for x in res.languages] == [lang]
        verbose = client.audio.transcriptions.create(
            model="whisper-1", file=spoken(lang), response_format="verbose_json"
        )
        assert (verbose.text, verbose.task) == (text, "transcribe")


def test_a_fixed_default_language_decodes_requests_without_one_in_it_without_detection():
    with _server(default_language="es") as url:
        wait_ready(url)
        body = httpx.post(
            f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": spoken("de")}
        ).json()
        assert body == {"text": "hola mundo 1.50", "usage": body["usage"]}  # no `languages`: nothing detected


def test_the_stream_done_event_carries_the_detected_language(client):
    events = list(
        client.audio.transcriptions.create(model="whisper-1", file=spoken("es"), language="auto", stream=True)
    )
    assert events[-1].type == "transcript.text.done" and events[-1].text == "hola mundo 1.50"
    assert [lang.code for lang in events[-1].languages] == ["es"]


def test_languages_narrows_detection_and_alone_implies_it(client):
    res = client.audio.transcriptions.create(model="whisper-1", file=spoken("de"), languages=["fr", "es"])
    assert res.text.startswith(("bonjour", "hola")) and res.languages[0].code in ("fr", "es")
    single = client.audio.transcriptions.create(model="whisper-1", file=spoken("de"), languages=["fr"])
    assert single.text == "bonjour le monde 1.50" and single.languages is None  # nothing to choose between


def test_unsupported_languages_are_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=spoken("de"), languages=["de", "xx"])
    err = e.value.response.json()["error"]
    assert err["param"] == "languages[]" and err["code"] == "unsupported_language" and "'xx'" in err["message"]


def test_translation_with_language_auto_translates_the_detected_language_to_english(client):
    res = client.audio.translations.create(
        model="whisper-1", file=spoken("de"), response_format="verbose_json", extra_body={"language": "auto"}
    )
    assert (res.language, res.task, res.text) == ("english", "translate", "hello world 1.50")


def test_detect_language_detects_requests_without_a_language_within_the_allow_list():
    with _server(default_language="en", detect_language=True, detect_languages=["en", "fr"]) as url:
        wait_ready(url)
        files = {"file": spoken("fr")}
        body = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files).json()
        assert body["text"] == "bonjour le monde 1.50" and body["languages"] == [{"code": "fr"}]
        files = {"file": spoken("de")}  # not allowed: the nearest allowed pitch wins, or the default
        body = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files).json()
        assert set(body) >= {"text", "languages"} and body["text"].split()[0] in ("hello", "bonjour")
