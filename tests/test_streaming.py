"""NeMo 3.0.0 streaming Canary decoding (waitk / alignatt), token-exact per chunk step and final, on goldens made by
NeMo itself (tests/fixtures/make_streaming_fixtures.py -> tests/fixtures/streaming/golden.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from canary_server.model.prompt import PromptSpec
from canary_server.model.stream_buffer import StreamingConfig
from canary_server.model.streaming import StreamingDecoder
from conftest import FIXTURES, SHARED

GOLDEN = json.loads((FIXTURES / "streaming" / "golden.json").read_text())
CASES = GOLDEN["cases"]


def _case_id(c: dict) -> str:
    return f"{c['model']}-{c['audio']}-{c['context']}-{c['policy']}"


def _audio(case: dict) -> np.ndarray:
    pieces = []
    for kind, name in case["parts"]:
        if kind == "npz":
            pieces.append(np.load(FIXTURES / case["model"] / "golden.npz")[name].astype(np.float32))
        else:
            path = SHARED / "models" / kind / name
            if not path.is_file():
                pytest.skip(f"{path} is not here")
            pieces.append(sf.read(path, dtype="float32")[0])
    return np.concatenate(pieces).astype(np.float32)


def _config(case: dict) -> StreamingConfig:
    return StreamingConfig(case["chunk_secs"], case["left_secs"], case["right_secs"], case["policy"])


def _en(m) -> list[int]:
    return m.prompt_ids(PromptSpec("en", "en", pnc=True))


def _run(decoder: StreamingDecoder, streams: list) -> list[list[list[int]]]:
    """Step until every stream is done; the committed tokens of each stream after each of its steps."""
    seen: list[list[list[int]]] = [[] for _ in streams]
    while not all(s.done for s in streams):
        for res in decoder.step(streams):
            seen[streams.index(res.stream)].append(list(res.stream.tokens))
    return seen


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_streaming_commits_nemo_tokens_after_every_chunk(streaming_models, case):
    m = streaming_models(case["model"])
    decoder = StreamingDecoder(m, _config(case))
    stream = decoder.open(case["prompt"])
    stream.append(_audio(case))
    stream.end()
    (steps,) = _run(decoder, [stream])
    assert steps == [s["tokens"] for s in case["steps"]]
    assert stream.tokens == case["tokens"]
    assert decoder.text(stream) == case["text"]


ONE_PER_AUDIO = [c for c in CASES if c["policy"] == "waitk" and c["context"] == "c1_l2_r0"]


@pytest.mark.parametrize("case", ONE_PER_AUDIO, ids=_case_id)
def test_our_prompt_is_nemos_streaming_prompt(streaming_models, case):
    lang = "de" if case["audio"].startswith("de_") else "en"  # the generator's prompts: pnc yes, transcription
    spec = PromptSpec(lang, lang, pnc=True)
    assert streaming_models(case["model"]).prompt_ids(spec) == case["prompt"]


def _groups() -> list[tuple[str, str, str]]:
    return sorted({(c["model"], c["context"], c["policy"]) for c in CASES})


@pytest.mark.parametrize("group", _groups(), ids="-".join)
def test_streams_decoded_together_each_get_their_own_nemo_tokens(streaming_models, group):
    cases = [c for c in CASES if (c["model"], c["context"], c["policy"]) == group]
    m = streaming_models(group[0])
    decoder = StreamingDecoder(m, _config(cases[0]))
    streams = []
    for c in cases:
        s = decoder.open(c["prompt"])
        s.append(_audio(c))
        s.end()
        streams.append(s)
    seen = _run(decoder, streams)
    for c, steps in zip(cases, seen, strict=True):
        assert steps == [s["tokens"] for s in c["steps"]]


def test_a_stream_waiting_for_audio_is_not_stepped(streaming_models):
    m = streaming_models("v2_unified")
    decoder = StreamingDecoder(m, StreamingConfig(1.0, 10.0, 0.5, "alignatt"))
    waiting, fed = decoder.open(_en(m)), decoder.open(_en(m))
    waiting.append(np.zeros(16000, np.float32))  # less than chunk + right context
    fed.append(np.zeros(24000, np.float32))
    assert [r.stream for r in decoder.step([waiting, fed])] == [fed]
    assert decoder.step([waiting, fed]) == []  # fed needs another full chunk now
    assert waiting.buffer.steps == 0 and fed.buffer.steps == 1


def test_a_stream_ending_on_a_chunk_boundary_gets_a_last_step_without_audio(streaming_models):
    m = streaming_models("v2_unified")
    decoder = StreamingDecoder(m, StreamingConfig(1.0, 10.0, 0.5, "waitk"))
    s = decoder.open(_en(m))
    s.append(np.load(FIXTURES / "v2_unified" / "golden.npz")["audio_2"][:40000])  # 1.5 s + one 1 s chunk
    while s.buffer.ready:
        (res,) = decoder.step([s])
        assert not res.final
    s.end()
    (res,) = decoder.step([s])
    assert res.final and s.done and s.buffer.steps == 3
    with pytest.raises(ValueError, match="after the end"):
        s.append(np.zeros(10, np.float32))


def test_streaming_settings_are_checked():
    with pytest.raises(ValueError, match="policy"):
        StreamingConfig(policy="greedy")
    with pytest.raises(ValueError, match="chunk"):
        StreamingConfig(chunk_secs=0.0)
    assert StreamingConfig(0.5, 10.0, 0.0).alignatt_budget == 0  # NeMo: int(0.5) * 10, one token per chunk
