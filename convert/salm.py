"""canary-qwen-2.5b (NeMo speechlm2 `SALM`): hub `config.json` + `model.safetensors` + the LLM's config and
tokenizer files -> a converted directory (`model_type: "salm"`, ARCHITECTURE.md). No PyTorch, no pickle.

The SALM's perception (preprocessor + FastConformer) maps with the AED models' frontend rules; the LLM (a Qwen3,
PEFT-wrapped) is renamed to mlx-lm's Qwen3 names with its LoRA merged: W + (alpha / r) * B @ A on the target
Linears (PEFT's scaling, no rslora; NeMo runs the adapter un-merged, the sum is the same up to float rounding).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from canary_server.model.quantize import DEFAULT_GROUP_SIZE

from . import mapping, write
from .config import FORMAT_VERSION, frontend_sections
from .errors import ConversionError
from .fields import class_name, integer, number, require, value_at
from .quantize import check_quantization

log = logging.getLogger(__name__)

MODEL_CLASS = "SALM"
SAMPLE_RATE = 16000
# The LLM's tokenizer files a converted directory keeps (tokenizer.json is what is read; the others say how).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LLM_FILES = ("config.json", *TOKENIZER_FILES)
_LLM_PREFIXES = ("llm.base_model.model.", "llm.")  # PEFT-wrapped (LoRA un-merged) or plain
_LORA_TARGETS = {"q_proj", "v_proj"}


def is_salm_config(cfg: Path) -> bool:
    """A NeMo SALM's config.json (speechlm2 fields: `perception`, `pretrained_llm`), not a converted one."""
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "perception" in d and "pretrained_llm" in d and "format_version" not in d


def is_salm_dir(path: Path) -> bool:
    """A directory holding a NeMo SALM release (its config.json + model.safetensors)."""
    return is_salm_config(path / "config.json") and (path / "model.safetensors").is_file()


