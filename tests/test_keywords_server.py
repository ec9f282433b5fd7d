"""keywords[] through the front doors, against a real `canary-server serve` process on the espeak model.

Expected texts are NeMo's (tests/fixtures/boosting/golden.json, espeak, beam 1 = NeMo's greedy with boosting).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import ESPEAK_CLIPS, FIXTURES
from server_process import start_server, stop_server

SERVER_LIST = ["hour", "new", "too"]  # the golden's "single" list
ALPHA = 2.0


def _golden(name: str) -> dict:
    cases = json.loads((FIXTURES / "boosting" / "golden.json").read_text())["families"]["espeak"]["cases"]
    return next(c for c in cases if c["name"] == name)


def _nemo_text(case: str, clip: str) -> str:
    c = _golden(case)
    return c["text"][c["clips"].index(clip)].strip()


@pytest.fixture(scope="module")
def server(espeak_dir: Path):
    env = {"CANARY_KEYWORDS": json.dumps(SERVER_LIST), "CANARY_BOOSTING_TREE_ALPHA": str(ALPHA)}
    proc = start_server(espeak_dir, env=env)
    yield proc.url
    stop_server(proc)


def _post(url: str, clip: str, keywords: list[str] | None, path: str = "transcriptions") -> httpx.Response:
    data = {"model": "whisper-1", **({"keywords[]": keywords} if keywords else {})}  # repeated keywords[]
    files = {"file": (clip, (ESPEAK_CLIPS / clip).read_bytes(), "audio/wav")}
    return httpx.post(f"{url}/v1/audio/{path}", data=data, files=files, timeout=120)


def test_the_server_list_applies_to_requests_without_their_own_as_in_nemo(server):
    assert _post(server, "clip04.wav", None).json()["text"] == _nemo_text(f"single_beam1_alpha{ALPHA}", "clip04.wav")
    assert _nemo_text(f"single_beam1_alpha{ALPHA}", "clip04.wav") != _golden("single_beam1_alpha2.0")["plain_text"][0]


def test_a_request_list_replaces_the_server_list_with_the_sdk_field_and_extra_body(server):
    client = OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)
    with (ESPEAK_CLIPS / "clip10.wav").open("rb") as f:
        res = client.audio.transcriptions.create(model="whisper-1", file=f, keywords=["hear read", "out week"])
    expected = _nemo_text(f"multi_beam1_alpha{ALPHA}", "clip10.wav")  # also boosts "seventy one": not in clip10
    assert res.text == expected
    with (ESPEAK_CLIPS / "clip04.wav").open("rb") as f:
        res = client.audio.translations.create(model="whisper-1", file=f, extra_body={"keywords": ["zebra"]})
    assert res.text == _nemo_text(f"nomatch_beam1_alpha{ALPHA}", "clip04.wav")  # not the server list's "hour"


def test_two_concurrent_requests_with_different_lists_get_their_own_results(server):
    jobs = {"a": ("clip04.wav", SERVER_LIST), "b": ("clip10.wav", ["hear read", "out week", "seventy one"])}
    alone = {k: _post(server, clip, kw).json()["text"] for k, (clip, kw) in jobs.items()}
    together: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda k=k, c=c, kw=kw: together.__setitem__(k, _post(server, c, kw).json()["text"]))
        for k, (c, kw) in jobs.items()
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert alone["b"] == _nemo_text("multi_beam1_alpha2.0", "clip10.wav")


@pytest.mark.parametrize(
    ("keywords", "needle"),
    [
        ([f"w{i}" for i in range(101)], "at most 100"),
        (["x" * 101], "longer than 100"),
        (["bad\x07bell"], "control characters"),
        (["<|endoftext|>"], "special-token"),
        (["日本語"], "日本語"),  # pieces the English tokenizer cannot spell: named
    ],
)
def test_bad_keywords_are_400_in_openai_shape_and_the_server_stays_up(server, keywords, needle):
    r = _post(server, "clip04.wav", keywords)
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == "keywords[]" and err["code"] == "invalid_keywords"
    assert set(err) == {"message", "type", "param", "code"}
    assert _post(server, "clip04.wav", None).status_code == 200


def test_server_keywords_come_from_the_setting_and_the_file_checked_at_startup(tmp_path):
    from canary_server.server.settings import Settings, SettingsError

    names = tmp_path / "names.txt"
    names.write_text("Wohnzimmer\n\n  Stehlampe  \nkitchen\n", encoding="utf-8")
    s = Settings.load(keywords=["kitchen", "Nadia"], keywords_file=str(names))
    assert s.pipeline_config().keywords == ("kitchen", "Nadia", "Wohnzimmer", "Stehlampe")
    with pytest.raises(SettingsError, match="at most 1000"):
        Settings.load(keywords=[f"w{i}" for i in range(1001)])
    with pytest.raises(SettingsError, match="keywords_file"):
        Settings.load(keywords_file=str(tmp_path / "missing.txt"))


def test_a_wyoming_utterance_is_decoded_with_the_server_keywords_as_in_nemo(espeak_dir):
    """Home Assistant's case: device and room names set once for the server apply to every voice command."""
    import asyncio

    from test_wyoming import clip_pcm, serve, text_of, utterance

    from canary_server.server.settings import Settings
    from server_fakes import wait_ready

    settings = Settings(model=str(espeak_dir), keywords=SERVER_LIST, boosting_tree_alpha=ALPHA)
    app, server = serve(settings)
    with server as url:
        wait_ready(url)
        events = asyncio.run(utterance(app.state.wyoming.port, clip_pcm(ESPEAK_CLIPS, "clip04.wav"), language="en"))
    assert text_of(events) == (_nemo_text(f"single_beam1_alpha{ALPHA}", "clip04.wav"), "en")
