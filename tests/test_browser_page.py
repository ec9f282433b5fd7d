"""The browser page at `/`: served from the package with a Content-Security-Policy and no inline code, let through by
the Origin rule as the server's own page (requests and the Realtime handshake), and used for real in Debian's
headless Chromium (tests/chromium.py) against a `serve` process on the espeak-trained test model (NOT a real
Canary): the page asks for the API key, a chosen file shows its transcript with times, and the microphone (Chromium's
fake capture device playing a WAV) shows the live transcript from the Realtime WebSocket."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import tomllib

from canary_server.server.app import create_app
from canary_server.server.routes.page import STATIC
from canary_server.server.settings import Settings
from chromium import Chromium, chromium, find_chromium
from conftest import ESPEAK_CLIPS, REPO
from server_fakes import FakeCanary, fake_engine, running_server, tone, wait_ready, wav_bytes
from server_process import start_server, stop_server

KEY = "page-test-key"
STATIC_DIR = REPO / "server" / "static"
WAIT = 120.0  # the longest one step may take on a loaded CI machine
CLIP = "clip00.wav"


class _Tags(HTMLParser):
    """Every start tag with its attributes, and whether any script has inline code."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.inline_script = False
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        self.inline_script |= self._in_script and bool(data.strip())


@pytest.fixture(scope="module")
def fake_server():
    """The app over a fake engine (no model), with an API key: for what is served, not what is transcribed."""
    fake = FakeCanary(supports_timestamps=True)
    fake.timestamp_source = "tokens"  # the model card's `timestamps`: the page then asks for word times
    app = create_app(Settings(api_key=KEY), engine=fake_engine(fake))
    with running_server(app) as url:
        wait_ready(url)
        yield url


def test_the_page_has_a_content_security_policy_and_no_inline_code(fake_server):
    r = httpx.get(fake_server + "/")  # no key: the page itself holds nothing secret
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    tags = _Tags()
    tags.feed(r.text)
    assert not tags.inline_script
    assert not any(name.startswith("on") or name == "style" for _, attrs in tags.tags for name in attrs)
    assert not re.search(r"https?://", r.text), "the page loads nothing from elsewhere"
    linked = {a.get("src") or a.get("href") for t, a in tags.tags if t in ("script", "link")}
    assert linked == {"static/page.js", "static/page.css", "static/favicon.svg"}


