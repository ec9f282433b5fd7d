"""NeMo state-dict names -> MLX names (ARCHITECTURE.md "Weight names"), as a pure table.

Every key must match a rule; leftovers, missing keys and wrong shapes are one error that lists them all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import numpy as np

from .errors import ConversionError

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _conv2d_nhwc(w: np.ndarray) -> np.ndarray:
    return w.transpose(0, 2, 3, 1)  # torch (O, I, kh, kw) -> MLX (O, kh, kw, I)


def _pointwise(w: np.ndarray) -> np.ndarray:
    return w[:, :, 0]  # Conv1d k=1 (O, I, 1) -> Linear (O, I)


def _depthwise(w: np.ndarray) -> np.ndarray:
    return w.transpose(0, 2, 1)  # torch (D, 1, K) -> MLX conv1d (D, K, 1), groups=D


def _fb(w: np.ndarray) -> np.ndarray:
    return w[0]  # (1, F, n_fft/2+1) -> (F, n_fft/2+1)


_ENC = r"encoder\.layers\.(\d+)\."
_DEC = r"transf_decoder\._decoder\.layers\.(\d+)\."
_AFFINE = r"(weight|bias)"
_ATT = r"(query_net|key_net|value_net|out_projection)\." + _AFFINE

# (NeMo key regex, MLX name template using \1.. groups, transform); the preprocessor and encoder rules are shared
# with the timestamps CTC model (same module classes, same names).
FRONTEND_RULES: list[tuple[str, str, Transform]] = [
    (r"preprocessor\.featurizer\.window", "preprocessor.window", _same),
    (r"preprocessor\.featurizer\.fb", "preprocessor.fb", _fb),
    (r"encoder\.pre_encode\.conv\.([0256])\.weight", r"encoder.pre_encode.conv.\1.weight", _conv2d_nhwc),
    (r"encoder\.pre_encode\.conv\.([36])\.weight", r"encoder.pre_encode.conv.\1.weight", _conv2d_nhwc),
    (r"encoder\.pre_encode\.conv\.([02356])\.bias", r"encoder.pre_encode.conv.\1.bias", _same),
    (r"encoder\.pre_encode\.out\." + _AFFINE, r"encoder.pre_encode.out.\1", _same),
    (
        _ENC + r"(norm_feed_forward[12]|norm_conv|norm_self_att|norm_out)\." + _AFFINE,
        r"encoder.layers.\1.\2.\3",
        _same,
    ),
    (_ENC + r"(feed_forward[12]\.linear[12])\." + _AFFINE, r"encoder.layers.\1.\2.\3", _same),
    (_ENC + r"self_attn\.(linear_[qkv]|linear_out)\." + _AFFINE, r"encoder.layers.\1.self_attn.\2.\3", _same),
    (_ENC + r"self_attn\.linear_pos\.weight", r"encoder.layers.\1.self_attn.linear_pos.weight", _same),
    (_ENC + r"self_attn\.(pos_bias_[uv])", r"encoder.layers.\1.self_attn.\2", _same),
    (_ENC + r"conv\.(pointwise_conv[12])\.weight", r"encoder.layers.\1.conv.\2.weight", _pointwise),
    (_ENC + r"conv\.(pointwise_conv[12])\.bias", r"encoder.layers.\1.conv.\2.bias", _same),
    (_ENC + r"conv\.depthwise_conv\.weight", r"encoder.layers.\1.conv.depthwise_conv.weight", _depthwise),
    (_ENC + r"conv\.depthwise_conv\.bias", r"encoder.layers.\1.conv.depthwise_conv.bias", _same),
    (
        _ENC + r"conv\.batch_norm\.(weight|bias|running_mean|running_var)",
        r"encoder.layers.\1.conv.batch_norm.\2",
        _same,
    ),
]
RULES: list[tuple[str, str, Transform]] = FRONTEND_RULES + [
    (r"encoder_decoder_proj\." + _AFFINE, r"encoder_decoder_proj.\1", _same),
    # NeMo ties embedding and head; the head weight is loaded last, so it wins for both (reference 4.3).
    (r"log_softmax\.mlp\.layer0\.weight", "decoder.embedding.token_embedding.weight", _same),
    (r"log_softmax\.mlp\.layer0\.bias", "head.bias", _same),
    (
        r"transf_decoder\._embedding\.position_embedding\.pos_enc",
        "decoder.embedding.position_embedding.pos_enc",
        _same,
    ),
    (r"transf_decoder\._embedding\.layer_norm\." + _AFFINE, r"decoder.embedding.layer_norm.\1", _same),
    (_DEC + r"(layer_norm_[123])\." + _AFFINE, r"decoder.layers.\1.\2.\3", _same),
    (_DEC + r"(first_sub_layer|second_sub_layer)\." + _ATT, r"decoder.layers.\1.\2.\3.\4", _same),
    (
        _DEC + r"third_sub_layer\.(dense_in|dense_out)\." + _AFFINE,
        r"decoder.layers.\1.third_sub_layer.\2.\3",
        _same,
    ),
    (r"transf_decoder\._decoder\.final_layer_norm\." + _AFFINE, r"decoder.final_layer_norm.\1", _same),
]

# NeMo keys deliberately not converted, with the reason.
DROPS: list[tuple[str, str]] = [
    (_ENC + r"conv\.batch_norm\.num_batches_tracked", "BatchNorm training counter, unused at inference"),
    (
        r"transf_decoder\._embedding\.token_embedding\.weight",
        "tied: NeMo loads log_softmax.mlp.layer0.weight into it, so that key serves both (reference 4.3)",
    ),
]

# The timestamps CTC model (NeMo EncDecCTCModelBPE): frontend + ConvASRDecoder, a Conv1d k=1 to vocab + blank.
CTC_RULES: list[tuple[str, str, Transform]] = FRONTEND_RULES + [
    (r"decoder\.decoder_layers\.0\.weight", "decoder.weight", _pointwise),
    (r"decoder\.decoder_layers\.0\.bias", "decoder.bias", _same),
]
CTC_DROPS: list[tuple[str, str]] = DROPS[:1]  # BatchNorm counters

# Buffers the model needs in float32 whatever --dtype says.
FLOAT32_KEYS = frozenset({"preprocessor.fb", "preprocessor.window", "decoder.embedding.position_embedding.pos_enc"})

_COMPILED_RULES = [(re.compile(p), t, f) for p, t, f in RULES]
_COMPILED_DROPS = [re.compile(p) for p, _ in DROPS]
_COMPILED_CTC_RULES = [(re.compile(p), t, f) for p, t, f in CTC_RULES]
_COMPILED_CTC_DROPS = [re.compile(p) for p, _ in CTC_DROPS]
_COMPILED_FRONTEND_RULES = [(re.compile(p), t, f) for p, t, f in FRONTEND_RULES]

TIED_HEAD = "log_softmax.mlp.layer0.weight"
TIED_EMBEDDING = "transf_decoder._embedding.token_embedding.weight"


def _subsampled(features: int, factor: int) -> int:
    for _ in range(factor.bit_length() - 1):
        features = (features + 2 * 1 - 3) // 2 + 1  # Conv2d k=3, stride 2, padding 1
    return features


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every MLX weight name and shape that a converted directory with this config.json must hold."""
    enc, dec = config["encoder"], config["decoder"]
    d, h, inner, v = enc["d_model"], dec["hidden_size"], dec["inner_size"], dec["vocab_size"]
    s = _frontend_shapes(config)
    if config["enc_dec_proj"]:
        s |= {"encoder_decoder_proj.weight": (h, d), "encoder_decoder_proj.bias": (h,)}
    s |= {
        "decoder.embedding.token_embedding.weight": (v, h),
        "head.bias": (v,),
        "decoder.embedding.position_embedding.pos_enc": (dec["max_sequence_length"], h),
        "decoder.embedding.layer_norm.weight": (h,),
        "decoder.embedding.layer_norm.bias": (h,),
        "decoder.final_layer_norm.weight": (h,),
        "decoder.final_layer_norm.bias": (h,),
    }
    for m in range(dec["num_layers"]):
        p = f"decoder.layers.{m}."
        s |= {f"{p}layer_norm_{i}.{a}": (h,) for i in (1, 2, 3) for a in ("weight", "bias")}
        for sub in ("first_sub_layer", "second_sub_layer"):
            for proj in ("query_net", "key_net", "value_net", "out_projection"):
                s |= {f"{p}{sub}.{proj}.weight": (h, h), f"{p}{sub}.{proj}.bias": (h,)}
        s |= {
            f"{p}third_sub_layer.dense_in.weight": (inner, h),
            f"{p}third_sub_layer.dense_in.bias": (inner,),
        }
        s |= {f"{p}third_sub_layer.dense_out.weight": (h, inner), f"{p}third_sub_layer.dense_out.bias": (h,)}
    return s


