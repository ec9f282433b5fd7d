"""NeMo `model_config.yaml` -> `config.json` (ARCHITECTURE.md schema).

Any value the MLX model does not implement is refused, naming the field and the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from .errors import ConversionError

FORMAT_VERSION = 1
_NEMO_REF = "nemo:"
_LANG_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_MISSING = object()


def _get(cfg: dict, dotted: str, default: Any = _MISSING) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise ConversionError(f"{dotted}: missing from model_config.yaml")
            return default
        node = node[part]
    return node


def _require(field: str, value: Any, supported: Iterable[Any]) -> Any:
    supported = list(supported)
    if value not in supported or isinstance(value, bool) != isinstance(supported[0], bool):
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: {', '.join(map(repr, supported))})")
    return value


def _int(field: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: an integer >= {minimum})")
    return value


def _float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: a number)")
    return float(value)


def _target(field: str, value: Any, *suffixes: str) -> None:
    if not isinstance(value, str) or not any(value == s or value.endswith("." + s) for s in suffixes):
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: {', '.join(suffixes)})")


# ---- tokenizer ---------------------------------------------------------------------------------------------


def _member(field: str, ref: Any) -> str:
    if not isinstance(ref, str) or not ref.startswith(_NEMO_REF):
        raise ConversionError(f"{field}: unsupported value {ref!r} (supported: a 'nemo:<file>' archive reference)")
    return ref[len(_NEMO_REF) :]


def tokenizer_sources(cfg: dict) -> tuple[str, list[tuple[str, str]]]:
    """("aggregate" | "unified", [(name, archive member of its SentencePiece .model)]), in config order."""
    tok = _get(cfg, "tokenizer")
    kind = _require("tokenizer.type", _get(cfg, "tokenizer.type"), ["agg", "bpe"])
    custom = _get(cfg, "tokenizer.custom_tokenizer._target_", None)
    if kind == "bpe":
        _target("tokenizer.custom_tokenizer._target_", custom, "CanaryBPETokenizer")
        return "unified", [("", _member("tokenizer.model_path", tok.get("model_path")))]
    if custom is not None:
        _target("tokenizer.custom_tokenizer._target_", custom, "CanaryTokenizer")
    langs = tok.get("langs")
    if not isinstance(langs, dict) or not langs:
        raise ConversionError(f"tokenizer.langs: unsupported value {langs!r} (supported: a mapping of languages)")
    if next(iter(langs)) != "spl_tokens":
        raise ConversionError(f"tokenizer.langs: unsupported value {list(langs)} (supported: spl_tokens first)")
    sources = []
    for name, sub in langs.items():
        if not isinstance(name, str) or not _LANG_NAME.match(name):
            raise ConversionError(f"tokenizer.langs: unsupported language name {name!r}")
        _require(f"tokenizer.langs.{name}.type", _get(sub, "type"), ["bpe"])
        sources.append((name, _member(f"tokenizer.langs.{name}.model_path", _get(sub, "model_path"))))
    return "aggregate", sources


def tokenizer_members(cfg: dict) -> list[str]:
    return [member for _, member in tokenizer_sources(cfg)[1]]


def _tokenizer_json(cfg: dict) -> dict:
    kind, sources = tokenizer_sources(cfg)
    if kind == "unified":
        return {"type": "unified", "file": "tokenizer.model"}
    return {"type": "aggregate", "langs": [{"name": n, "file": f"tokenizer.{n}.model"} for n, _ in sources]}


def tokenizer_filenames(cfg: dict) -> dict[str, str]:
    """Archive member -> file name in the converted directory."""
    kind, sources = tokenizer_sources(cfg)
    if kind == "unified":
        return {sources[0][1]: "tokenizer.model"}
    return {member: f"tokenizer.{name}.model" for name, member in sources}


# ---- sections ----------------------------------------------------------------------------------------------


def _preprocessor(cfg: dict, sample_rate: int) -> dict:
    p = _get(cfg, "preprocessor")
    _target("preprocessor._target_", p.get("_target_"), "AudioToMelSpectrogramPreprocessor")
    _require("preprocessor.sample_rate", p.get("sample_rate", 16000), [sample_rate])
    _require("preprocessor.normalize", p.get("normalize", "per_feature"), ["per_feature"])
    _require("preprocessor.window", p.get("window", "hann"), ["hann"])
    _require("preprocessor.log", p.get("log", True), [True])
    _require("preprocessor.log_zero_guard_type", p.get("log_zero_guard_type", "add"), ["add"])
    _require("preprocessor.mel_norm", p.get("mel_norm", "slaney"), ["slaney"])
    _require("preprocessor.frame_splicing", p.get("frame_splicing", 1), [1])
    _require("preprocessor.exact_pad", p.get("exact_pad", False), [False])
    _require("preprocessor.lowfreq", p.get("lowfreq", 0), [0])
    _require("preprocessor.highfreq", p.get("highfreq"), [None, sample_rate / 2])
    _require("preprocessor.stft_exact_pad", p.get("stft_exact_pad", False), [False])
    _require("preprocessor.stft_conv", p.get("stft_conv", False), [False])
    n_fft = _int("preprocessor.n_fft", p.get("n_fft", 512))
    win = int(_float("preprocessor.window_size", p.get("window_size", 0.02)) * sample_rate)
    hop = int(_float("preprocessor.window_stride", p.get("window_stride", 0.01)) * sample_rate)
    if not 0 < win <= n_fft:
        raise ConversionError(f"preprocessor.window_size: unsupported value {p.get('window_size')} (window > n_fft)")
    return {
        "features": _int("preprocessor.features", p.get("features", 64)),
        "n_fft": n_fft,
        "win_length": win,
        "hop_length": _int("preprocessor.window_stride", hop),
        "preemph": _float("preprocessor.preemph", p.get("preemph", 0.97)),
        "log_zero_guard_value": _float("preprocessor.log_zero_guard_value", p.get("log_zero_guard_value", 2**-24)),
        "mag_power": _float("preprocessor.mag_power", p.get("mag_power", 2.0)),
        "pad_to": _int("preprocessor.pad_to", p.get("pad_to", 16), minimum=0),
        "pad_value": _float("preprocessor.pad_value", p.get("pad_value", 0.0)),
    }


def _encoder(cfg: dict, features: int) -> dict:
    e = _get(cfg, "encoder")
    _target("encoder._target_", e.get("_target_"), "ConformerEncoder")
    d_model = _int("encoder.d_model", _get(e, "d_model"))
    _require("encoder.feat_in", _get(e, "feat_in"), [features])
    _require("encoder.feat_out", e.get("feat_out", -1), [-1])
    _require("encoder.subsampling", e.get("subsampling", "striding"), ["dw_striding"])
    _require("encoder.subsampling_factor", e.get("subsampling_factor", 4), [8])
    _require("encoder.causal_downsampling", e.get("causal_downsampling", False), [False])
    _require("encoder.self_attention_model", e.get("self_attention_model", "rel_pos"), ["rel_pos"])
    _require("encoder.untie_biases", e.get("untie_biases", True), [True])
    use_bias = _require("encoder.use_bias", e.get("use_bias", True), [True, False])
    _require("encoder.conv_norm_type", e.get("conv_norm_type", "batch_norm"), ["batch_norm"])
    _require("encoder.conv_context_size", e.get("conv_context_size"), [None])
    _require("encoder.att_context_size", list(e.get("att_context_size") or [-1, -1]), [[-1, -1]])
    _require("encoder.att_context_style", e.get("att_context_style", "regular"), ["regular"])
    _require("encoder.global_tokens", e.get("global_tokens", 0), [0])
    _require("encoder.reduction", e.get("reduction"), [None])
    channels = e.get("subsampling_conv_channels", -1)
    kernel = _int("encoder.conv_kernel_size", e.get("conv_kernel_size", 31))
    if kernel % 2 == 0:
        raise ConversionError(f"encoder.conv_kernel_size: unsupported value {kernel} (supported: odd sizes)")
    n_heads = _int("encoder.n_heads", e.get("n_heads", 4))
    if d_model % n_heads:
        raise ConversionError(f"encoder.n_heads: unsupported value {n_heads} (must divide d_model {d_model})")
    return {
        "feat_in": features,
        "n_layers": _int("encoder.n_layers", _get(e, "n_layers")),
        "d_model": d_model,
        "n_heads": n_heads,
        "ff_expansion_factor": _int("encoder.ff_expansion_factor", e.get("ff_expansion_factor", 4)),
        "conv_kernel_size": kernel,
        "subsampling_factor": 8,
        "subsampling_conv_channels": d_model if channels == -1 else _int("encoder.subsampling_conv_channels", channels),
        "pos_emb_max_len": _int("encoder.pos_emb_max_len", e.get("pos_emb_max_len", 5000)),
        "xscaling": _require("encoder.xscaling", e.get("xscaling", True), [True, False]),
        "use_bias": use_bias,  # false: no bias in the layers' Linear and conv layers (canary-1b-v2's CTC aligner)
    }


def _decoder(cfg: dict, vocab_size: int) -> dict:
    _require("transf_encoder.num_layers", _get(cfg, "transf_encoder.num_layers", 0), [0])
    t = _get(cfg, "transf_decoder")
    _target("transf_decoder._target_", t.get("_target_"), "get_nemo_transformer")
    _require("transf_decoder.model_name", t.get("model_name"), [None])
    _require("transf_decoder.pretrained", t.get("pretrained", False), [False])
    _require("transf_decoder.pre_ln_final_layer_norm", t.get("pre_ln_final_layer_norm", True), [True])
    c = _get(t, "config_dict")
    f = "transf_decoder.config_dict."
    _require(f + "pre_ln", c.get("pre_ln", False), [True])
    _require(f + "hidden_act", c.get("hidden_act", "relu"), ["relu"])
    _require(f + "learn_positional_encodings", c.get("learn_positional_encodings", False), [False])
    _require(f + "num_token_types", c.get("num_token_types", 0), [0])
    # A recipe-built model saves the recipe's literal `vocab_size: None` (a YAML *string*): NeMo sets the real size on
    # a copy of the config and writes back only head.num_classes (real-checkpoints.md §1). The size comes from the
    # head's rows; a number here must agree with them.
    _require(f + "vocab_size", _none(c.get("vocab_size")), [None, vocab_size])
    hidden = _int(f + "hidden_size", _get(c, "hidden_size"))
    heads = _int(f + "num_attention_heads", _get(c, "num_attention_heads"))
    if hidden % heads:
        raise ConversionError(f"{f}num_attention_heads: unsupported value {heads} (must divide {hidden})")
    h = _get(cfg, "head")
    _target("head._target_", h.get("_target_"), "TokenClassifier")
    _require("head.num_layers", h.get("num_layers", 1), [1])
    _require("head.log_softmax", h.get("log_softmax", True), [True])
    _require("head.hidden_size", h.get("hidden_size", hidden), [hidden])
    _require("head.num_classes", _none(h.get("num_classes")), [None, vocab_size])
    return {
        "num_layers": _int(f + "num_layers", _get(c, "num_layers")),
        "hidden_size": hidden,
        "inner_size": _int(f + "inner_size", _get(c, "inner_size")),
        "num_attention_heads": heads,
        "max_sequence_length": _int(f + "max_sequence_length", _get(c, "max_sequence_length")),
        "vocab_size": vocab_size,
    }


def _none(value: Any) -> Any:
    """YAML `None` is the string 'None' (only null / ~ / empty are null); NeMo's recipes write the former."""
    return None if value == "None" else value


