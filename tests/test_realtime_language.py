"""Never translate by accident, live: a Realtime session that names no language on the multilingual espeak model
(en/de/es/fr, NOT a real Canary; its language slot was trained) has each turn's language detected from its first
`live_detect_seconds` and transcribed in it, with deltas while the audio is still arriving; a session that names
its language is decoded in it as before; a model trained with its prompt masked refuses with an `error` event.
Against a real `serve` process with the official SDK's realtime client, as tests/test_realtime.py."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from test_realtime import _b64, _pcm, _pieces

from canary_server.model.audio import load_audio
from conftest import ESPEAK_MULTI_CLIPS
from server_process import start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

WAIT = 120.0
NEMO = json.loads((ESPEAK_MULTI_CLIPS / "nemo_transcripts.json").read_text())


@pytest.fixture(scope="module")
def multi_server(espeak_multi_dir):
    """`serve` on the multilingual model at the default settings (default_language "auto")."""
    proc = start_server(espeak_multi_dir)
    try:
        yield proc
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def masked_server(espeak_multi_dir, tmp_path_factory):
    """`serve` on the multilingual model as if NeMo had trained it with use_loss_mask_for_prompt: true."""
    out = tmp_path_factory.mktemp("masked") / "model"
    shutil.copytree(espeak_multi_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "prompt_loss_masked": True}))
    proc = start_server(out)
    try:
        yield proc
    finally:
        stop_server(proc)


def _session(language: str | None) -> dict:
    transcription = {"model": "whisper-1", **({"language": language} if language else {})}
    return {
        "type": "transcription",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "transcription": transcription,
                            "turn_detection": None}},
    }  # fmt: skip


async def _recv(conn, seen: list, kind: str):
    while True:
        event = await asyncio.wait_for(conn.recv(), WAIT)
        seen.append(event)
        if event.type in (kind, "error"):
            return event


def _transcribe(server, clip: str, language: str | None, early: int = 0) -> tuple[list, object]:
    """The clip through one session in 0.25 s appends, then a commit: (events, completed). With `early`, only that
    many appends go out before the first delta must arrive (the rest after it)."""
    pieces = _pieces(_pcm(load_audio(ESPEAK_MULTI_CLIPS / clip)), 16000)
    early = early or len(pieces)

    async def main():
        seen: list = []
        client = openai.AsyncOpenAI(api_key="unused", base_url=server.url + "/v1")
        async with client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
            await conn.send({"type": "session.update", "session": _session(language)})
            assert (await _recv(conn, seen, "session.updated")).type == "session.updated"
            for piece in pieces[:early]:
                await conn.send({"type": "input_audio_buffer.append", "audio": _b64(piece)})
            if early < len(pieces):
                delta = await _recv(conn, seen, "conversation.item.input_audio_transcription.delta")
                assert delta.type.endswith(".delta"), delta
                for piece in pieces[early:]:  # the rest of the speech goes out only after the first delta came
                    await conn.send({"type": "input_audio_buffer.append", "audio": _b64(piece)})
            await conn.send({"type": "input_audio_buffer.commit"})
            done = await _recv(conn, seen, "conversation.item.input_audio_transcription.completed")
            while done.type == "error" and done.error.code == "language_detection_unavailable":
                done = await _recv(conn, seen, "conversation.item.input_audio_transcription.completed")
        return seen, done

    return asyncio.run(main())


def test_a_session_without_a_language_hears_german_in_german_with_deltas_before_the_audio_ends(multi_server):
    seen, done = _transcribe(multi_server, "de_00.wav", None, early=12)  # 3 s of its 4 s
    assert done.type.endswith(".completed"), done
    assert done.languages is not None and [lang.code for lang in done.languages] == ["de"]
    _, named = _transcribe(multi_server, "de_00.wav", "de")
    assert done.transcript == named.transcript  # exactly what the stream gives when told German
    assert named.languages is None  # named, not detected: left out
    deltas = "".join(e.delta for e in seen if e.type.endswith(".delta"))
    assert deltas.strip() == done.transcript
    words = set(NEMO["de_00.wav"].split())  # NeMo's offline German transcript of the clip
    assert len(words & set(done.transcript.split())) >= len(words) // 2, done.transcript
    assert "<|" not in done.transcript


def test_a_turn_shorter_than_the_detection_window_is_detected_from_what_it_has(multi_server):
    _, done = _transcribe(multi_server, "es_00.wav", None)  # 1.49 s: ends before live_detect_seconds
    _, named = _transcribe(multi_server, "es_00.wav", "es")
    assert [lang.code for lang in done.languages] == ["es"]
    assert done.transcript == named.transcript


def test_a_prompt_masked_model_refuses_a_session_without_a_language(masked_server):
    seen, done = _transcribe(masked_server, "de_00.wav", None)
    errors = [e for e in seen if e.type == "error"]
    refused = [e for e in errors if e.error.code == "language_detection_unavailable"]
    assert len(refused) == 1 and errors[0] is refused[0]  # said once, not once per append
    assert done.error.code == "input_audio_buffer_commit_empty"  # no turn was opened: nothing to commit
    assert errors[0].error.param == "language" and "give language a language code" in errors[0].error.message
    _, named = _transcribe(masked_server, "de_00.wav", "de")
    assert named.type.endswith(".completed") and named.transcript
