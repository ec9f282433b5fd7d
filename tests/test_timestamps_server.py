"""Word and segment timestamps through the OpenAI API, read with the real `openai` SDK.

Rendering and chunk offsets: a fake model with timestamps (server_fakes.fake_timestamps). Shapes on real models: the
espeak tiny model (canary2 with the timestamp tokens, but never trained with <|timestamp|>, so its times mean
nothing) and the v1_agg fixture model (canary-1b style: no timestamps, so `word` is a 400)."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from canary_server.pipeline.chunking import split_audio
from canary_server.pipeline.engine import Engine
from canary_server.server.app import create_app
from canary_server.server.settings import Settings
from conftest import ESPEAK_CLIPS, FIXTURES
from server_fakes import SR, FakeCanary, fake_batcher, running_server, tone, wait_ready, wav_bytes

SDK_SEGMENT_FIELDS = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                      "compression_ratio", "no_speech_prob"}  # fmt: skip
CHUNK_SECONDS = 4


def _serve(settings: Settings, engine: Engine | None = None):
    with running_server(create_app(settings, engine=engine)) as url:
        wait_ready(url)
        with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def fake():
    return FakeCanary(supports_timestamps=True)


@pytest.fixture(scope="module")
def client(fake):
    settings = Settings(model="/models/fake-canary", chunk_seconds=CHUNK_SECONDS, max_audio_seconds=60)
    yield from _serve(settings, Engine(lambda: fake, batcher=fake_batcher, batch_size=4))


def _long() -> tuple[bytes, list]:
    audio = tone(10.0)  # three chunks of a steady tone
    return wav_bytes(audio), split_audio(audio, SR, CHUNK_SECONDS)


def _expected_words(chunks) -> list[tuple[str, float, float]]:
    out = []
    for c in chunks:  # fake_timestamps: word i at [0.5 i, 0.5 i + 0.4] s of its chunk
        words = f"hello world {len(c.audio) / SR:.2f} ts".split()
        out += [(w, c.start + 0.5 * i, c.start + 0.5 * i + 0.4) for i, w in enumerate(words)]
    return out


def test_verbose_json_words_and_segments_carry_the_models_times_plus_chunk_offsets(client, fake):
    data, chunks = _long()
    res = client.audio.transcriptions.create(
        model="whisper-1", file=("long.wav", data, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )  # fmt: skip
    assert len(chunks) == 3 and fake.calls[-1]["timestamps"] is True
    expected = _expected_words(chunks)
    assert [(w.word, w.start, w.end) for w in res.words] == [
        (w, pytest.approx(s), pytest.approx(e)) for w, s, e in expected
    ]
    # two words per fake segment
    pairs = [expected[i : i + 2] for i in range(0, len(expected), 2)]
    assert [(s.text, s.start, s.end) for s in res.segments] == [
        (" ".join(w for w, _, _ in p), pytest.approx(p[0][1]), pytest.approx(p[-1][2])) for p in pairs
    ]
    assert [s.id for s in res.segments] == list(range(len(pairs)))
    assert all(set(s) >= SDK_SEGMENT_FIELDS for s in res.model_dump()["segments"])
    assert res.text == " ".join(w for w, _, _ in expected)


def test_srt_and_vtt_use_the_models_segment_times(client):
    first = ("clip.wav", wav_bytes(tone(1.5)), "audio/wav")
    srt = client.audio.transcriptions.create(model="whisper-1", file=first, response_format="srt")
    assert srt == "1\n00:00:00,000 --> 00:00:00,900\nhello world\n\n2\n00:00:01,000 --> 00:00:01,900\n1.50 ts\n"
    vtt = client.audio.transcriptions.create(model="whisper-1", file=first, response_format="vtt")
    assert vtt == "WEBVTT\n\n00:00:00.000 --> 00:00:00.900\nhello world\n\n00:00:01.000 --> 00:00:01.900\n1.50 ts\n"


def test_segment_granularity_alone_gives_timed_segments_and_no_words(client):
    res = client.audio.transcriptions.create(
        model="whisper-1", file=("c.wav", wav_bytes(tone(1.5)), "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["segment"],
    )  # fmt: skip
    assert res.words is None and [s.end for s in res.segments] == [pytest.approx(0.9), pytest.approx(1.9)]


@pytest.mark.parametrize(("fmt", "granularities"), [("json", None), ("text", None), ("verbose_json", None)])
def test_timestamps_are_asked_of_the_model_only_when_the_response_shows_them(client, fake, fmt, granularities):
    extra = {"timestamp_granularities": granularities} if granularities else {}
    file = ("c.wav", wav_bytes(tone(1.5)), "audio/wav")
    client.audio.transcriptions.create(model="whisper-1", file=file, response_format=fmt, **extra)
    assert "timestamps" not in fake.calls[-1]


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt"])
@pytest.mark.parametrize("granularities", [["word"], ["segment"], ["word", "segment"]])
def test_granularities_with_a_format_other_than_verbose_json_are_a_400_as_openai_answers(
    client, fake, fmt, granularities
):
    calls = len(fake.calls)
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(
            model="whisper-1", file=("c.wav", wav_bytes(tone(1.0)), "audio/wav"), response_format=fmt,
            timestamp_granularities=granularities,
        )  # fmt: skip
    err = e.value.response.json()["error"]
    assert err["param"] == "timestamp_granularities" and err["type"] == "invalid_request_error"
    assert err["message"] == (
        f"`response_format` must be `verbose_json` if `timestamp_granularities[]` is provided (got {fmt})"
    )
    assert len(fake.calls) == calls  # refused before any decoding


def test_an_unknown_granularity_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(
            model="whisper-1", file=("c.wav", wav_bytes(tone(1.0)), "audio/wav"), response_format="verbose_json",
            timestamp_granularities=["char"],
        )  # fmt: skip
    assert e.value.response.json()["error"]["param"] == "timestamp_granularities"


# ---- real models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def espeak_client(espeak_dir):
    yield from _serve(Settings(model=str(espeak_dir), chunk_seconds=CHUNK_SECONDS))


def test_espeak_model_answers_word_and_segment_granularities_in_the_sdk_shapes(espeak_client):
    file = ("clip00.wav", (ESPEAK_CLIPS / "clip00.wav").read_bytes(), "audio/wav")
    res = espeak_client.audio.transcriptions.create(
        model="whisper-1", file=file, response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    assert isinstance(res.words, list)  # untrained for <|timestamp|>: usually no timed words at all
    assert all(w.start <= w.end for w in res.words)
    assert res.segments and all(set(s) >= SDK_SEGMENT_FIELDS for s in res.model_dump()["segments"])
    assert res.text == " ".join(s.text for s in res.segments)


@pytest.fixture(scope="module")
def v1_client(tmp_path_factory):
    from canary_server.convert import convert_nemo

    path = convert_nemo(FIXTURES / "v1_agg" / "model.nemo", tmp_path_factory.mktemp("v1") / "canary-1b-like")
    yield from _serve(Settings(model=str(path), chunk_seconds=CHUNK_SECONDS))


def test_a_model_without_timestamps_refuses_word_granularity_in_openais_error_shape(v1_client):
    with pytest.raises(openai.BadRequestError) as e:
        v1_client.audio.transcriptions.create(
            model="whisper-1", file=("c.wav", wav_bytes(tone(1.0)), "audio/wav"), response_format="verbose_json",
            timestamp_granularities=["word"],
        )  # fmt: skip
    err = e.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == "timestamp_granularities" and "word timestamps" in err["message"]


def test_a_model_without_timestamps_gives_chunk_segments_and_srt(v1_client):
    data, chunks = _long()
    res = v1_client.audio.transcriptions.create(
        model="whisper-1", file=("long.wav", data, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["segment"],
    )  # fmt: skip
    assert res.words is None
    spans = [(round(c.start, 3), round(c.end, 3)) for c in chunks]
    assert res.segments and all((s.start, s.end) in spans for s in res.segments)
    srt = v1_client.audio.transcriptions.create(model="whisper-1", file=("l.wav", data), response_format="srt")
    assert srt.count(" --> ") == len(res.segments)