def _decoding(cfg: dict) -> dict:
    """The checkpoint's decoding section, as NeMo 3.0.0's MultiTaskDecoding reads it (multitask_decoding.py):
    `greedy` / `greedy_batch` read the `greedy` section, `beam` the `beam` section; missing keys take NeMo's
    defaults (beam_size 1, max_generation_delta -1 = up to the decoder's max_sequence_length). NeMo reads
    `length_penalty` and ignores the configured `len_pen` (reference 6.1), so `len_pen` is kept for display only."""
    d = cfg.get("decoding") or {}
    strategy = _require("decoding.strategy", d.get("strategy", "beam"), ["beam", "greedy", "greedy_batch"])
    key = "beam" if strategy == "beam" else "greedy"
    section = d.get(key) or {}
    beam_size = _int(f"decoding.{key}.beam_size", section.get("beam_size", 1)) if key == "beam" else 1
    out = {
        "strategy": strategy,
        "beam_size": beam_size,
        "length_penalty": _float(f"decoding.{key}.length_penalty", section.get("length_penalty", 0.0)),
        "max_generation_delta": _int(
            f"decoding.{key}.max_generation_delta", section.get("max_generation_delta", -1), minimum=-1
        ),
    }
    if section.get("len_pen") is not None:
        out["configured_len_pen"] = _float(f"decoding.{key}.len_pen", section["len_pen"])
    return out


