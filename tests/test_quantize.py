"""`convert --quantize 8|4`: MLX affine quantization of the linear layers, on the espeak-trained tiny model.

That model (conftest's ESPEAK_NEMO) is a small Canary-architecture network trained with NeMo on espeak-ng speech;
it is NOT a real Canary. Its encoder d_model is 144, not a multiple of any MLX group size (32/64/128), so only
the encoder's feed_forward*.linear2 (576 inputs) and pre_encode.out are quantized there; every decoder linear is.
Measured on Linux x86_64 (MLX CPU): 8-bit gives NeMo's 12 held-out transcripts exactly; 4-bit changes 2 words
in 2 of the 12 clips (README "Quantization").
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from canary_server import model
from canary_server.cli import main
from canary_server.convert import ConversionError, convert_nemo
from canary_server.model.config import ModelConfig
from canary_server.model.errors import ModelLoadError
from conftest import ESPEAK_CLIPS, ESPEAK_NEMO

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def q8_dir(espeak_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_nemo(ESPEAK_NEMO, tmp_path_factory.mktemp("q8") / "model", quantize=8)


@pytest.fixture(scope="module")
def q4_dir(espeak_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q4") / "model"
    assert main(["convert", str(ESPEAK_NEMO), str(out), "--quantize", "4", "--group-size", "64"]) == 0
    return out


def _transcripts(directory: Path, names: list[str]) -> dict[str, str]:
    m = model.load(directory)
    results = m.generate([str(ESPEAK_CLIPS / n) for n in names], source_lang="en", batch_size=4)
    return {n: r.text for n, r in zip(names, results, strict=True)}


def _word_errors(ref: str, hyp: str) -> int:
    """Word-level Levenshtein distance."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1]


def _quantized_names(directory: Path) -> set[str]:
    return {k.removesuffix(".scales") for k in mx.load(str(directory / WEIGHTS)) if k.endswith(".scales")}


def test_8_bit_conversion_records_its_settings_and_stores_scales_and_biases(q8_dir, espeak_dir):
    assert json.loads((q8_dir / "config.json").read_text())["quantization"] == {"bits": 8, "group_size": 64}
    weights = mx.load(str(q8_dir / WEIGHTS))
    assert weights["decoder.layers.0.first_sub_layer.query_net.weight"].dtype == mx.uint32
    assert "decoder.layers.0.first_sub_layer.query_net.biases" in weights
    assert len(_quantized_names(q8_dir)) == 29  # 4 x 2 encoder linear2 + pre_encode.out + 2 x 10 decoder linears
    assert (q8_dir / WEIGHTS).stat().st_size < 0.7 * (espeak_dir / WEIGHTS).stat().st_size


def test_8_bit_model_loads_strictly_and_transcribes_the_held_out_clips_exactly_as_nemo(q8_dir, espeak_nemo_transcripts):
    names = sorted(espeak_nemo_transcripts)
    assert _transcripts(q8_dir, names) == {n: t.strip() for n, t in espeak_nemo_transcripts.items()}


def test_4_bit_model_is_smaller_still_and_differs_from_nemo_by_at_most_two_words(
    q4_dir, q8_dir, espeak_nemo_transcripts
):
    assert json.loads((q4_dir / "config.json").read_text())["quantization"] == {"bits": 4, "group_size": 64}
    assert _quantized_names(q4_dir) == _quantized_names(q8_dir)
    assert (q4_dir / WEIGHTS).stat().st_size < (q8_dir / WEIGHTS).stat().st_size
    names = sorted(espeak_nemo_transcripts)
    got = _transcripts(q4_dir, names)
    ref = {n: t.strip() for n, t in espeak_nemo_transcripts.items()}
    assert sum(got[n] == ref[n] for n in names) >= 10
    assert sum(_word_errors(ref[n], got[n]) for n in names) <= 2  # measured: 2 substitutions in 107 words


def test_only_linears_whose_inputs_split_into_groups_are_quantized_and_the_tied_embedding_stays_exact(
    q8_dir, espeak_dir
):
    m = model.load(q8_dir)
    layer = m.encoder.layers[0]
    assert isinstance(layer.feed_forward1.linear2, nn.QuantizedLinear)  # 576 inputs
    assert isinstance(m.encoder.pre_encode.out, nn.QuantizedLinear)  # 96 channels x 16 freqs
    assert not isinstance(layer.self_attn.linear_q, nn.QuantizedLinear)  # 144 inputs: no whole groups of 64
    assert not isinstance(m.encoder_decoder_proj, nn.QuantizedLinear)  # 144 inputs too
    assert isinstance(m.decoder.layers[1].third_sub_layer.dense_out, nn.QuantizedLinear)
    assert isinstance(m.decoder.layers[1].second_sub_layer.key_net, nn.QuantizedLinear)
    full = mx.load(str(espeak_dir / WEIGHTS))
    quant = mx.load(str(q8_dir / WEIGHTS))
    kept = [k for k in full if not any(k.startswith(f"{n}.") for n in _quantized_names(q8_dir))]
    assert "decoder.embedding.token_embedding.weight" in kept and "encoder.layers.0.conv.depthwise_conv.weight" in kept
    for k in kept:  # embedding/head, convs, norms, buffers: bit-identical to the unquantized conversion
        assert mx.array_equal(quant[k], full[k]).item(), k