def test_every_static_file_is_served_with_its_type_and_nothing_else_is(fake_server):
    assert set(STATIC) | {"index.html"} == {p.name for p in STATIC_DIR.iterdir()}
    for name, media_type in STATIC.items():
        r = httpx.get(f"{fake_server}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media_type, name
        assert r.content == (STATIC_DIR / name).read_bytes()
        assert r.headers["x-content-type-options"] == "nosniff"
    for name in ("index.html", "../app.py", "..%2Fapp.py", "nope.js"):
        r = httpx.get(f"{fake_server}/static/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] in ("not_found", None), name


def test_the_static_files_are_package_data():
    """A wheel installs the page: pyproject's package-data patterns match every file the routes serve."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    served = [Path("static") / name for name in [*STATIC, "index.html"]]
    for path in served:
        assert any(path.match(p) for p in patterns["canary_server.server"]), path


def test_the_origin_rule_lets_the_page_through_and_keeps_other_pages_out(fake_server):
    """The page POSTs from its own origin (scheme, host and port of the server); another page is refused."""
    audio = {"file": ("a.wav", wav_bytes(tone(1.0)), "audio/wav")}
    form = {"model": "whisper-1", "language": "en"}
    auth = {"Authorization": f"Bearer {KEY}"}
    own = httpx.post(fake_server + "/v1/audio/transcriptions", headers={**auth, "Origin": fake_server}, data=form,
                     files=audio)  # fmt: skip
    assert own.status_code == 200, own.text
    other = httpx.post(fake_server + "/v1/audio/transcriptions", headers={**auth, "Origin": "http://evil.example"},
                       data=form, files=audio)  # fmt: skip
    assert other.status_code == 403 and other.json()["error"]["code"] == "invalid_origin"


def test_the_realtime_handshake_takes_the_page_origin_and_the_key_as_a_subprotocol(fake_server):
    """What a browser sends: its Origin, and the key as `openai-insecure-api-key.<key>` beside `realtime`, which
    the server answers with (a browser drops a handshake that picks none of its subprotocols)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_url = fake_server.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    protocols = ["realtime", f"openai-insecure-api-key.{KEY}"]
    with connect(ws_url, origin=fake_server, subprotocols=protocols, open_timeout=WAIT) as ws:
        assert ws.subprotocol == "realtime"
        assert '"session.created"' in ws.recv(timeout=WAIT)
    wrong_key = ["realtime", "openai-insecure-api-key.x"]
    for origin, offered in (("http://evil.example", protocols), (fake_server, wrong_key)):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, origin=origin, subprotocols=offered, open_timeout=WAIT)
        assert refused.value.response.status_code == 403


# --- In Chromium ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_binary() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("no Chromium: `bash scripts/setup.sh --dev` installs Debian's chromium on Linux")
    return found


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    """The clip, then 3 s of silence (server VAD ends the turn), as 16-bit PCM for Chromium's fake microphone. It
    starts with speech: the espeak model loses words after leading silence."""
    audio, rate = sf.read(ESPEAK_CLIPS / CLIP, dtype="float32")
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    sf.write(path, np.concatenate([audio, np.zeros(3 * rate, np.float32)]), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def real_server(espeak_dir):
    """`canary-server serve` on the espeak model, with an API key."""
    server = start_server(espeak_dir, env={"CANARY_API_KEY": KEY, "CANARY_DEFAULT_LANGUAGE": "en"})
    yield server
    stop_server(server)


def _microphone(wav: Path) -> list[str]:
    """Chromium flags: the microphone is allowed without asking and plays `wav` once, then silence."""
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    ]


@pytest.fixture(scope="module")
def page(browser_binary, real_server, speech_wav, tmp_path_factory):
    """Chromium on the page of the real server, its microphone playing `speech_wav`."""
    with chromium(browser_binary, tmp_path_factory.mktemp("profile"), _microphone(speech_wav)) as browser:
        browser.goto(real_server.url + "/")
        yield browser, real_server


def _text(browser: Chromium, selector: str) -> str:
    return browser.evaluate(f"(document.querySelector({selector!r}) || {{}}).textContent || ''")


def _fail(browser: Chromium, server) -> str:
    return f"console: {browser.console()}\nserver log: {server.log()[-3000:]}"


def _start_and_wait_for_a_final_line(browser: Chromium, server) -> str:
    """Click Start (the fake microphone plays its file) and wait for the first completed line, or an error; the
    line's text. Fails with the page's and the server's state when neither comes or the page shows an error."""
    browser.evaluate("document.getElementById('mic').click()", gesture=True)
    try:
        final = browser.wait_until(
            "(document.querySelector('#live-text li.final') || {}).textContent || "
            "document.getElementById('error').textContent",
            WAIT,
        )
    except Exception as exc:
        raise AssertionError(_fail(browser, server)) from exc
    assert _text(browser, "#error") == "", _fail(browser, server)
    return final


def _assert_most_words_heard(final: str, expected: list[str]) -> None:
    heard = final.split()
    assert sum(word in heard for word in expected) >= 0.7 * len(expected), (final, expected)


def _enter_key(browser: Chromium) -> None:
    browser.wait_until("!document.getElementById('key-form').hidden", WAIT)
    browser.evaluate(
        f"document.getElementById('api-key').value = {KEY!r}; document.querySelector('#key-form button').click()",
        gesture=True,
    )
    browser.wait_until("!document.getElementById('mic').disabled", WAIT)


def test_in_chromium_the_page_asks_for_the_key_then_shows_a_files_transcript_with_times(
    page, espeak_nemo_transcripts, tmp_path
):
    browser, server = page
    assert _text(browser, "#model") == "API key needed"
    _enter_key(browser)
    assert _text(browser, "#model").endswith("(flash-style)"), _fail(browser, server)  # the model's card
    browser.set_file("#file-input", ESPEAK_CLIPS / CLIP)
    try:
        browser.wait_until("document.getElementById('segments').children.length", WAIT)
    except Exception as exc:
        raise AssertionError(_fail(browser, server)) from exc
    expected = espeak_nemo_transcripts[CLIP].strip()
    assert _text(browser, "#file-text") == expected
    assert _text(browser, "#segments li") == "0:00.00 – 0:04.79" + expected
    assert "language english" in _text(browser, "#file-state")
    assert _text(browser, "#error") == ""


def test_in_chromium_the_microphone_shows_the_live_transcript(page, espeak_nemo_transcripts, tmp_path):
    """Chromium's fake microphone plays the clip; the page streams it over the Realtime WebSocket and shows the
    server's deltas, then the completed turn (server VAD ends it in the silence after the clip). Chromium
    resamples the 16 kHz clip to 24 kHz and the server back to 16 kHz, so the words are compared, not the bytes."""
    browser, server = page
    if browser.evaluate("document.getElementById('mic').disabled"):
        _enter_key(browser)
    # Every text a partial (not yet completed) line shows, as the page shows it.
    browser.evaluate(
        "window.partials = []; new MutationObserver(() => document.querySelectorAll('#live-text li.partial')"
        ".forEach((li) => li.textContent && window.partials.push(li.textContent)))"
        ".observe(document.getElementById('live-text'), {subtree: true, childList: true, characterData: true})"
    )
    final = _start_and_wait_for_a_final_line(browser, server)
    expected = espeak_nemo_transcripts[CLIP].split()
    _assert_most_words_heard(final, expected)
    partials = browser.evaluate("window.partials")
    flat = " ".join(final.split())
    assert partials and all(flat.startswith(" ".join(p.split())) for p in partials), (partials, final)  # the deltas
    browser.evaluate("document.getElementById('mic').click()", gesture=True)  # stop
    browser.wait_until("document.getElementById('mic').textContent === 'Start recording'", WAIT)
    shot = tmp_path / "page.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_in_chromium_a_file_shows_its_word_times_and_a_refusal_shows_the_servers_message(
    browser_binary, fake_server, tmp_path
):
    """On the fake model with word times (the espeak model emits no timestamp tokens): the words and their times are
    listed; a translation the server refuses shows OpenAI's error message on the page."""
    wav = tmp_path / "tone.wav"
    wav.write_bytes(wav_bytes(tone(2.0)))
    with chromium(browser_binary, tmp_path / "profile", []) as browser:
        browser.goto(fake_server + "/")
        _enter_key(browser)
        browser.set_file("#file-input", wav)
        browser.wait_until("!document.getElementById('words-box').hidden", WAIT)
        words = browser.evaluate("[...document.querySelectorAll('#words span')].map((s) => s.textContent)")
        assert words == ["hello0.00–0.40", "world0.50–0.90", "2.001.00–1.40", "ts1.50–1.90"]  # the fake: 0.5 s a word
        browser.evaluate("const t = document.getElementById('target'); t.add(new Option('xx', 'xx')); t.value = 'xx'")
        browser.set_file("#file-input", wav)
        message = browser.wait_until("document.getElementById('error').textContent", WAIT)
        assert "xx" in message and not _text(browser, "#file-text")