def _lang(field: str, value: Any) -> str:
    m = re.fullmatch(r"<\|([^|<>]+)\|>|([A-Za-z][A-Za-z0-9_-]*)", str(value))
    if m is None:
        raise ConversionError(f"{field}: unsupported value {value!r} (supported: a language like '<|en|>')")
    return m.group(1) or m.group(2)


def _flag(field: str, value: Any, yes: str, no: str) -> bool:
    """A boolean prompt slot as NeMo's prompt formatters accept it: yes/no, true/false, 1/0, or the token."""
    truthy = {True, "yes", "true", "1", yes, f"<|{yes}|>"}  # True == 1
    falsy = {False, "no", "false", "0", no, f"<|{no}|>"}  # False == 0
    v = value.lower() if isinstance(value, str) else value
    if v in truthy:
        return True
    if v in falsy:
        return False
    raise ConversionError(f"{field}: unsupported value {value!r} (supported: <|{yes}|>, <|{no}|>, yes, no)")


_EMOTIONS = ("<|emo:undefined|>", "<|emo:neutral|>", "<|emo:angry|>", "<|emo:happy|>", "<|emo:sad|>")
_TASKS = {"asr", "transcribe", "<|transcribe|>", "ast", "translate", "s2t_translation", "<|translate|>"}


