"""NeMo 3.0.0 streaming Canary decoding (waitk / alignatt), token-exact per chunk step and final, on goldens made by
NeMo itself (tests/fixtures/make_streaming_fixtures.py -> tests/fixtures/streaming/golden.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.model.stream_buffer import StreamingConfig
from canary_server.model.streaming import StreamingDecoder
from conftest import FIXTURES, SHARED

GOLDEN = json.loads((FIXTURES / "streaming" / "golden.json").read_text())
CASES = GOLDEN["cases"]
NEMO = {
    "espeak-tiny-en": SHARED / "models" / "espeak-tiny-en.nemo",
    "espeak-tiny-multi": SHARED / "models" / "espeak-tiny-multi.nemo",
}


def _case_id(c: dict) -> str:
    return f"{c['model']}-{c['audio']}-{c['context']}-{c['policy']}"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("streaming")

    @cache
    def get(name: str):
        nemo = NEMO.get(name, FIXTURES / name / "model.nemo")
        if not Path(nemo).is_file():
            pytest.skip(f"{nemo} is not here")
        return model.load(convert_nemo(nemo, root / name), dtype="float32")

    return get


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


def _run(decoder: StreamingDecoder, streams: list) -> list[list[list[int]]]:
    """Step until every stream is done; the committed tokens of each stream after each of its steps."""
    seen: list[list[list[int]]] = [[] for _ in streams]
    while not all(s.done for s in streams):
        for res in decoder.step(streams):
            seen[streams.index(res.stream)].append(list(res.stream.tokens))
    return seen


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_streaming_commits_nemo_tokens_after_every_chunk(models, case):
    m = models(case["model"])
    decoder = StreamingDecoder(m, _config(case))
    stream = decoder.open(case["prompt"])
    stream.append(_audio(case))
    stream.end()
    (steps,) = _run(decoder, [stream])
    assert steps == [s["tokens"] for s in case["steps"]]
    assert stream.tokens == case["tokens"]
    assert decoder.text(stream) == case["text"]


def _groups() -> list[tuple[str, str, str]]:
    return sorted({(c["model"], c["context"], c["policy"]) for c in CASES})


@pytest.mark.parametrize("group", _groups(), ids="-".join)
def test_streams_decoded_together_each_get_their_own_nemo_tokens(models, group):
    cases = [c for c in CASES if (c["model"], c["context"], c["policy"]) == group]
    m = models(group[0])
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
