"""A live stream in the engine: audio fed in pieces, committed text after each chunk before the end of the audio,
NeMo's streaming tokens at every step and at the end, beside file requests on the same engine."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from canary_server.model.audio import load_audio
from canary_server.model.errors import AudioDecodeError
from canary_server.model.stream_buffer import StreamingConfig
from canary_server.pipeline.engine import Engine
from canary_server.pipeline.errors import AudioTooLong
from conftest import ESPEAK_CLIPS, FIXTURES, run_engine

GOLDEN = json.loads((FIXTURES / "streaming" / "golden.json").read_text())


def _golden(audio: str, context: str, policy: str) -> dict:
    (case,) = [
        c for c in GOLDEN["cases"]
        if (c["model"], c["audio"], c["context"], c["policy"]) == ("espeak-tiny-en", audio, context, policy)
    ]  # fmt: skip
    return case


def _pieces(audio: np.ndarray, seconds: float = 0.25) -> list[np.ndarray]:
    n = int(16000 * seconds)
    return [audio[i : i + n] for i in range(0, len(audio), n)]


def test_a_live_stream_gets_nemo_partials_before_the_end_and_nemo_final_tokens(espeak_model):
    case = _golden("clip00", "c1_l10_r0.5", "alignatt")
    audio = load_audio(ESPEAK_CLIPS / "clip00.wav")
    config = StreamingConfig(case["chunk_secs"], case["left_secs"], case["right_secs"], case["policy"])
    engine = Engine(lambda: espeak_model, batch_size=4)
    first_two = int(16000 * (2 * case["chunk_secs"] + case["right_secs"]))  # the first two chunks

    async def main():
        job = engine.open_stream("en", "en", True, config)
        updates = job.updates()
        for piece in _pieces(audio[:first_two]):
            job.feed(piece)
        early = await anext(updates)  # arrives with the end of the audio not yet sent
        for piece in _pieces(audio[first_two:]):
            job.feed(piece)
        job.end()
        return early, [u async for u in updates]

    early, rest = run_engine(engine, main)
    steps = [s["tokens"] for s in case["steps"]]
    assert not early.final and early.text
    assert early.tokens == steps[1]  # NeMo's committed tokens after the second chunk
    assert rest[-1].final and rest[-1].tokens == case["tokens"]
    assert rest[-1].text == case["text"]
    changed = [t for prev, t in zip([[]] + steps, steps, strict=False) if t != prev]
    assert [early.tokens] + [u.tokens for u in rest if u.delta] == changed
    assert "".join([early.delta] + [u.delta for u in rest]) == case["text"]


def test_live_streams_and_file_requests_share_the_engine(espeak_model):
    waitk = _golden("clip03+clip04", "c0.5_l1_r0.5", "waitk")
    alignatt = _golden("clip00", "c1_l10_r0.5", "alignatt")
    clip = {"clip00": load_audio(ESPEAK_CLIPS / "clip00.wav")}
    clip["clip03+clip04"] = np.concatenate([load_audio(ESPEAK_CLIPS / f"clip0{i}.wav") for i in (3, 4)])
    short = load_audio(ESPEAK_CLIPS / "clip04.wav")
    engine = Engine(lambda: espeak_model, batch_size=4)

    async def live(case):
        cfg = StreamingConfig(case["chunk_secs"], case["left_secs"], case["right_secs"], case["policy"])
        job = engine.open_stream("en", "en", True, cfg)
        for piece in _pieces(clip[case["audio"]], 0.1):
            job.feed(piece)
        job.end()
        return [u async for u in job.updates()][-1]

    async def main():
        return await asyncio.gather(live(waitk), live(alignatt), engine.transcribe(short, "en", "en", True, None))

    a, b, file = run_engine(engine, main)
    assert a.final and a.tokens == waitk["tokens"]
    assert b.final and b.tokens == alignatt["tokens"]
    assert file.tokens == espeak_model.generate(short).tokens
    assert engine.stats["completed"] == 1


def test_a_live_stream_too_long_or_not_finite_is_refused_as_it_grows(espeak_model):
    engine = Engine(lambda: espeak_model, batch_size=4)

    async def main():
        job = engine.open_stream("en", "en", True, max_seconds=1.0)
        job.feed(np.zeros(16000, np.float32))
        with pytest.raises(AudioTooLong):
            job.feed(np.zeros(1, np.float32))
        with pytest.raises(AudioDecodeError, match="NaN"):
            job.feed(np.full(10, np.nan, np.float32))
        job.close()
        return await engine.transcribe(load_audio(ESPEAK_CLIPS / "clip04.wav"), "en", "en", True, None)

    assert run_engine(engine, main).text  # the engine goes on serving


def test_a_live_stream_without_a_language_is_detected_from_its_first_audio_then_decoded_in_it(espeak_multi_dir):
    """`Pipeline.open_stream` with options that detect (no language on a multilingual model): the first
    `live_detect_seconds` are held, the language decided from them, then the stream decodes in it: the same
    tokens as a stream opened in German, updates before the end of the audio; a stream closed while its audio
    is held leaves the engine."""
    from canary_server import model as canary
    from canary_server.pipeline import Pipeline
    from canary_server.pipeline.options import PipelineConfig
    from conftest import ESPEAK_MULTI_CLIPS

    m = canary.load(espeak_multi_dir, dtype="float32")
    pipeline = Pipeline(lambda: m, PipelineConfig(live_detect_seconds=1.5))
    audio = load_audio(ESPEAK_MULTI_CLIPS / "de_00.wav")
    early = 12  # 3 s of its 4 s
    config = StreamingConfig(1.0, 10.0, 0.5, "alignatt")  # the Realtime door's defaults

    async def run(options) -> tuple[list, bool]:
        job = pipeline.open_stream(options, config)
        updates = job.updates()
        pieces = _pieces(audio)
        for piece in pieces[:early]:
            job.feed(piece)
        first = await asyncio.wait_for(updates.__anext__(), 60)
        for piece in pieces[early:]:
            job.feed(piece)
        job.end()
        got = [first] + [u async for u in updates]
        return got, first.final

    async def main():
        held = pipeline.open_stream(pipeline.options(None))
        held.feed(audio[:8000])  # 0.5 s: still held for detection when it closes
        held.close()
        detected, first_was_final = await run(pipeline.options(None))
        named, _ = await run(pipeline.options("de"))
        # the close went through the engine's queue before both streams' messages: the held stream is gone (the
        # finished streams may still be listed until the engine's next turn, so only the held one is checked)
        live = pipeline.engine._live
        assert all(job is not held for job in [*live.detecting, *live.jobs])
        return detected, first_was_final, named

    detected, first_was_final, named = run_engine(pipeline.engine, main)
    assert not first_was_final  # text came while audio was still arriving
    assert detected[-1].detected is not None and detected[-1].detected.language == "de"
    assert named[-1].detected is None
    assert detected[-1].tokens == named[-1].tokens and detected[-1].text == named[-1].text