def _prompt_defaults(cfg: dict) -> dict:
    """NeMo's `prompt_defaults` ([{role, slots}], slots as plain values or as tokens such as `<|en|>`, `<|pnc|>`)
    -> the defaults every request starts from. Every slot of the `user` turn is read; a default the model code
    cannot honour is refused by name. The `user_partial` turn (decoder context only) needs nothing."""
    slots: dict = {}
    for turn in cfg.get("prompt_defaults") or []:
        if isinstance(turn, dict) and turn.get("role") == "user":
            slots = dict(turn.get("slots") or {})
    f = "prompt_defaults.user."
    source = _lang(f + "source_lang", slots.pop("source_lang", "en"))
    out = {
        "source_lang": source,
        "target_lang": _lang(f + "target_lang", slots.pop("target_lang", source)),
        "pnc": _flag(f + "pnc", slots.pop("pnc", True), "pnc", "nopnc"),
        "itn": _flag(f + "itn", slots.pop("itn", False), "itn", "noitn"),
        "emotion": _require(f + "emotion", slots.pop("emotion", _EMOTIONS[0]), _EMOTIONS),
    }
    if _flag(f + "timestamp", slots.pop("timestamp", False), "timestamp", "notimestamp"):
        raise ConversionError(f"{f}timestamp: unsupported value '<|timestamp|>' (timestamps are asked for per request)")
    if _flag(f + "diarize", slots.pop("diarize", False), "diarize", "nodiarize"):
        raise ConversionError(f"{f}diarize: unsupported value '<|diarize|>' (speaker tokens are not rendered)")
    context = slots.pop("decodercontext", "") or ""
    if context:
        raise ConversionError(f"{f}decodercontext: unsupported value {context!r} (context is given per request)")
    task = slots.pop("task", slots.pop("taskname", None))  # canary (v1): derived from source vs target per request
    if task is not None and str(task).lower() not in _TASKS:
        raise ConversionError(f"{f}task: unsupported value {task!r} (supported: asr, ast or their tokens)")
    if slots:
        raise ConversionError(f"{f}{sorted(slots)[0]}: unknown prompt slot (supported: {_SLOTS})")
    return out


_SLOTS = "source_lang, target_lang, pnc, itn, emotion, timestamp, diarize, decodercontext, task"


MODEL_CLASS = "EncDecMultiTaskModel"

# canary-1b-v2's unified vocabulary has a prompt token for far more languages than it was trained on; its model card
# lists these 25 (ASR and X<->en translation). Written into config.json `languages` for a model of its shape.
CANARY_1B_V2_LANGUAGES = ("bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "hr", "hu", "it", "lt", "lv",
                          "mt", "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sv", "uk")  # fmt: skip


def check_model_class(cfg: dict) -> None:
    """Only NeMo's Canary class (EncDecMultiTaskModel) converts; anything else is refused by its class name, before
    any other check (canary-qwen-2.5b, for one, is a FastConformer feeding an LLM)."""
    target = cfg.get("target")
    if isinstance(target, str) and (target == MODEL_CLASS or target.endswith("." + MODEL_CLASS)):
        return
    name = target if isinstance(target, str) else "a model with no 'target' class in model_config.yaml"
    hint = " (canary-qwen-2.5b is a speech-LLM: a FastConformer feeding Qwen)" if "speechlm" in str(target) else ""
    raise ConversionError(
        f"model_config.yaml target: {name}{hint} is not a Canary model; canary-server converts NeMo's "
        f"{MODEL_CLASS} checkpoints (canary-1b, canary-1b-flash, canary-180m-flash, canary-1b-v2)"
    )


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """NeMo sizes the embedding and head as 8*ceil(tokenizer vocab / 8) (reference 5.1)."""
    return 8 * math.ceil(tokenizer_vocab / 8)


