"""Converter tests: the real espeak-trained tiny Canary, dtypes, and every failure path leaving nothing behind."""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import tarfile
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from canary_server.convert import ConversionError, convert_nemo
from canary_server.convert.checkpoint import load_state_dict
from canary_server.convert.mapping import expected_shapes
from canary_server.convert.nemo import WeightsLocation

SHARED = Path(__file__).resolve().parents[2] / "shared"
ESPEAK = SHARED / "models" / "espeak-tiny-en.nemo"


@pytest.fixture
def espeak() -> Path:
    if not ESPEAK.is_file():
        pytest.skip(f"the espeak-trained tiny model is not at {ESPEAK} (shared/ must sit beside the checkout)")
    return ESPEAK


# ---- helpers: rebuild archives and checkpoints -------------------------------------------------------------


def _members(nemo: Path) -> dict[str, bytes]:
    with tarfile.open(nemo, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _write_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _edit_ckpt(ckpt: bytes, edit) -> bytes:
    """Rewrite a torch zip checkpoint with data.pkl replaced by edit(data.pkl)."""
    src = zipfile.ZipFile(io.BytesIO(ckpt))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, edit(data) if info.filename.endswith("data.pkl") else data)
    return out.getvalue()


def _with_ckpt(nemo: Path, dest: Path, edit) -> Path:
    members = _members(nemo)
    members["./model_weights.ckpt"] = _edit_ckpt(members["./model_weights.ckpt"], edit)
    return _write_tar(dest, members)


def _with_config(nemo: Path, dest: Path, edit) -> Path:
    members = _members(nemo)
    cfg = yaml.safe_load(members["./model_config.yaml"])
    edit(cfg)
    members["./model_config.yaml"] = yaml.safe_dump(cfg, sort_keys=False).encode()
    return _write_tar(dest, members)


def _assert_nothing_written(parent: Path, allowed: set[str]) -> None:
    leftovers = {p.name for p in parent.iterdir()} - allowed
    assert not leftovers, f"conversion left {leftovers} behind"