def test_in_chromium_stopping_while_speaking_commits_the_turn_and_shows_its_final_text(
    browser_binary, real_server, tmp_path
):
    """Stop pressed mid-speech (at the first partial of two clips spoken without a pause): the page commits the
    turn (`input_audio_buffer.commit`) and shows its completed transcript before it closes the connection."""
    first, rate = sf.read(ESPEAK_CLIPS / CLIP, dtype="float32")
    second, _ = sf.read(ESPEAK_CLIPS / "clip01.wav", dtype="float32")
    wav = tmp_path / "long.wav"
    sf.write(wav, np.concatenate([first, second, first]), rate, subtype="PCM_16")
    with chromium(browser_binary, tmp_path / "profile", _microphone(wav)) as browser:
        browser.goto(real_server.url + "/")
        _enter_key(browser)
        browser.evaluate("document.getElementById('mic').click()", gesture=True)
        try:
            partial = browser.wait_until("(document.querySelector('#live-text li.partial') || {}).textContent", WAIT)
            # stop, mid-speech; the state is read in the same task as the click (the answer cannot come between)
            state = browser.evaluate(
                "document.getElementById('mic').click(), document.getElementById('mic-state').textContent",
                gesture=True,
            )
            assert state == "finishing…"
            final = browser.wait_until(
                "document.getElementById('mic').textContent === 'Start recording' && "
                "(document.querySelector('#live-text li.final') || {}).textContent",
                WAIT,
            )
        except Exception as exc:
            raise AssertionError(_fail(browser, real_server)) from exc
        assert _text(browser, "#error") == "", _fail(browser, real_server)
        assert " ".join(final.split()).startswith(" ".join(partial.split())), (partial, final)
        assert len(final.split()) >= max(3, len(partial.split())), (partial, final)  # the committed turn


def test_in_chromium_a_pause_before_speaking_is_not_text_on_the_silence_robust_model(
    browser_binary, silence_robust_dir, tmp_path
):
    """As a user does: Start, a second of silence, then speech, then silence. On the model trained with silence
    around speech (tests/fixtures/silence_robust; NOT a real Canary) the page shows the spoken words and nothing
    for the pauses."""
    clips = REPO / "tests" / "fixtures" / "silence_robust" / "clips"
    expected = json.loads((clips / "nemo_transcripts.json").read_text())["00_padded.wav"].split()
    speech, rate = sf.read(clips / "00_padded.wav", dtype="float32")
    wav = tmp_path / "pause-then-speech.wav"
    sf.write(wav, np.concatenate([np.zeros(rate, np.float32), speech, np.zeros(3 * rate, np.float32)]), rate,
             subtype="PCM_16")  # fmt: skip
    server = start_server(silence_robust_dir, env={"CANARY_DEFAULT_LANGUAGE": "en"})
    try:
        with chromium(browser_binary, tmp_path / "profile", _microphone(wav)) as browser:
            browser.goto(server.url + "/")
            browser.wait_until("!document.getElementById('mic').disabled", WAIT)
            final = _start_and_wait_for_a_final_line(browser, server)
            _assert_most_words_heard(final, expected)
            assert browser.evaluate("document.querySelectorAll('#live-text li').length") == 1
    finally:
        stop_server(server)