def build_config(
    cfg: dict,
    *,
    tokenizer_vocab: int,
    head_rows: int,
    source_file: str,
    dtype: str,
    enc_dec_proj_present: bool,
) -> dict:
    """The config.json dict for a NeMo config, given facts read from the tokenizers and the checkpoint."""
    check_model_class(cfg)
    vocab_size = padded_vocab_size(tokenizer_vocab)
    if vocab_size != head_rows:
        raise ConversionError(
            f"vocab_size: tokenizer has {tokenizer_vocab} pieces (padded {vocab_size}), "
            f"but the head has {head_rows} rows"
        )
    sample_rate = _require("sample_rate", cfg.get("sample_rate", 16000), [16000])
    preprocessor = _preprocessor(cfg, sample_rate)
    encoder = _encoder(cfg, preprocessor["features"])
    decoder = _decoder(cfg, vocab_size)
    enc_dec_proj = encoder["d_model"] != decoder["hidden_size"]
    if enc_dec_proj != enc_dec_proj_present:
        raise ConversionError(
            f"encoder_decoder_proj: checkpoint {'has' if enc_dec_proj_present else 'lacks'} it but d_model "
            f"{encoder['d_model']} vs decoder hidden_size {decoder['hidden_size']} says otherwise"
        )
    return {
        "format_version": FORMAT_VERSION,
        "model_type": "canary",
        "source": {"file": source_file, "nemo_version": str(cfg.get("nemo_version", "unknown"))},
        "dtype": dtype,
        "sample_rate": sample_rate,
        "prompt_format": _require("prompt_format", cfg.get("prompt_format"), ["canary", "canary2"]),
        "prompt_defaults": _prompt_defaults(cfg),
        "preprocessor": preprocessor,
        "encoder": encoder,
        "enc_dec_proj": enc_dec_proj,
        "decoder": decoder,
        "tokenizer": _tokenizer_json(cfg),
        "decoding": _decoding(cfg),
    } | _trained_languages(encoder, decoder, cfg)


def _trained_languages(encoder: dict, decoder: dict, cfg: dict) -> dict:
    """config.json `languages` for a canary-1b-v2-shaped model (unified tokenizer, 32 x 1024, 8 decoder layers)."""
    unified = _get(cfg, "tokenizer.type", None) == "bpe"
    shape = (encoder["n_layers"], encoder["d_model"], decoder["num_layers"])
    return {"languages": list(CANARY_1B_V2_LANGUAGES)} if unified and shape == (32, 1024, 8) else {}


# ---- timestamps CTC model (canary-1b-v2) -------------------------------------------------------------------

CTC_WEIGHTS_FILE = "timestamps/model.safetensors"


def ctc_tokenizer_members(cfg: dict) -> list[str]:
    """The SentencePiece model of the timestamps CTC model: a plain `bpe` tokenizer (the unified one, shared)."""
    _require("timestamps tokenizer.type", _get(cfg, "tokenizer.type"), ["bpe"])
    custom = _get(cfg, "tokenizer.custom_tokenizer._target_", None)
    if custom is not None:
        _target("timestamps tokenizer.custom_tokenizer._target_", custom, "CanaryBPETokenizer")
    return [_member("timestamps tokenizer.model_path", _get(cfg, "tokenizer.model_path"))]


def build_ctc_config(cfg: dict, *, tokenizer_vocab: int, head_rows: int, sample_rate: int) -> dict:
    """config.json `timestamps_ctc` for the bundled FastConformer-CTC (`timestamps_asr_model_config.yaml`).

    Field names in errors are prefixed with `timestamps_asr_model.`; the checks are those of the main encoder."""
    try:
        _target("target", cfg.get("target"), "EncDecCTCModelBPE")
        _require("sample_rate", cfg.get("sample_rate", sample_rate), [sample_rate])
        preprocessor = _preprocessor(cfg, sample_rate)
        encoder = _encoder(cfg, preprocessor["features"])
        d = _get(cfg, "decoder")
        _target("decoder._target_", d.get("_target_"), "ConvASRDecoder")
        _require("decoder.feat_in", d.get("feat_in"), [encoder["d_model"]])
        _require("decoder.num_classes", d.get("num_classes"), [tokenizer_vocab])
        _require("decoder.add_blank", d.get("add_blank", True), [True])
        if head_rows != tokenizer_vocab + 1:
            raise ConversionError(
                f"decoder: the checkpoint head has {head_rows} classes, expected {tokenizer_vocab} pieces + blank"
            )
    except ConversionError as e:
        raise ConversionError(f"timestamps_asr_model.{e}") from e
    return {
        "weights": CTC_WEIGHTS_FILE,
        "preprocessor": preprocessor,
        "encoder": encoder,
        "vocab_size": tokenizer_vocab,
        "blank_id": tokenizer_vocab,  # ConvASRDecoder appends the blank as the last class
    }