# Minimal torch-format pickle writer (opcodes as torch.save emits them), for checkpoints built without torch.
def _uni(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _ints(values) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def _torch_pickle(tensors: list[tuple[str, str, str, int, int, tuple, tuple]]) -> bytes:
    """tensors: (name, storage class, storage key, numel, offset, size, stride)."""
    out = b"\x80\x02ccollections\nOrderedDict\n)R("
    for name, stype, key, numel, offset, size, stride in tensors:
        storage = b"(" + _uni("storage") + f"ctorch\n{stype}\n".encode() + _uni(key) + _uni("cpu")
        storage += b"J" + struct.pack("<i", numel) + b"tQ"
        args = storage + b"J" + struct.pack("<i", offset) + _ints(size) + _ints(stride)
        args += b"\x89ccollections\nOrderedDict\n)R"
        out += _uni(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"
    return out + b"u."


def _torch_zip(
    path: Path, pkl: bytes, storages: dict[str, bytes], compression: int = zipfile.ZIP_STORED
) -> WeightsLocation:
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return WeightsLocation(path, 0, path.stat().st_size)


# ---- the real model ----------------------------------------------------------------------------------------


def test_espeak_model_converts_with_the_documented_names_shapes_and_values(espeak, tmp_path):
    out = convert_nemo(espeak, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.en.model",
        "tokenizer.spl_tokens.model",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["prompt_format"] == "canary2"
    assert config["enc_dec_proj"] is True
    assert config["decoder"]["vocab_size"] == 1408
    assert config["tokenizer"]["langs"] == [
        {"name": "spl_tokens", "file": "tokenizer.spl_tokens.model"},
        {"name": "en", "file": "tokenizer.en.model"},
    ]
    assert config["prompt_defaults"] == {
        "source_lang": "en",
        "target_lang": "en",
        "pnc": True,
        "itn": False,
        "emotion": "<|emo:undefined|>",
    }
    decoding = {"strategy": "beam", "beam_size": 1, "length_penalty": 0.0, "max_generation_delta": 50}
    assert config["decoding"] == decoding | {"configured_len_pen": 0.0}

    weights = mx.load(str(out / "model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    assert shapes == expected_shapes(config)
    assert shapes["encoder.pre_encode.conv.0.weight"] == (96, 3, 3, 1)
    assert shapes["encoder.pre_encode.conv.3.weight"] == (96, 1, 1, 96)
    assert shapes["encoder_decoder_proj.weight"] == (192, 144)
    assert shapes["decoder.embedding.token_embedding.weight"] == (1408, 192)
    assert shapes["encoder.layers.0.conv.depthwise_conv.weight"] == (144, 9, 1)
    assert shapes["encoder.layers.0.conv.pointwise_conv1.weight"] == (288, 144)
    assert len(weights) == 236 - 4 - 1  # NeMo keys minus num_batches_tracked per layer and the tied embedding

    nemo = tmp_path / "nemo"
    nemo.mkdir()
    ckpt = nemo / "w.ckpt"
    ckpt.write_bytes(_members(espeak)["./model_weights.ckpt"])
    state, _ = load_state_dict(WeightsLocation(ckpt, 0, ckpt.stat().st_size))
    got = {k: np.array(v) for k, v in weights.items()}
    np.testing.assert_array_equal(
        got["encoder.pre_encode.conv.0.weight"], state["encoder.pre_encode.conv.0.weight"].transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal(
        got["encoder.pre_encode.conv.6.weight"], state["encoder.pre_encode.conv.6.weight"].transpose(0, 2, 3, 1)
    )
    dw = state["encoder.layers.3.conv.depthwise_conv.weight"]
    np.testing.assert_array_equal(got["encoder.layers.3.conv.depthwise_conv.weight"], dw.transpose(0, 2, 1))
    pw = state["encoder.layers.1.conv.pointwise_conv2.weight"]
    np.testing.assert_array_equal(got["encoder.layers.1.conv.pointwise_conv2.weight"], pw[:, :, 0])
    np.testing.assert_array_equal(got["preprocessor.fb"], state["preprocessor.featurizer.fb"][0])
    np.testing.assert_array_equal(
        got["decoder.embedding.token_embedding.weight"], state["log_softmax.mlp.layer0.weight"]
    )
    np.testing.assert_array_equal(got["head.bias"], state["log_softmax.mlp.layer0.bias"])
    q = "transf_decoder._decoder.layers.1.second_sub_layer.query_net.weight"
    np.testing.assert_array_equal(got["decoder.layers.1.second_sub_layer.query_net.weight"], state[q])
    np.testing.assert_array_equal(got["encoder_decoder_proj.weight"], state["encoder_decoder_proj.weight"])
    # independent of the reader: NeMo's window is torch.hann_window(400, periodic=False)
    np.testing.assert_allclose(got["preprocessor.window"], np.hanning(400), atol=1e-6)


def test_espeak_checkpoint_stores_the_tied_embedding_equal_to_the_head(espeak, tmp_path):
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(_members(espeak)["./model_weights.ckpt"])
    state, storage_types = load_state_dict(WeightsLocation(ckpt, 0, ckpt.stat().st_size))
    np.testing.assert_array_equal(
        state["transf_decoder._embedding.token_embedding.weight"], state["log_softmax.mlp.layer0.weight"]
    )
    assert set(storage_types.values()) == {"FloatStorage", "LongStorage"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_outputs_cast_weights_but_keep_buffers_float32(espeak, tmp_path, dtype):
    out = convert_nemo(espeak, tmp_path / "out", dtype=dtype)
    weights = mx.load(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    for name in ("preprocessor.fb", "preprocessor.window", "decoder.embedding.position_embedding.pos_enc"):
        assert weights[name].dtype == mx.float32
    assert weights["encoder.layers.0.self_attn.linear_q.weight"].dtype == getattr(mx, dtype)
    assert weights["decoder.embedding.token_embedding.weight"].dtype == getattr(mx, dtype)
    ref = mx.load(str(convert_nemo(espeak, tmp_path / "ref")) + "/model.safetensors")
    w = "encoder.layers.2.feed_forward1.linear1.weight"
    np.testing.assert_allclose(np.array(weights[w].astype(mx.float32)), np.array(ref[w]), rtol=1e-2, atol=1e-3)


def test_a_gzip_compressed_nemo_converts_like_a_plain_one(espeak, tmp_path):
    gz = tmp_path / "model.nemo"
    gz.write_bytes(gzip.compress(espeak.read_bytes(), compresslevel=1))
    a = mx.load(str(convert_nemo(gz, tmp_path / "a") / "model.safetensors"))
    b = mx.load(str(convert_nemo(espeak, tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_an_existing_output_dir_is_kept_unless_overwrite_is_asked(espeak, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_nemo(espeak, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_nemo(espeak, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    _assert_nothing_written(tmp_path, {"out"})


def test_a_corrupt_bundled_timestamps_model_is_left_out_with_a_clear_warning(espeak, tmp_path, caplog):
    # the main model still converts and serves, without word times (issue: a real canary-1b-v2 must not be refused
    # because of its aligner)
    members = _members(espeak)
    members["./timestamps_asr_model_config.yaml"] = b"not: [valid"
    members["./timestamps_asr_model_weights.ckpt"] = b"garbage"
    out = convert_nemo(_write_tar(tmp_path / "v2like.nemo", members), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "timestamps_ctc" not in config and not (out / "timestamps").exists()
    assert "timestamps_asr_model_config.yaml is not valid YAML" in config["notes"][0]
    assert "the bundled timestamps model was left out" in caplog.text and "no word times" in caplog.text


# ---- checkpoint reader without torch -----------------------------------------------------------------------


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_checkpoint_reader_handles_strides_offsets_shared_storages_and_dtypes(tmp_path, compression):
    base = np.arange(12, dtype=np.float32)
    bf16 = (np.array([1.5, -2.0, 3.25], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    pkl = _torch_pickle(
        [
            ("a", "FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
            ("a_t", "FloatStorage", "0", 12, 0, (4, 3), (1, 4)),  # a transposed view of the same storage
            ("tail", "FloatStorage", "0", 12, 6, (2, 3), (3, 1)),
            ("h", "HalfStorage", "1", 2, 0, (2,), (1,)),
            ("b", "BFloat16Storage", "2", 3, 0, (3,), (1,)),
            ("n", "LongStorage", "3", 1, 0, (), ()),
            ("i", "IntStorage", "4", 2, 1, (1,), (1,)),
        ]
    )
    storages = {
        "0": base.tobytes(),
        "1": np.array([0.5, 2.0], np.float16).tobytes(),
        "2": bf16.tobytes(),
        "3": np.array([7], np.int64).tobytes(),
        "4": np.array([1, 9], np.int32).tobytes(),
    }
    state, types = load_state_dict(_torch_zip(tmp_path / "w.ckpt", pkl, storages, compression))
    np.testing.assert_array_equal(state["a"], base.reshape(3, 4))
    np.testing.assert_array_equal(state["a_t"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(state["tail"], base[6:].reshape(2, 3))
    assert state["h"].dtype == np.float16 and state["h"].tolist() == [0.5, 2.0]
    assert state["b"].dtype == np.float32 and state["b"].tolist() == [1.5, -2.0, 3.25]
    assert state["n"].shape == () and int(state["n"]) == 7
    assert state["i"].tolist() == [9]
    assert types["b"] == "BFloat16Storage"


def test_a_tensor_view_past_the_end_of_its_storage_is_refused(tmp_path):
    pkl = _torch_pickle([("a", "FloatStorage", "0", 4, 2, (4,), (1,))])
    loc = _torch_zip(tmp_path / "w.ckpt", pkl, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ConversionError, match="exceeds storage"):
        load_state_dict(loc)


def test_an_unknown_storage_type_is_refused_by_name(tmp_path):
    pkl = _torch_pickle([("a", "DoubleStorage", "0", 1, 0, (1,), (1,))])
    loc = _torch_zip(tmp_path / "w.ckpt", pkl, {"0": np.zeros(1, np.float64).tobytes()})
    with pytest.raises(ConversionError, match=r"refused pickle global torch\.DoubleStorage"):
        load_state_dict(loc)


def _evil_pickle(module: str, name: str, sentinel: Path) -> bytes:
    arg = f"touch {sentinel}" if name == "system" else f"open({str(sentinel)!r}, 'w').write('pwned')"
    return b"\x80\x02" + f"c{module}\n{name}\n".encode() + b"(" + _uni(arg) + b"tR."


@pytest.mark.parametrize(("module", "name"), [("os", "system"), ("posix", "system"), ("builtins", "exec")])
def test_a_malicious_pickle_is_refused_without_running_code(tmp_path, module, name):
    sentinel = tmp_path / "pwned"
    loc = _torch_zip(tmp_path / "w.ckpt", _evil_pickle(module, name, sentinel), {})
    with pytest.raises(ConversionError, match=f"refused pickle global {module}.{name}"):
        load_state_dict(loc)
    assert not sentinel.exists()


def test_a_malicious_pickle_inside_a_nemo_is_refused_and_nothing_is_written(espeak, tmp_path):
    sentinel = tmp_path / "pwned"
    bad = _with_ckpt(espeak, tmp_path / "bad.nemo", lambda _: _evil_pickle("builtins", "exec", sentinel))
    with pytest.raises(ConversionError, match="refused pickle global builtins.exec"):
        convert_nemo(bad, tmp_path / "out")
    assert not sentinel.exists()
    _assert_nothing_written(tmp_path, {"bad.nemo"})


# ---- failure paths leave nothing behind --------------------------------------------------------------------


def test_an_unknown_state_dict_key_is_an_error_listing_every_leftover(espeak, tmp_path):
    def rename(pkl: bytes) -> bytes:
        for old, new in [
            (b"encoder.pre_encode.out.bias", b"encoder.pre_encode.out.bxas"),
            (b"encoder.layers.2.norm_out.weight", b"encoder.layers.2.norm_zzz.weight"),
        ]:
            assert pkl.count(old) == 1
            pkl = pkl.replace(old, new)
        return pkl

    bad = _with_ckpt(espeak, tmp_path / "bad.nemo", rename)
    with pytest.raises(ConversionError) as err:
        convert_nemo(bad, tmp_path / "out")
    msg = str(err.value)
    assert "2 keys match no rule" in msg
    assert "encoder.pre_encode.out.bxas" in msg and "encoder.layers.2.norm_zzz.weight" in msg
    assert "encoder.pre_encode.out.bias" in msg  # and the now-missing expected weights are listed too
    _assert_nothing_written(tmp_path, {"bad.nemo"})


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("preprocessor.normalize", "all_features", "preprocessor.normalize"),
        ("encoder.self_attention_model", "abs_pos", "encoder.self_attention_model"),
        ("transf_decoder.config_dict.hidden_act", "gelu", "transf_decoder.config_dict.hidden_act"),
        ("transf_decoder.config_dict.pre_ln", False, "transf_decoder.config_dict.pre_ln"),
        ("prompt_format", "bogus", "prompt_format"),
        ("tokenizer.type", "wpe", "tokenizer.type"),
        ("decoding.strategy", "malsd_batch", "decoding.strategy"),
        ("transf_decoder.config_dict.vocab_size", 999, "transf_decoder.config_dict.vocab_size"),
        ("prompt_defaults.0.slots.diarize", "<|diarize|>", "prompt_defaults.user.diarize"),
    ],
)
def test_an_unsupported_config_value_names_the_field_and_writes_nothing(espeak, tmp_path, path, value, field):
    def edit(cfg):
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value

    bad = _with_config(espeak, tmp_path / "bad.nemo", edit)
    with pytest.raises(ConversionError, match=f"^{re.escape(field)}: unsupported value {re.escape(repr(value))}"):
        convert_nemo(bad, tmp_path / "out")
    _assert_nothing_written(tmp_path, {"bad.nemo"})


def test_a_vocab_that_does_not_match_the_head_is_refused(espeak, tmp_path):
    def drop_en(cfg):
        del cfg["tokenizer"]["langs"]["en"]

    bad = _with_config(espeak, tmp_path / "bad.nemo", drop_en)
    with pytest.raises(ConversionError, match="vocab_size: tokenizer has"):
        convert_nemo(bad, tmp_path / "out")
    _assert_nothing_written(tmp_path, {"bad.nemo"})


def _traversal_member(kind: str, tmp_path: Path) -> tarfile.TarInfo:
    if kind == "dotdot":
        info = tarfile.TarInfo("./../evil.txt")
    elif kind == "absolute":
        info = tarfile.TarInfo(str(tmp_path / "evil_abs.txt"))
    elif kind == "symlink":
        info = tarfile.TarInfo("./evil_link")
        info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path / "evil_target")
        return info
    else:
        info = tarfile.TarInfo("./evil_dev")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        return info
    info.size = 4
    return info


@pytest.mark.parametrize(
    ("kind", "message"),
    [("dotdot", "'..'"), ("absolute", "absolute"), ("symlink", "link member"), ("device", "special member")],
)
def test_an_archive_with_unsafe_members_is_refused_and_nothing_lands_outside(espeak, tmp_path, kind, message):
    work = tmp_path / "work"
    work.mkdir()
    bad = _write_tar(work / "bad.nemo", _members(espeak), [_traversal_member(kind, tmp_path)])
    with pytest.raises(ConversionError, match=message):
        convert_nemo(bad, work / "out")
    _assert_nothing_written(tmp_path, {"work"})
    _assert_nothing_written(work, {"bad.nemo"})


def _weights_end(nemo: Path) -> int:
    with tarfile.open(nemo, "r:") as tar:
        m = tar.getmember("./model_weights.ckpt")
        return m.offset_data + m.size


@pytest.mark.parametrize("where", ["in the first header", "early", "halfway", "just before the weights end"])
def test_a_truncated_nemo_is_a_clear_error_and_writes_nothing(espeak, tmp_path, where):
    data = espeak.read_bytes()
    size = {
        "in the first header": 300,
        "early": len(data) // 50,
        "halfway": len(data) // 2,
        "just before the weights end": _weights_end(espeak) - 100,
    }[where]
    bad = tmp_path / "cut.nemo"
    bad.write_bytes(data[:size])
    with pytest.raises(ConversionError, match="truncated|corrupt"):
        convert_nemo(bad, tmp_path / "out")
    _assert_nothing_written(tmp_path, {"cut.nemo"})


def test_a_missing_source_or_bad_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(ConversionError, match="no such .nemo file"):
        convert_nemo(tmp_path / "absent.nemo", tmp_path / "out")
    with pytest.raises(ConversionError, match="dtype: unsupported value 'float64'"):
        convert_nemo(tmp_path / "absent.nemo", tmp_path / "out", dtype="float64")
    _assert_nothing_written(tmp_path, set())


def test_the_config_text_nemo_writes_for_a_released_model_converts(espeak, tmp_path):
    """What the release files say where our fixtures used to say something tidier: the recipe's literal
    `vocab_size: None` (a string in YAML), prompt defaults as tokens with a user_partial turn, greedy_batch, and
    no max_generation_delta (NeMo's default then: -1, up to max_sequence_length)."""

    def release_like(cfg):
        cfg["transf_decoder"]["config_dict"]["vocab_size"] = "None"
        cfg["prompt_defaults"] = [
            {"role": "user", "slots": {"source_lang": "<|en|>", "target_lang": "<|en|>", "pnc": "<|pnc|>",
                                       "itn": "<|noitn|>", "timestamp": "<|notimestamp|>",
                                       "diarize": "<|nodiarize|>", "emotion": "<|emo:undefined|>",
                                       "decodercontext": ""}},
            {"role": "user_partial", "slots": {"decodercontext": ""}},
        ]  # fmt: skip
        cfg["decoding"] = {"strategy": "greedy_batch", "greedy": {}}

    out = convert_nemo(_with_config(espeak, tmp_path / "release.nemo", release_like), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["decoder"]["vocab_size"] == 1408
    assert config["decoding"] == {"strategy": "greedy_batch", "beam_size": 1, "length_penalty": 0.0,
                                  "max_generation_delta": -1}  # fmt: skip
    assert config["prompt_defaults"]["pnc"] is True and config["prompt_defaults"]["itn"] is False


def test_a_prompt_masked_in_training_is_recorded_and_said_at_conversion(espeak, tmp_path):
    """NeMo's use_loss_mask_for_prompt: true leaves the language slot untrained: config.json says so (and only
    then), the summary `convert` prints says detection is off, and a directory without the field loads as trained."""
    from canary_server.convert.summary import summary
    from canary_server.model.config import ModelConfig

    def masked(cfg):
        cfg["use_loss_mask_for_prompt"] = True

    out = convert_nemo(_with_config(espeak, tmp_path / "masked.nemo", masked), tmp_path / "masked")
    config = json.loads((out / "config.json").read_text())
    assert config["prompt_loss_masked"] is True and ModelConfig.from_dict(config).prompt_loss_masked
    assert any(line.startswith("language detection: none: trained with its prompt masked") for line in summary(out))
    plain = convert_nemo(espeak, tmp_path / "plain")
    config = json.loads((plain / "config.json").read_text())
    assert "prompt_loss_masked" not in config and not ModelConfig.from_dict(config).prompt_loss_masked


def test_a_checkpoint_of_another_model_class_is_refused_by_its_class_name(espeak, tmp_path):
    def qwen(cfg):
        cfg["target"] = "nemo.collections.speechlm2.models.salm.SALM"
        del cfg["tokenizer"]

    bad = _with_config(espeak, tmp_path / "canary-qwen-2.5b.nemo", qwen)
    with pytest.raises(ConversionError, match=r"SALM .*speech-LLM.* is not a Canary model.*EncDecMultiTaskModel"):
        convert_nemo(bad, tmp_path / "out")
    _assert_nothing_written(tmp_path, {"canary-qwen-2.5b.nemo"})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_streaming_writer_writes_what_mlx_writes_for_the_cast_weights(tmp_path, dtype):
    from canary_server.convert import write

    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 5)).astype(np.float32) * 1e3
    tensors = {
        "w": base,
        "w_t": base.T,  # a non-contiguous view, as the mapping's transposes are
        "preprocessor.fb": rng.standard_normal((4, 3)).astype(np.float32),  # FLOAT32_KEYS stay float32
        "steps": np.arange(3, dtype=np.int64),
    }
    released = []
    write.stream_weights(tmp_path, tensors, dtype, "streamed.safetensors", after_each=released.append)
    write.write_weights(tmp_path, write.cast_weights(tensors, dtype), "mlx.safetensors")
    streamed, reference = mx.load(str(tmp_path / "streamed.safetensors")), mx.load(str(tmp_path / "mlx.safetensors"))
    assert streamed.keys() == reference.keys() and len(released) == len(tensors)
    for key, value in reference.items():
        assert streamed[key].dtype == value.dtype and streamed[key].shape == value.shape, key
        assert np.array_equal(np.array(streamed[key].astype(mx.float32)), np.array(value.astype(mx.float32))), key