def test_a_quantized_dir_with_its_quantization_field_removed_fails_to_load(q8_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in q8_dir.iterdir():
        (broken / f.name).symlink_to(f)
    cfg = json.loads((q8_dir / "config.json").read_text())
    del cfg["quantization"]
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="scales"):  # strict load: unexpected .scales/.biases keys
        model.load(broken)


def test_a_dtype_override_casts_scales_but_never_the_packed_weights(q8_dir):
    m = model.load(q8_dir, dtype="bfloat16")
    q = m.decoder.layers[0].first_sub_layer.query_net
    assert q.weight.dtype == mx.uint32 and q.scales.dtype == mx.bfloat16
    assert m.decoder.embedding.position_embedding.pos_enc.dtype == mx.float32


def test_a_bad_quantize_value_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    with pytest.raises(ConversionError, match=r"quantize: unsupported value 3 \(supported: 4, 8 bits\)"):
        convert_nemo(ESPEAK_NEMO, tmp_path / "q3", quantize=3)
    with pytest.raises(ConversionError, match=r"group_size: unsupported value 16 \(supported: 32, 64, 128\)"):
        convert_nemo(ESPEAK_NEMO, tmp_path / "g16", quantize=4, group_size=16)
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(ESPEAK_NEMO), str(tmp_path / "cli"), "--quantize", "2"])
    assert exc.value.code == 2
    assert "argument --quantize: invalid choice: 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unquantized_conversion_has_no_quantization_field_and_no_quantized_weights(espeak_dir):
    cfg = json.loads((espeak_dir / "config.json").read_text())
    assert "quantization" not in cfg
    assert ModelConfig.from_dict(cfg).quantization is None
    weights = mx.load(str(espeak_dir / WEIGHTS))
    assert not any(k.endswith((".scales", ".biases")) for k in weights)
    assert {v.dtype for v in weights.values()} == {mx.float32}


def test_model_config_reads_quantization_ignoring_unknown_keys_and_round_trips(espeak_dir):
    cfg = json.loads((espeak_dir / "config.json").read_text())
    cfg["quantization"] = {"bits": 4, "group_size": 32, "mode": "affine", "future": 1}
    q = ModelConfig.from_dict(cfg).quantization
    assert (q.bits, q.group_size) == (4, 32)
    assert ModelConfig.from_dict(ModelConfig.from_dict(cfg).to_dict()).quantization == q


def test_loading_a_config_with_unsupported_quantization_bits_is_a_load_error(q8_dir, tmp_path):
    broken = tmp_path / "bits3"
    broken.mkdir()
    for f in q8_dir.iterdir():
        if f.name != "config.json":
            (broken / f.name).symlink_to(f)
    cfg = json.loads((q8_dir / "config.json").read_text())
    cfg["quantization"]["bits"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="bits"):
        model.load(broken)


def test_an_8_bit_decoder_at_load_transcribes_the_held_out_clips_exactly_as_nemo(espeak_dir, espeak_nemo_transcripts):
    """`decoder_bits = 8` (model.load quantizes the decoder of the float32 directory; on the CPU paths its step runs
    through cpu_kernels.qmatmul8 where that is built) keeps NeMo's 12 transcripts (bench/quantize_eval.py)."""
    names = sorted(espeak_nemo_transcripts)
    m = model.load(espeak_dir, decoder_bits=8)
    results = m.generate([str(ESPEAK_CLIPS / n) for n in names], source_lang="en", batch_size=4)
    assert {n: r.text for n, r in zip(names, results, strict=True)} == {
        n: t.strip() for n, t in espeak_nemo_transcripts.items()
    }
    one = m.generate([str(ESPEAK_CLIPS / names[0])], source_lang="en", batch_size=1)[0]  # batch 1: the 1-row kernel
    assert one.text == espeak_nemo_transcripts[names[0]].strip()


@pytest.mark.parametrize(("value", "ok"), [("8", True), ("0", True), ("4", False), ("16", False), ("eight", False)])
def test_the_decoder_bits_setting_takes_0_or_8_and_refuses_anything_else(monkeypatch, value, ok):
    from pydantic import ValidationError

    from canary_server.server.settings import Settings

    assert Settings().decoder_bits == 0
    monkeypatch.setenv("CANARY_DECODER_BITS", value)
    if ok:
        assert Settings().decoder_bits == int(value)
    else:
        with pytest.raises(ValidationError, match="decoder_bits"):
            Settings()