def _llm_config(llm_dir: Path) -> dict:
    try:
        c = json.loads((llm_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{llm_dir}/config.json: not readable LLM config ({e})") from e
    require("llm.model_type", c.get("model_type"), ["qwen3"])
    require("llm.hidden_act", c.get("hidden_act", "silu"), ["silu"])
    require("llm.attention_bias", c.get("attention_bias", False), [False])
    require("llm.use_sliding_window", c.get("use_sliding_window", False), [False])
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    require("llm.rope_type", rope.get("rope_type", rope.get("type", "default")), ["default"])
    theta = c.get("rope_theta", rope.get("rope_theta"))
    hidden, heads = (
        integer("llm.hidden_size", c.get("hidden_size")),
        integer("llm.num_attention_heads", c.get("num_attention_heads")),
    )
    return {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "num_hidden_layers": integer("llm.num_hidden_layers", c.get("num_hidden_layers")),
        "intermediate_size": integer("llm.intermediate_size", c.get("intermediate_size")),
        "num_attention_heads": heads,
        "num_key_value_heads": integer("llm.num_key_value_heads", c.get("num_key_value_heads", heads)),
        "head_dim": integer("llm.head_dim", c.get("head_dim") or hidden // heads),
        "rms_norm_eps": number("llm.rms_norm_eps", c.get("rms_norm_eps")),
        "rope_theta": number("llm.rope_theta", theta),
        "vocab_size": integer("llm.vocab_size", c.get("vocab_size")),
        "max_position_embeddings": integer("llm.max_position_embeddings", c.get("max_position_embeddings")),
        "tie_word_embeddings": require("llm.tie_word_embeddings", c.get("tie_word_embeddings", False), [True]),
    }


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def build_config(cfg: dict, llm_dir: Path, source: str, dtype: str) -> dict:
    """config.json (`model_type: "salm"`) from the SALM's config.json and the LLM's files; refusals name fields."""
    require("prompt_format", cfg.get("prompt_format"), ["qwen"])
    tag = value_at(cfg, "audio_locator_tag")
    perception = value_at(cfg, "perception")
    adapter = value_at(perception, "modality_adapter")
    class_name("perception.modality_adapter._target_", adapter.get("_target_"), "IdentityConnector")
    if cfg.get("encoder_chunk_size_seconds") is not None:
        raise ConversionError("encoder_chunk_size_seconds: unsupported value (chunked encoding not implemented)")
    try:
        preprocessor, encoder = frontend_sections(perception, SAMPLE_RATE)
    except ConversionError as e:
        raise ConversionError(f"perception.{e}") from e
    llm = _llm_config(llm_dir)
    require("perception.modality_adapter.d_model", adapter.get("d_model"), [encoder["d_model"]])
    require("perception.output_dim", perception.get("output_dim", llm["hidden_size"]), [llm["hidden_size"]])
    lora = cfg.get("lora")
    if lora is not None:
        lora = {
            "r": integer("lora.r", lora.get("r")),
            "alpha": number("lora.lora_alpha", lora.get("lora_alpha")),
            "targets": sorted(_lora_targets(lora)),
        }
        require("lora.use_rslora", cfg["lora"].get("use_rslora", False), [False])
        require("lora.use_dora", cfg["lora"].get("use_dora", False), [False])
    tok_cfg = json.loads((llm_dir / "tokenizer_config.json").read_text())
    return {
        "format_version": FORMAT_VERSION,
        "model_type": "salm",
        "source": {"file": source, "llm": str(cfg.get("pretrained_llm"))},
        "dtype": dtype,
        "sample_rate": SAMPLE_RATE,
        "prompt_format": "qwen",
        "audio_locator_tag": tag,
        "preprocessor": preprocessor,
        "encoder": encoder,
        "llm": llm,
        "lora_merged": lora,
        "tokenizer": {
            "file": "tokenizer.json",
            "eos_token": _token(tok_cfg.get("eos_token")),
            "pad_token": _token(tok_cfg.get("pad_token")),
        },
        "generation": {"max_new_tokens": 128},
    }


def _lora_targets(lora: dict) -> set[str]:
    targets = lora.get("target_modules")
    targets = {targets} if isinstance(targets, str) else set(targets or ())
    if not targets or not targets <= _LORA_TARGETS:
        raise ConversionError(f"lora.target_modules: unsupported value {sorted(targets)} (supported: q_proj, v_proj)")
    return targets


class _Lazy:
    """A float tensor of the release file, read and cast to float32 only when it is written (`np.asarray`), with
    the mapping's re-layouts (transpose, indexing) recorded until then: converting the 2.5 B-parameter checkpoint
    holds about one tensor in float32 at a time instead of all of them (10 GB)."""

    dtype = np.dtype(np.float32)

    def __init__(self, arr: mx.array, ops: tuple = ()) -> None:
        self.arr, self.ops = arr, ops

    def transpose(self, *axes: int) -> _Lazy:
        return _Lazy(self.arr, (*self.ops, lambda w: w.transpose(*axes)))

    def __getitem__(self, index) -> _Lazy:
        return _Lazy(self.arr, (*self.ops, lambda w: w[index]))

    def _apply(self, w: np.ndarray) -> np.ndarray:
        for op in self.ops:
            w = op(w)
        return w

    @property
    def shape(self) -> tuple[int, ...]:
        return self._apply(np.broadcast_to(np.zeros((), np.float32), self.arr.shape)).shape  # no data touched

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        w = self._apply(np.array(self.arr.astype(mx.float32)))
        return w if dtype is None else w.astype(dtype, copy=False)


def _np(value: mx.array) -> np.ndarray | _Lazy:
    return _Lazy(value) if mx.issubdtype(value.dtype, mx.floating) else np.array(value)


def map_weights(state: dict[str, mx.array], cfg: dict) -> dict[str, np.ndarray]:
    """Hub names -> our names (ARCHITECTURE.md), LoRA merged; every key accounted for, shapes checked."""
    frontend, rest = {}, {}
    for key, value in state.items():
        if key.startswith("perception.") and not key.startswith("perception.proj."):
            frontend[key.removeprefix("perception.")] = value
        else:
            rest[key] = value
    section = {"preprocessor": cfg["preprocessor"], "encoder": cfg["encoder"]}
    out = mapping.map_frontend_state_dict({k: _np(v) for k, v in frontend.items()}, section, "perception state dict")
    out |= _map_llm(rest, cfg)
    return out


def _map_llm(state: dict[str, mx.array], cfg: dict) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    lora: dict[str, np.ndarray] = {}
    unmatched = []
    for key, value in state.items():
        if key in ("perception.proj.weight", "perception.proj.bias"):
            out[key.replace("perception.", "")] = _np(value)
        elif key == "embed_tokens.weight":
            out["llm.model.embed_tokens.weight"] = _np(value)
        elif (name := _llm_name(key)) is None:
            unmatched.append(key)
        elif name.endswith("lm_head.weight"):
            continue  # tied to embed_tokens (llm.tie_word_embeddings is required true)
        elif ".lora_" in name:
            lora[name] = np.asarray(_np(value))  # small: rank x width
        else:
            out["llm." + name.replace(".base_layer.", ".")] = _np(value)
    if unmatched:
        raise ConversionError(f"state dict: {len(unmatched)} keys match no rule: {', '.join(sorted(unmatched))}")
    _merge_lora(out, lora, cfg["lora_merged"])
    _check_shapes(out, cfg)
    return out


def _llm_name(key: str) -> str | None:
    for prefix in _LLM_PREFIXES:
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return None


def _merge_lora(out: dict[str, np.ndarray], lora: dict[str, np.ndarray], spec: dict | None) -> None:
    """W += (alpha / r) * B @ A for each adapted Linear (PEFT's `default` adapter), in float32."""
    if spec is None:
        if lora:
            raise ConversionError("state dict: LoRA weights present but config.json has no `lora` section")
        return
    scaling = spec["alpha"] / spec["r"]
    pairs = {k.split(".lora_")[0] for k in lora}
    for base in sorted(pairs):
        a, b = lora.pop(f"{base}.lora_A.default.weight", None), lora.pop(f"{base}.lora_B.default.weight", None)
        target = f"llm.{base}.weight"
        if a is None or b is None or target not in out:
            raise ConversionError(f"state dict: incomplete LoRA adapter for {base} (need base_layer, lora_A, lora_B)")
        if a.shape[0] != spec["r"]:
            raise ConversionError(f"{base}.lora_A: rank {a.shape[0]} != lora.r {spec['r']}")
        out[target] = np.asarray(out[target]) + scaling * (b @ a)
    if lora:
        raise ConversionError(f"state dict: LoRA weights of another adapter: {', '.join(sorted(lora))}")
    merged = {b.rsplit(".", 1)[-1] for b in pairs}
    if merged != set(spec["targets"]):
        raise ConversionError(
            f"state dict: LoRA on {sorted(merged)}, config.json lora.target_modules says {spec['targets']}"
        )


def expected_llm_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    c = cfg["llm"]
    h, hd, f = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    s = {
        "proj.weight": (h, cfg["encoder"]["d_model"]),
        "proj.bias": (h,),
        "llm.model.embed_tokens.weight": (c["vocab_size"], h),
        "llm.model.norm.weight": (h,),
    }
    for n in range(c["num_hidden_layers"]):
        p = f"llm.model.layers.{n}."
        s |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    return s


def _check_shapes(out: dict[str, np.ndarray], cfg: dict) -> None:
    expected = expected_llm_shapes(cfg)
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    shapes = sorted(
        f"{k}: {out[k].shape} != {expected[k]}" for k in set(out) & set(expected) if tuple(out[k].shape) != expected[k]
    )
    problems = [
        f"{what}: {', '.join(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if problems:
        raise ConversionError("LLM state dict: " + " | ".join(problems))


def _quantized(arrays: dict[str, mx.array], cfg: dict) -> dict[str, mx.array]:
    """Through the model's own module, as convert/quantize.py does for Canary: the file is what `load` builds."""
    from mlx.utils import tree_flatten

    from canary_server.model.salm import SALM, SalmConfig

    model = SALM(SalmConfig.from_dict(cfg))
    model.load_weights(list(arrays.items()), strict=True)
    model.quantize(cfg["quantization"]["bits"], cfg["quantization"]["group_size"])
    out = dict(tree_flatten(model.parameters()))
    mx.eval(out)
    return out


def convert_salm(
    source: str | Path,
    out_dir: str | Path,
    llm_dir: str | Path | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    quantize: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> Path:
    """Convert a SALM release directory (config.json + model.safetensors) into a converted directory.

    `llm_dir`: the LLM's config.json + tokenizer files (Qwen/Qwen3-1.7B's); default: `pretrained_llm` of
    config.json when it names a directory (absolute or relative to SOURCE). `quantize`: the LLM's Linears only."""
    source, out_dir = Path(source), Path(out_dir).absolute()
    write.check_dtype(dtype)
    check_quantization(quantize, group_size)
    if not is_salm_dir(source):
        raise ConversionError(
            f"{source}: not a NeMo SALM directory (config.json with `perception` + model.safetensors)"
        )
    salm_cfg = json.loads((source / "config.json").read_text())
    named = str(salm_cfg.get("pretrained_llm"))
    if llm_dir is None and not (source / named).is_dir():
        raise ConversionError(
            f"{source}: its LLM's tokenizer and config ({named}) are not a local directory; pass --llm-dir DIR with "
            f"{named}'s {', '.join(LLM_FILES)}, or run `canary-server download` on the repo id, which fetches them"
        )
    llm_dir = Path(llm_dir) if llm_dir is not None else source / named
    missing = [f for f in LLM_FILES if not (llm_dir / f).is_file()]
    if missing:
        raise ConversionError(f"{llm_dir}: the LLM's {', '.join(missing)} missing ({named}'s files)")
    write.check_out_dir(out_dir, overwrite)
    cfg = build_config(salm_cfg, llm_dir, source.name, dtype)
    mapped = map_weights(mx.load(str(source / "model.safetensors")), cfg)
    with write.staging_dir(out_dir) as staging:
        if quantize is None:
            write.stream_weights(staging, mapped, dtype)
        else:
            cfg["quantization"] = {"bits": quantize, "group_size": group_size}
            write.write_weights(staging, _quantized(write.cast_weights(mapped, dtype), cfg))
        for name in TOKENIZER_FILES:
            shutil.copyfile(llm_dir / name, staging / name)
        write.write_config(staging, cfg)
        write.publish(staging, out_dir, overwrite)
    log.info("converted %s -> %s (%s%s)", source, out_dir, dtype, f", {quantize}-bit" if quantize else "")
    return out_dir
