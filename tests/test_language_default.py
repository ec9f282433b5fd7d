"""Never translate by accident: a request that names no language is detected on a multilingual model, at every
front door (HTTP json, verbose_json and SSE, Wyoming, the CLI, the Python API), on the espeak-trained en/de/es/fr
model (NOT a real Canary; its language slot was trained). Also: a fixed `default_language` restores the old
behaviour, a bad one stops the server at start, and a model trained with its prompt masked refuses detection."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from openai import OpenAI
from test_wyoming import clip_pcm, text_of, utterance

import canary_server
from canary_server.cli.serve import build_app
from canary_server.pipeline.errors import LanguageDetectionUnavailable
from canary_server.server.settings import Settings
from conftest import ESPEAK_MULTI_CLIPS
from server_fakes import running_server, wait_ready

GERMAN = "de_00.wav"


@pytest.fixture(scope="module")
def german() -> tuple[bytes, str]:
    """The German clip and NeMo's transcript of it (source_lang = target_lang = de)."""
    nemo = json.loads((ESPEAK_MULTI_CLIPS / "nemo_transcripts.json").read_text())
    return (ESPEAK_MULTI_CLIPS / GERMAN).read_bytes(), nemo[GERMAN].strip()


@pytest.fixture(scope="module")
def multi_server(espeak_multi_dir):
    """(HTTP base URL, Wyoming port) of `serve` on the multilingual model at the default settings."""
    app = build_app(Settings(model=str(espeak_multi_dir), wyoming_zeroconf=False), wyoming_port=0)
    with running_server(app) as url:
        wait_ready(url)
        yield url, app.state.wyoming.port


def _post(url: str, audio: bytes, **form) -> httpx.Response:
    files = {"file": ("clip.wav", audio, "audio/wav")}
    return httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1", **form}, files=files, timeout=120)


def test_http_json_without_a_language_comes_back_german_and_says_so(multi_server, german):
    audio, text = german
    body = _post(multi_server[0], audio).json()
    assert (body["text"], body["languages"]) == (text, [{"code": "de"}])


def test_http_verbose_json_without_a_language_names_german(multi_server, german):
    audio, text = german
    body = _post(multi_server[0], audio, response_format="verbose_json").json()
    assert (body["text"], body["language"], body["task"]) == (text, "german", "transcribe")


def test_the_sse_stream_without_a_language_streams_german(multi_server, german):
    audio, text = german
    with OpenAI(base_url=f"{multi_server[0]}/v1", api_key="unused", max_retries=0) as client:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), stream=True))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == text and deltas.strip() == text
    assert [lang.code for lang in done.languages] == ["de"]


@pytest.mark.parametrize("transcribe", [None, ""], ids=["no-transcribe-event", "transcribe-without-language"])
def test_wyoming_without_a_language_comes_back_german(multi_server, german, transcribe):
    _, text = german
    events = asyncio.run(utterance(multi_server[1], clip_pcm(ESPEAK_MULTI_CLIPS, GERMAN), language=transcribe))
    assert text_of(events) == (text, "de")


def test_the_command_line_without_language_comes_back_german(espeak_multi_dir, german, capsys):
    from canary_server.cli import main

    _, text = german
    clip = str(ESPEAK_MULTI_CLIPS / GERMAN)
    assert main(["transcribe", clip, "--model", str(espeak_multi_dir), "--format", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert (body["text"], body["languages"]) == (text, [{"code": "de"}])


def test_the_python_api_without_source_lang_comes_back_german(espeak_multi_dir, german):
    _, text = german
    with canary_server.load(espeak_multi_dir, dtype="float32") as m:
        r = m.transcribe(str(ESPEAK_MULTI_CLIPS / GERMAN))
        assert (r.text, r.source_language, r.language, r.task) == (text, "de", "de", "transcribe")
        assert r.detected_language is not None and r.detected_language.confident
        # a target language without a source one: the source is detected, the request translates on purpose
        options = m.pipeline.options(None, "en")
        assert options.detect is not None and options.detect.target == "en"


def test_a_fixed_default_language_decodes_without_detection(espeak_multi_dir):
    with canary_server.load(espeak_multi_dir, dtype="float32", default_language="de") as m:
        options = m.pipeline.options()
        assert (options.source_lang, options.target_lang, options.detect) == ("de", "de", None)
        assert m.pipeline.options("auto").detect is not None  # asking for detection still detects


def test_a_default_language_the_model_lacks_stops_the_server_at_start_with_one_line(espeak_multi_dir):
    env = {**os.environ, "CANARY_DEFAULT_LANGUAGE": "xx", "CANARY_WYOMING_PORT": "0", "CANARY_LOG_LEVEL": "error"}
    cmd = [sys.executable, "-m", "canary_server", "serve", "--model", str(espeak_multi_dir), "--port", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "setting default_language = 'xx' is not a language of this model (use one of: auto, en, de" in last


def test_a_default_language_the_model_lacks_fails_the_python_api_at_load(espeak_multi_dir):
    with pytest.raises(ValueError, match="setting default_language = 'xx' is not a language of this model"):
        canary_server.load(espeak_multi_dir, dtype="float32", default_language="xx")
    with pytest.raises(ValueError, match="setting detect_languages = 'xx' is not a language of this model"):
        canary_server.load(espeak_multi_dir, dtype="float32", detect_languages=("de", "xx"))


def test_the_default_language_setting_is_auto_or_a_code():
    assert Settings(model="x").default_language == "auto"
    assert Settings(model="x", default_language=" DE ").default_language == "de"
    with pytest.raises(ValueError, match="default_language"):
        Settings.load(None, model="x", default_language=" ")


def test_v1_models_says_the_model_detects_languages(multi_server):
    card = httpx.get(f"{multi_server[0]}/v1/models").json()["data"][0]
    assert card["language_detection"] is True and card["languages"] == ["en", "de", "es", "fr"]


@pytest.fixture(scope="module")
def masked_dir(espeak_multi_dir, tmp_path_factory):
    """The multilingual model as if NeMo had trained it with use_loss_mask_for_prompt: true."""
    out = tmp_path_factory.mktemp("masked") / "model"
    shutil.copytree(espeak_multi_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "prompt_loss_masked": True}))
    return out


def test_a_model_trained_with_its_prompt_masked_refuses_detection_instead_of_guessing(masked_dir, german, caplog):
    audio, text = german
    with canary_server.load(masked_dir, dtype="float32") as m:
        assert "trained with its prompt masked" in caplog.text  # said once, at load
        for language in (None, "auto"):
            with pytest.raises(LanguageDetectionUnavailable, match="cannot detect the spoken language"):
                m.transcribe(audio, source_lang=language)
        assert m.transcribe(audio, source_lang="de").text == text  # a named language is decoded as ever


def test_a_prompt_masked_model_says_so_in_v1_models_and_answers_400_without_a_language(masked_dir, german):
    audio, _ = german
    with running_server(build_app(Settings(model=str(masked_dir)), wyoming_port=0)) as url:
        wait_ready(url)
        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert card["language_detection"] is False
        err = _post(url, audio).json()["error"]
        assert (err["code"], err["param"]) == ("language_detection_unavailable", "language")
        assert _post(url, audio, language="de").status_code == 200
