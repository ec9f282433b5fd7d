"""canary-1b-v2's bundled timestamps CTC model: conversion, CTC forward and forced-alignment word/segment times,
against NeMo 3.0.0's goldens in tests/fixtures/v2_ctc (see tests/fixtures/README.md, "v2_ctc/")."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.convert.mapping import ctc_expected_shapes
from canary_server.model.errors import CanaryError
from canary_server.pipeline.scheduler import ContinuousBatcher

FIXTURES = Path(__file__).parent / "fixtures"
V2_CTC = FIXTURES / "v2_ctc"
GOLDEN = json.loads((V2_CTC / "golden.json").read_text(encoding="utf-8"))
TIME_TOL = 1e-6  # seconds: NeMo's times are round(x, 2) of frame * 0.08, so equal floats are expected


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_nemo(V2_CTC / "model.nemo", tmp_path_factory.mktemp("v2_ctc") / "out")


@pytest.fixture(scope="module")
def v2(converted: Path) -> model.Canary:
    return model.load(converted)


@pytest.fixture(scope="module")
def audio() -> dict[int, np.ndarray]:
    base = np.load(FIXTURES / "v2_unified" / "golden.npz")  # the same clips the generator used
    return {i: base[f"audio_{i}"] for i in range(4)}


def _word_dicts(words) -> list[dict]:
    return [
        {"word": w.word, "start_offset": w.start_offset, "end_offset": w.end_offset, "start": w.start, "end": w.end}
        for w in words
    ]


def _segment_dicts(segments) -> list[dict]:
    return [
        {"segment": s.text, "start_offset": s.start_offset, "end_offset": s.end_offset, "start": s.start, "end": s.end}
        for s in segments
    ]


def _assert_times_equal(got: list[dict], want: list[dict], label: str) -> None:
    assert len(got) == len(want), (label, got, want)
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k not in ("start", "end")} == {
            k: v for k, v in w.items() if k not in ("start", "end")
        }, label
        assert abs(g["start"] - w["start"]) <= TIME_TOL and abs(g["end"] - w["end"]) <= TIME_TOL, (label, g, w)


# ---- conversion ---------------------------------------------------------------------------------------------


def test_the_bundled_ctc_model_is_converted_into_a_timestamps_subdirectory(converted: Path):
    cfg = json.loads((converted / "config.json").read_text())
    ctc = cfg["timestamps_ctc"]
    assert ctc["weights"] == "timestamps/model.safetensors"
    assert (ctc["vocab_size"], ctc["blank_id"]) == (GOLDEN["ctc"]["vocab_size"], GOLDEN["ctc"]["blank_id"])
    assert ctc["encoder"]["d_model"] == 32 and ctc["encoder"]["xscaling"] is True
    assert ctc["preprocessor"]["features"] == 80
    weights = mx.load(str(converted / ctc["weights"]))
    assert {k: tuple(v.shape) for k, v in weights.items()} == ctc_expected_shapes(ctc)
    # one tokenizer for both models
    assert sorted(p.name for p in converted.glob("tokenizer*")) == ["tokenizer.model"]


def test_a_nemo_without_the_bundled_model_converts_as_before(tmp_path: Path, audio):
    out = convert_nemo(FIXTURES / "v2_unified" / "model.nemo", tmp_path / "out")
    assert "timestamps_ctc" not in json.loads((out / "config.json").read_text())
    assert not (out / "timestamps").exists()
    m = model.load(out)
    assert m.timestamps_model is None and m.timestamp_source is None
    with pytest.raises(CanaryError, match="does not produce timestamps"):
        m.generate(audio[0], timestamps=True)


def test_the_loaded_model_times_words_with_its_ctc_aligner(v2: model.Canary):
    assert v2.timestamp_source == "ctc"
    assert v2.timestamps_model is not None
    assert not any(k.startswith("timestamps_model") for k in dict(v2.parameters()))  # kept out of the main tree


def _members(nemo: Path) -> dict[str, bytes]:
    with tarfile.open(nemo, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _rename_in_ckpt(ckpt: bytes, old: bytes, new: bytes) -> bytes:
    """Rename a state-dict key inside the torch zip's data.pkl (same length keeps the pickle valid)."""
    assert len(old) == len(new)
    src, out = zipfile.ZipFile(io.BytesIO(ckpt)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(old) == 1
                data = data.replace(old, new)
            dst.writestr(info.filename, data)
    return out.getvalue()


def _without_aligner(out: Path) -> str:
    """The converted model has no timestamps model; returns the note config.json keeps about why."""
    config = json.loads((out / "config.json").read_text())
    assert "timestamps_ctc" not in config and not (out / "timestamps").exists()
    m = model.load(out)
    assert m.timestamps_model is None and not m.supports_timestamps
    return config["notes"][0]


def test_an_unknown_key_in_the_ctc_checkpoint_leaves_the_aligner_out_with_a_clear_warning(tmp_path: Path, caplog):
    members = _members(V2_CTC / "model.nemo")
    name = "./timestamps_asr_model_weights.ckpt"
    members[name] = _rename_in_ckpt(members[name], b"decoder.decoder_layers.0.bias", b"decoder.decoder_extras.0.bias")
    out = convert_nemo(_write_tar(tmp_path / "bad.nemo", members), tmp_path / "out")
    note = _without_aligner(out)
    assert note.startswith("bundled timestamps model left out: timestamps model state dict:")
    assert "1 keys match no rule: decoder.decoder_extras.0.bias" in note and "missing: decoder.bias" in note
    assert "no word times" in caplog.text


def test_an_unsupported_ctc_config_value_or_a_lone_member_leaves_the_aligner_out(tmp_path: Path):
    members = _members(V2_CTC / "model.nemo")
    cfg = yaml.safe_load(members["./timestamps_asr_model_config.yaml"])
    cfg["encoder"]["self_attention_model"] = "abs_pos"
    edited = dict(members, **{"./timestamps_asr_model_config.yaml": yaml.safe_dump(cfg).encode()})
    note = _without_aligner(convert_nemo(_write_tar(tmp_path / "a.nemo", edited), tmp_path / "out_a"))
    assert "timestamps_asr_model.encoder.self_attention_model: unsupported" in note
    lone = {k: v for k, v in members.items() if k != "./timestamps_asr_model_weights.ckpt"}
    assert "incomplete timestamps model" in _without_aligner(convert_nemo(_write_tar(tmp_path / "b.nemo", lone),
                                                                          tmp_path / "out_b"))  # fmt: skip


def test_the_aligner_can_be_left_out_on_purpose(tmp_path: Path):
    out = convert_nemo(V2_CTC / "model.nemo", tmp_path / "out", timestamps_model=False)
    assert "on purpose" in _without_aligner(out)


# ---- parity with NeMo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 1, 2])
def test_ctc_log_probs_match_nemo(v2: model.Canary, audio, i: int):
    want = np.load(V2_CTC / "golden.npz")[f"ctc_logprobs_{i}"]
    (got,) = v2.timestamps_model.log_probs([audio[i]])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("case", GOLDEN["transcribe"], ids=lambda c: c["name"])
def test_transcribe_with_timestamps_matches_nemo(v2: model.Canary, audio, case: dict):
    pnc = case["kwargs"]["pnc"] == "yes"
    prompt = v2.prompt_ids(model.prompt.PromptSpec("en", "en", pnc=pnc))  # <|notimestamp|>, as NeMo forces
    assert prompt == case["prompt_ids"]
    results = v2.generate([audio[i] for i in case["audio"]], batch_size=case["batch_size"], pnc=pnc, timestamps=True)
    for k, (res, want) in enumerate(zip(results, case["items"], strict=True)):
        assert res.tokens == want["tokens"]
        # NeMo's single-audio call goes through its chunk merge, which strips hyp.text; times are unaffected
        assert res.text == want["text"].strip()
        _assert_times_equal(_word_dicts(res.words), want["timestamp"]["word"], f"{case['name']}[{k}] words")
        _assert_times_equal(_segment_dicts(res.segments), want["timestamp"]["segment"], f"{case['name']}[{k}] segs")
    assert any(res.words for res in results) or case["name"] == "ts_short_3"  # too many tokens: NeMo skips it


@pytest.mark.parametrize("case", GOLDEN["align"], ids=lambda c: c["name"])
def test_forced_alignment_of_a_text_matches_nemo(v2: model.Canary, audio, case: dict):
    (ts,) = v2.timestamps_model.timestamps([audio[case["audio"]]], [case["text"]])
    _assert_times_equal(_word_dicts(ts.words), case["timestamp"]["word"], case["name"])
    _assert_times_equal(_segment_dicts(ts.segments), case["timestamp"]["segment"], case["name"])


@pytest.mark.parametrize("case", [c for c in GOLDEN["transcribe"] if c["batch_size"] == 1], ids=lambda c: c["name"])
def test_the_servers_batcher_times_words_with_the_ctc_aligner_like_nemo(v2: model.Canary, audio, case: dict):
    """The engine path: <|notimestamp|> prompt, then CTC alignment of each item, as NeMo does for one file."""
    from canary_server.pipeline.scheduler import WorkItem

    assert v2.supports_timestamps
    pnc = case["kwargs"]["pnc"] == "yes"
    item = WorkItem(audio[case["audio"][0]], model.prompt.PromptSpec("en", "en", pnc=pnc, timestamps=True))
    batcher = ContinuousBatcher(v2)
    batcher.submit([item])
    while len(batcher):
        batcher.step()
    want = case["items"][0]
    assert item.result.tokens == want["tokens"]
    _assert_times_equal(_word_dicts(item.result.words), want["timestamp"]["word"], "words")
    _assert_times_equal(_segment_dicts(item.result.segments), want["timestamp"]["segment"], "segments")
