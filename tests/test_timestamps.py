"""Flash-model timestamps: parity with NeMo 3.0.0 (tests/fixtures/timestamps, made by make_timestamp_fixtures.py).

`parse` cases: NeMo's `process_aed_timestamp_outputs` on hand-built and random token sequences (flash_agg tokenizer).
`transcribe` cases: NeMo's `transcribe(..., timestamps=True)` on the flash_agg model, as is (it never emits timestamp
tokens) and with the timestamp tokens' head bias raised by `timestamp_bias` (so it does).
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache

import mlx.core as mx
import numpy as np
import pytest

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.model.errors import CanaryError
from canary_server.model.prompt import PromptSpec
from canary_server.model.timestamps import has_timestamp_tokens, parse_timestamps, timestamp_source
from canary_server.pipeline.scheduler import ContinuousBatcher, WorkItem
from conftest import FIXTURES

TIME_TOL = 1e-6


@cache
def golden() -> dict:
    return json.loads((FIXTURES / "timestamps" / "golden.json").read_text())


@cache
def audios() -> list[np.ndarray]:
    npz = np.load(FIXTURES / "flash_agg" / "golden.npz")
    return [npz[f"audio_{i}"] for i in range(4)]


@pytest.fixture(scope="module")
def flash(tmp_path_factory) -> model.Canary:
    return model.load(convert_nemo(FIXTURES / "flash_agg" / "model.nemo", tmp_path_factory.mktemp("ts") / "m"))


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> model.Canary:
    return model.load(convert_nemo(FIXTURES / "v1_agg" / "model.nemo", tmp_path_factory.mktemp("ts1") / "m"))


def _words(words) -> list[dict]:
    return [{"word": w.word, "start_offset": w.start_offset, "end_offset": w.end_offset, "start": w.start,
             "end": w.end} for w in words]  # fmt: skip


def _segments(segments) -> list[dict]:
    return [{"segment": s.text, "start_offset": s.start_offset, "end_offset": s.end_offset, "start": s.start,
             "end": s.end} for s in segments]  # fmt: skip


def _assert_same(ours: list[dict], nemo: list[dict]) -> None:
    assert len(ours) == len(nemo)
    for a, b in zip(ours, nemo, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k in ("start", "end"):
                assert abs(a[k] - b[k]) < TIME_TOL, (k, a, b)
            else:
                assert a[k] == b[k], (k, a, b)


@pytest.mark.parametrize("case", golden()["parse"], ids=lambda c: c["name"])
def test_parser_matches_nemo_process_aed_timestamp_outputs(flash, case):
    raw = flash.tokenizer.ids_to_text(case["ids"])
    assert raw == case["nemo_input_text"]
    ts = parse_timestamps(raw, golden()["window_stride"], golden()["subsampling_factor"])
    assert ts.text == case["text"]
    _assert_same(_words(ts.words), case["word"])
    _assert_same(_segments(ts.segments), case["segment"])


def test_the_model_derives_nemos_frame_duration_from_its_config(flash):
    cfg = flash.config
    assert cfg.preprocessor.hop_length / flash.sample_rate == golden()["window_stride"]
    assert cfg.encoder.subsampling_factor == golden()["subsampling_factor"]


def _with_timestamp_bias(m: model.Canary, bias: float | None):
    """NeMo's case: the timestamp tokens' head bias raised by `bias` (None: unchanged). Returns the restore value."""
    old = m.head.bias
    if bias is not None:
        lo, hi = golden()["timestamp_token_ids"]
        b = np.array(old)
        b[lo : hi + 1] += np.float32(bias)
        m.head.bias = mx.array(b)
    return old


def _check_results(results, case) -> None:
    for res, toks, nemo in zip(results, case["tokens"], case["results"], strict=True):
        assert res.tokens == toks
        assert res.raw_text == nemo["raw_text"]
        assert res.text == nemo["text"]
        _assert_same(_words(res.words), nemo["word"])
        _assert_same(_segments(res.segments), nemo["segment"])


@pytest.mark.parametrize("case", golden()["transcribe"], ids=lambda c: f"{c['name']}-bias{c['timestamp_bias']}")
def test_transcribe_with_timestamps_matches_nemo(flash, case):
    spec = PromptSpec("en", "en", timestamps=True)
    assert flash.prompt_ids(spec) == case["prompt_ids"]
    old = _with_timestamp_bias(flash, case["timestamp_bias"])
    try:
        out = flash.generate([audios()[i] for i in case["audio"]], "en", batch_size=case["batch_size"], timestamps=True)
    finally:
        flash.head.bias = old
    _check_results(out, case)


SINGLE_CASES = [c for c in golden()["transcribe"] if c["batch_size"] == 1]


# The batcher decodes every item as NeMo decodes it alone (its own length limit), so only single-item cases apply.
@pytest.mark.parametrize("case", SINGLE_CASES, ids=lambda c: f"{c['name']}-bias{c['timestamp_bias']}")
def test_the_continuous_batcher_gives_the_same_timestamps(flash, case):
    old = _with_timestamp_bias(flash, case["timestamp_bias"])
    try:
        batcher = ContinuousBatcher(flash, max_batch=4)
        items = [WorkItem(audios()[i], PromptSpec("en", "en", timestamps=True)) for i in [0, 1, 2, *case["audio"]]]
        batcher.submit(items)
        while len(batcher):
            batcher.step()
    finally:
        flash.head.bias = old
    assert all(it.error is None for it in items)
    _check_results([it.result for it in items[3:]], case)  # decoded beside other rows


def test_the_biased_fixture_really_has_timed_words():
    biased = [c for c in golden()["transcribe"] if c["timestamp_bias"] is not None]
    assert sum(len(r["word"]) for c in biased for r in c["results"]) >= 10
    assert any(len(r["segment"]) > 1 for c in biased for r in c["results"])


def test_timestamp_support_follows_prompt_format_and_tokenizer(flash, v1):
    assert flash.supports_timestamps and flash.timestamp_source == "tokens"
    assert has_timestamp_tokens(flash.tokenizer)
    assert not v1.supports_timestamps and v1.timestamp_source is None
    with pytest.raises(CanaryError, match="timestamps"):
        v1.generate(audios()[0], "en", timestamps=True)
    # the canary-1b-v2 hook: a config carrying a CTC aligner gets its timestamps from it, never from the prompt
    ctc_cfg = dataclasses.make_dataclass("Cfg", [("prompt_format", str), ("timestamps_ctc", str)])("canary2", "x")
    assert timestamp_source(ctc_cfg, flash.tokenizer) == "ctc"


def test_without_timestamps_the_results_carry_none(flash):
    res = flash.generate(audios()[0], "en")
    assert res.words == [] and res.segments == []
    assert flash.prompt_ids(PromptSpec("en", "en"))[-2] != flash.prompt_ids(PromptSpec("en", "en", timestamps=True))[-2]
