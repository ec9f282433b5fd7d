"""The float16/bfloat16 overflow guard: inf/NaN in the encoder output or the logits is detected and the work is
recomputed in float32 (`Canary.float32()`), in `Canary.generate` and in the continuous batcher.

The overflow is real, not mocked: a copy of the flash_agg fixture with weights rescaled so that the function is
unchanged (ReLU is positively homogeneous; every scale is a power of two, so float32 gives bit-identical results
and NeMo's tokens) while float16 activations exceed 65504 and the float16 weights stay finite.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.model.audio import pad_batch
from canary_server.model.decoding import greedy_decode
from canary_server.model.errors import NonFiniteError
from canary_server.model.prompt import PromptSpec
from canary_server.pipeline.scheduler import ContinuousBatcher, WorkItem
from conftest import FIXTURES

FAMILY = "flash_agg"
ENCODER_SCALE = 2.0**12  # the subsampling convs' activations x 4096 (float16 overflows, float32 does not)
DECODER_SCALE = 2.0**16  # the first decoder FF's hidden activations x 65536


@cache
def golden() -> tuple[dict, dict]:
    folder = FIXTURES / FAMILY
    return json.loads((folder / "golden.json").read_text()), dict(np.load(folder / "golden.npz"))


def _rescaled(weights: dict[str, mx.array], part: str) -> dict[str, mx.array]:
    w = dict(weights)
    if part == "encoder":  # conv -> ReLU -> [dw -> pw -> ReLU] x 2: scale the first conv and every bias, undo in `out`
        sub = "encoder.pre_encode."
        for name in ("conv.0.weight", "conv.0.bias", "conv.2.bias", "conv.3.bias", "conv.5.bias", "conv.6.bias"):
            w[sub + name] = w[sub + name] * ENCODER_SCALE
        w[sub + "out.weight"] = w[sub + "out.weight"] / ENCODER_SCALE
    else:  # dense_in -> ReLU -> dense_out
        ff = "decoder.layers.0.third_sub_layer."
        w[ff + "dense_in.weight"] = w[ff + "dense_in.weight"] * DECODER_SCALE
        w[ff + "dense_in.bias"] = w[ff + "dense_in.bias"] * DECODER_SCALE
        w[ff + "dense_out.weight"] = w[ff + "dense_out.weight"] / DECODER_SCALE
    return w


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def part(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def overflowing(part, tmp_path_factory) -> Path:
    """A converted flash_agg directory whose float16 activations overflow in the encoder or in the decoder."""
    root = tmp_path_factory.mktemp(f"overflow_{part}")
    directory = convert_nemo(FIXTURES / FAMILY / "model.nemo", root / "plain")
    weights = _rescaled(mx.load(str(directory / "model.safetensors")), part)
    out = root / "rescaled"
    shutil.copytree(directory, out)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    for name, w in weights.items():  # the overflow is in the activations: the float16 weights are finite
        assert bool(mx.all(mx.isfinite(w.astype(mx.float16))).item()), name
    return out


def _cases(beam: bool) -> list[dict]:
    return [
        c
        for c in golden()[0]["transcribe"]
        if (c.get("beam_size", 1) > 1) == beam and "decodercontext" not in c["kwargs"]
    ]


def _generate(m: model.Canary, case: dict) -> list[list[int]]:
    _, g = golden()
    kw = case["kwargs"]
    results = m.generate(
        [g[f"audio_{i}"] for i in case["audio"]],
        source_lang=kw["source_lang"],
        target_lang=kw["target_lang"],
        pnc=kw["pnc"] == "yes",
        batch_size=case["batch_size"],
        beam_size=case.get("beam_size", 1),
    )
    return [r.tokens for r in results]


def test_the_rescaled_model_still_gives_nemos_tokens_in_float32(overflowing):
    m = model.load(overflowing, dtype="float32")
    assert not m.guards_overflow
    for case in _cases(beam=False) + _cases(beam=True):
        assert _generate(m, case) == case["tokens"], case["name"]


def test_float16_really_overflows_there(overflowing, part):
    m = model.load(overflowing, dtype="float16")
    _, g = golden()
    audio, lengths = pad_batch([g["audio_0"]])
    if part == "encoder":
        with pytest.raises(NonFiniteError, match="encoder output"):
            m.encode(audio, lengths)
        return
    enc, enc_lengths = m.encode(audio, lengths)
    prompt = mx.array([m.prompt_ids(PromptSpec("en", "en"))], dtype=mx.int32)
    with pytest.raises(NonFiniteError, match="logits"):
        greedy_decode(m, enc, enc_lengths, prompt, m.tokenizer.eos_id, m.tokenizer.pad_id)


def test_generate_recomputes_an_overflowing_batch_in_float32_and_gets_nemos_tokens(overflowing, caplog):
    m = model.load(overflowing, dtype="float16")
    first, *rest = _cases(beam=False)
    with caplog.at_level(logging.WARNING, logger="canary.model"):
        assert _generate(m, first) == first["tokens"]
    assert m.fell_back_to_float32 and m.float32().dtype == mx.float32
    assert "overflowed" in caplog.text and "float32" in caplog.text
    for case in rest + _cases(beam=True):  # later batches go straight to float32
        assert _generate(m, case) == case["tokens"], case["name"]


@pytest.mark.parametrize("beam", [1, 4])
def test_the_continuous_batcher_recomputes_overflowing_items_in_float32(overflowing, beam):
    """Greedy or beam rows that overflow (and everything in flight with them) are redone in float32: each item
    gets NeMo's single-item tokens (greedy) or float32 beam search's tokens."""
    _, g = golden()
    reference = model.load(overflowing, dtype="float32")
    waves = [g[f"audio_{i}"] for i in range(3)]
    specs = [PromptSpec("en", t) for t in ("en", "de", "en")]
    want = [
        reference.generate(w, source_lang="en", target_lang=s.target_lang, beam_size=beam)
        for w, s in zip(waves, specs, strict=True)
    ]
    if beam == 1:
        singles = {
            c["audio"][0]: c["tokens"][0]
            for c in _cases(beam=False)
            if c["batch_size"] == 1 and c["kwargs"]["target_lang"] == "en"
        }
        assert [want[i].tokens for i in (0, 2)] == [singles[0], singles[2]]  # float32 decoding alone is NeMo's

    m = model.load(overflowing, dtype="float16")
    batcher = ContinuousBatcher(m, max_batch=2, encode_seconds=1.5, beam_size=beam)  # one or two items at a time
    items = [WorkItem(w, s, tag=i) for i, (w, s) in enumerate(zip(waves, specs, strict=True))]
    batcher.submit(items)
    done = []
    while len(batcher):
        done += batcher.step()
    assert sorted(it.tag for it in done) == [0, 1, 2]
    assert all(it.error is None for it in items)
    assert [it.result.tokens for it in items] == [w.tokens for w in want]
    assert batcher.model.dtype == mx.float32 and m.fell_back_to_float32


def test_without_float32_weights_to_fall_back_to_the_overflowing_items_fail_alone(overflowing):
    m = model.load(overflowing, dtype="float16")
    del m.__dict__["_loader"]  # as if built without model.load: nothing to recompute with
    batcher = ContinuousBatcher(m)
    items = [WorkItem(golden()[1][f"audio_{i}"], PromptSpec("en", "en"), tag=i) for i in range(2)]
    batcher.submit(items)
    done = []
    while len(batcher):
        done += batcher.step()
    assert sorted(it.tag for it in done) == [0, 1]
    assert all(isinstance(it.error, NonFiniteError) and it.result is None for it in items)


def test_a_float16_model_that_does_not_overflow_stays_in_float16(tmp_path):
    m = model.load(convert_nemo(FIXTURES / FAMILY / "model.nemo", tmp_path / "m"), dtype="float16")
    assert m.guards_overflow
    case = _cases(beam=False)[0]
    _generate(m, case)
    batcher = ContinuousBatcher(m)
    batcher.submit([WorkItem(golden()[1]["audio_1"], PromptSpec("en", "en"))])
    while len(batcher):
        batcher.step()
    assert not m.fell_back_to_float32 and batcher.model is m