def ctc_expected_shapes(ctc: dict) -> dict[str, tuple[int, ...]]:
    """The same for the timestamps CTC model (config.json `timestamps_ctc`)."""
    classes = ctc["vocab_size"] + 1  # + blank, the last class
    return _frontend_shapes(ctc) | {"decoder.weight": (classes, ctc["encoder"]["d_model"]), "decoder.bias": (classes,)}


def _frontend_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Preprocessor and encoder weights (shared by the Canary and the CTC model)."""
    pre, enc = config["preprocessor"], config["encoder"]
    d, c, k = enc["d_model"], enc["subsampling_conv_channels"], enc["conv_kernel_size"]
    ff, dk = d * enc["ff_expansion_factor"], d // enc["n_heads"]
    s: dict[str, tuple[int, ...]] = {
        "preprocessor.window": (pre["win_length"],),
        "preprocessor.fb": (pre["features"], pre["n_fft"] // 2 + 1),
        "encoder.pre_encode.conv.0.weight": (c, 3, 3, 1),
        "encoder.pre_encode.conv.2.weight": (c, 3, 3, 1),
        "encoder.pre_encode.conv.3.weight": (c, 1, 1, c),
        "encoder.pre_encode.conv.5.weight": (c, 3, 3, 1),
        "encoder.pre_encode.conv.6.weight": (c, 1, 1, c),
        **{f"encoder.pre_encode.conv.{i}.bias": (c,) for i in (0, 2, 3, 5, 6)},
        "encoder.pre_encode.out.weight": (d, c * _subsampled(enc["feat_in"], enc["subsampling_factor"])),
        "encoder.pre_encode.out.bias": (d,),
    }
    use_bias = enc.get("use_bias", True)  # False: the layers' Linear and conv layers have no bias (norms keep theirs)

    def layer(name: str, out_shape: tuple[int, ...], in_dims: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        weights = {f"{name}.weight": (*out_shape, *in_dims)}
        return weights | ({f"{name}.bias": out_shape} if use_bias else {})

    for n in range(enc["n_layers"]):
        p = f"encoder.layers.{n}."
        for norm in ("norm_feed_forward1", "norm_conv", "norm_self_att", "norm_feed_forward2", "norm_out"):
            s |= {f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)}
        for ffn in ("feed_forward1", "feed_forward2"):
            s |= layer(f"{p}{ffn}.linear1", (ff,), (d,)) | layer(f"{p}{ffn}.linear2", (d,), (ff,))
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            s |= layer(f"{p}self_attn.{lin}", (d,), (d,))
        s |= {f"{p}self_attn.linear_pos.weight": (d, d)}
        s |= {
            f"{p}self_attn.pos_bias_u": (enc["n_heads"], dk),
            f"{p}self_attn.pos_bias_v": (enc["n_heads"], dk),
        }
        s |= layer(f"{p}conv.pointwise_conv1", (2 * d,), (d,)) | layer(f"{p}conv.depthwise_conv", (d,), (k, 1))
        s |= {f"{p}conv.batch_norm.{b}": (d,) for b in ("weight", "bias", "running_mean", "running_var")}
        s |= layer(f"{p}conv.pointwise_conv2", (d,), (d,))
    return s


def map_key(key: str, rules=_COMPILED_RULES, drops=_COMPILED_DROPS) -> tuple[str, Transform] | None:
    """The MLX name and transform for a NeMo key; None for a dropped key; KeyError if no rule matches."""
    for pattern, template, transform in rules:
        if m := pattern.fullmatch(key):
            return m.expand(template), transform
    if any(p.fullmatch(key) for p in drops):
        return None
    raise KeyError(key)


def log_tied(state: dict[str, np.ndarray]) -> bool | None:
    """Log whether the stored embedding equals the head weight (NeMo uses the head for both anyway)."""
    if TIED_HEAD not in state or TIED_EMBEDDING not in state:
        return None
    a, b = state[TIED_HEAD], state[TIED_EMBEDDING]
    equal = a.shape == b.shape and bool(np.array_equal(a, b))
    log.info("token_embedding %s log_softmax.mlp.layer0.weight", "equals" if equal else "DIFFERS from")
    return equal


def map_state_dict(state: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """Rename and re-layout every NeMo tensor; raise listing all unmatched, missing and mis-shaped keys."""
    out = _map(state, expected_shapes(config), _COMPILED_RULES, _COMPILED_DROPS, "state dict")
    log_tied(state)
    return out


def map_ctc_state_dict(state: dict[str, np.ndarray], ctc_config: dict) -> dict[str, np.ndarray]:
    """The same for the timestamps CTC model (`timestamps_asr_model_weights.ckpt`)."""
    expected = ctc_expected_shapes(ctc_config)
    return _map(state, expected, _COMPILED_CTC_RULES, _COMPILED_CTC_DROPS, "timestamps model state dict")


def map_frontend_state_dict(state: dict, config: dict, what: str = "state dict") -> dict:
    """Preprocessor and encoder tensors alone (canary-qwen-2.5b's perception, convert/salm.py): `config` holds the
    config.json `preprocessor` and `encoder` sections. Values only need `.shape` and the transforms' indexing."""
    return _map(state, _frontend_shapes(config), _COMPILED_FRONTEND_RULES, _COMPILED_CTC_DROPS, what)


def _map(state: dict[str, np.ndarray], expected: dict, rules, drops, what: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        try:
            mapped = map_key(key, rules, drops)
        except KeyError:
            unmatched.append(key)
            continue
        if mapped is not None:
            name, transform = mapped
            if name in out:
                raise ConversionError(f"{what}: two NeMo keys map to {name}")
            out[name] = transform(value)
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(out[k].shape)} != expected {expected[k]}"
        for k in set(out) & set(expected)
        if tuple(out[k].shape) != expected[k]
    )
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} keys match no rule: {', '.join(sorted(unmatched))}")
    if missing:
        problems.append(f"{len(missing)} expected weights missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} weights the config does not expect: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes)}")
    if problems:
        raise ConversionError(f"{what}: " + " | ".join(problems))
    return out
