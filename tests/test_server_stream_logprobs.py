"""Streaming (SSE, read by the SDK's streaming client) and token log-probabilities, with the real SDK against the
espeak-trained tiny model (a small Canary-architecture network trained with NeMo on espeak-ng speech; NOT a real
Canary). Its NeMo transcripts are the reference text."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
from openai import AsyncOpenAI

from conftest import ESPEAK_CLIPS


def _clip(name: str) -> tuple[str, bytes, str]:
    return (name, (ESPEAK_CLIPS / name).read_bytes(), "audio/wav")


def test_streaming_sends_text_as_it_is_decoded_and_the_deltas_add_up(espeak_client, espeak_nemo_transcripts):
    events = list(espeak_client.audio.transcriptions.create(model="whisper-1", file=_clip("clip01.wav"), stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done"
    assert events[-1].text == espeak_nemo_transcripts["clip01.wav"].strip() == "".join(deltas)
    assert len(deltas) > 5  # piece by piece, not one block
    assert events[-1].usage.seconds == pytest.approx(5.49, abs=0.01)


def test_async_streaming_of_long_audio_keeps_chunk_order(espeak_server, espeak_nemo_transcripts):
    import numpy as np
    import soundfile as sf

    from server_fakes import wav_bytes

    names = ["clip03.wav", "clip05.wav", "clip07.wav"]
    waves = [sf.read(ESPEAK_CLIPS / n, dtype="float32")[0] for n in names]
    gap = np.zeros(8000, dtype=np.float32)
    joined = np.concatenate([waves[0], gap, waves[1], gap, waves[2]])  # 8.5 s: two chunks of <= 8 s

    async def main():
        async with AsyncOpenAI(base_url=f"{espeak_server}/v1", api_key="unused", max_retries=0) as c:
            stream = await c.audio.transcriptions.create(
                model="whisper-1", file=("long.wav", wav_bytes(joined), "audio/wav"), stream=True
            )
            return [e async for e in stream]

    events = asyncio.run(main())
    text = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert text == events[-1].text
    assert text.startswith(espeak_nemo_transcripts["clip03.wav"].strip())


def test_json_with_include_logprobs_has_a_logprob_per_token(espeak_client, espeak_nemo_transcripts):
    res = espeak_client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=_clip("clip03.wav"), include=["logprobs"], response_format="json"
    )
    assert res.text == espeak_nemo_transcripts["clip03.wav"].strip()
    assert res.logprobs and "".join(lp.token for lp in res.logprobs).strip() == res.text
    assert all(lp.logprob <= 0 and bytes(int(b) for b in lp.bytes).decode() == lp.token for lp in res.logprobs)
    assert math.exp(sum(lp.logprob for lp in res.logprobs)) > 0.0


def test_streamed_done_event_carries_logprobs_when_asked(espeak_client):
    events = list(
        espeak_client.audio.transcriptions.create(
            model="whisper-1", file=_clip("clip09.wav"), stream=True, include=["logprobs"]
        )
    )
    done = events[-1]
    assert done.type == "transcript.text.done" and "".join(lp.token for lp in done.logprobs).strip() == done.text


def test_verbose_json_segments_carry_the_real_average_log_probability(espeak_client):
    res = espeak_client.audio.transcriptions.create(
        model="whisper-1", file=_clip("clip00.wav"), response_format="verbose_json"
    )
    plain = espeak_client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=_clip("clip00.wav"), include=["logprobs"]
    )
    mean = sum(lp.logprob for lp in plain.logprobs) / len(plain.logprobs)
    assert res.segments[0].avg_logprob == pytest.approx(mean, abs=1e-6) and mean < 0


def test_include_logprobs_with_another_format_or_an_unknown_include_is_400(espeak_client):
    with pytest.raises(openai.BadRequestError, match="response_format json"):
        espeak_client.audio.transcriptions.create(
            model="whisper-1", file=_clip("clip03.wav"), include=["logprobs"], response_format="text"
        )
    with pytest.raises(openai.BadRequestError, match="unknown include"):
        espeak_client.audio.transcriptions.create(model="whisper-1", file=_clip("clip03.wav"), include=["nope"])


def test_streaming_bad_audio_is_a_plain_400_before_any_event(espeak_client):
    with pytest.raises(openai.BadRequestError):
        list(espeak_client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"junk" * 100), stream=True))
