"""Wyoming live partials: `transcript-chunk`s while the `audio-chunk`s still arrive (the engine's streaming decoder),
the final `transcript` at `audio-stop`; silence and noise give an empty transcript (the VAD: nothing decoded).

Real model: the espeak-trained tiny English model (../shared/models, NOT a real Canary), in `serve`'s composition.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from test_wyoming import TIMEOUT, clip_pcm, pcm16, serve, text_of, utterance
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from canary_server.server.settings import Settings
from conftest import ESPEAK_CLIPS
from server_fakes import SR, wait_ready

pytestmark = pytest.mark.vad
HELD_BACK = int(0.25 * SR) * 2  # bytes of 16-bit audio sent only after the first partial came
LEAD = 0.5  # seconds a chunk is sent before its time


@pytest.fixture(scope="module")
def nemo_en() -> dict[str, str]:
    import json

    return {k: v.strip() for k, v in json.loads((ESPEAK_CLIPS / "nemo_transcripts.json").read_text()).items()}


def _server(espeak_dir, partials: str):
    app, server = serve(Settings(model=str(espeak_dir), batch_size=8, wyoming_partials=partials))
    with server as url:
        wait_ready(url)
        yield app.state.wyoming.port


@pytest.fixture(scope="module")
def preview_port(espeak_dir):
    yield from _server(espeak_dir, "preview")


@pytest.fixture(scope="module")
def final_port(espeak_dir):
    yield from _server(espeak_dir, "final")


async def _live(client: AsyncTcpClient, pcm: bytes, chunk: int) -> None:
    """Send as a microphone does: each chunk at most LEAD seconds before its time (faster is not live audio,
    and the server drops its stream: partials.py AHEAD_SECONDS)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    for i in range(0, len(pcm), chunk):
        due = began + i / 2 / SR - LEAD
        if due > loop.time():
            await asyncio.sleep(due - loop.time())  # the audio's clock, not a wait for the server
        await client.write_event(AudioChunk(rate=SR, width=2, channels=1, audio=pcm[i : i + chunk]).event())


async def _speak(port: int, pcm: bytes, chunk: int = 2048) -> tuple[list[Event], list[Event]]:
    """Send all but the last 0.25 s in real time, wait for the first transcript-chunk (a partial: audio-stop not
    sent yet), then the rest and audio-stop. Returns (events before audio-stop, events after)."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=SR, width=2, channels=1).event())
        body, rest = pcm[:-HELD_BACK], pcm[-HELD_BACK:]
        await _live(client, body, chunk)
        early: list[Event] = []
        while not early or early[-1].type != "transcript-chunk":
            event = await asyncio.wait_for(client.read_event(), TIMEOUT)
            assert event is not None and event.type in ("transcript-start", "transcript-chunk"), event
            early.append(event)
        await client.write_event(AudioChunk(rate=SR, width=2, channels=1, audio=rest).event())
        await client.write_event(AudioStop().event())
        late: list[Event] = []
        while not late or late[-1].type != "transcript-stop":
            event = await asyncio.wait_for(client.read_event(), TIMEOUT)
            assert event is not None, late
            late.append(event)
        return early, late


def test_partials_arrive_while_the_audio_streams_and_the_final_transcript_is_nemos_offline_text(preview_port, nemo_en):
    early, late = asyncio.run(_speak(preview_port, clip_pcm(ESPEAK_CLIPS, "clip00.wav")))
    assert early[0].type == "transcript-start" and early[-1].data["text"].strip()
    assert [e.type for e in late][-2:] == ["transcript", "transcript-stop"]
    assert Transcript.from_event(late[-2]).text == nemo_en["clip00.wav"]  # decoded whole at audio-stop


def test_with_partials_final_the_streamed_text_is_the_transcript(final_port):
    early, late = asyncio.run(_speak(final_port, clip_pcm(ESPEAK_CLIPS, "clip00.wav")))
    text, language = text_of(early + late)  # the chunks add up to the transcript
    assert language == "en" and text and early[-1].data["text"].strip()


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_silence_and_noise_give_an_empty_transcript(preview_port, kind):
    rng = np.random.default_rng(0)
    audio = np.zeros(2 * SR, np.float32) if kind == "silence" else 0.05 * rng.standard_normal(2 * SR)
    events = asyncio.run(utterance(preview_port, pcm16(audio), language="en"))
    assert text_of(events) == ("", "en")


def test_audio_sent_faster_than_real_time_gets_no_partials_and_still_its_transcript(preview_port, nemo_en):
    """A file sent at once is not live: its stream is dropped (bounded engine memory), the transcript comes as
    before at audio-stop, decoded whole."""
    events = asyncio.run(utterance(preview_port, clip_pcm(ESPEAK_CLIPS, "clip00.wav"), language="en"))
    assert text_of(events) == (nemo_en["clip00.wav"], "en")
