"""NeMo `model_config.yaml` -> `config.json` (ARCHITECTURE.md schema).

Any value the MLX model does not implement is refused, naming the field and the value. Field reads:
convert/fields.py; the tokenizer section: convert/tokenizers.py; decoding and prompt defaults: convert/prompting.py.
"""

from __future__ import annotations

import math

from .errors import ConversionError
from .fields import class_name, integer, none_string, number, require, value_at
from .prompting import decoding, prompt_defaults
from .tokenizers import tokenizer_json

FORMAT_VERSION = 1


# ---- sections ----------------------------------------------------------------------------------------------


def _preprocessor(cfg: dict, sample_rate: int) -> dict:
    p = value_at(cfg, "preprocessor")
    class_name("preprocessor._target_", p.get("_target_"), "AudioToMelSpectrogramPreprocessor")
    require("preprocessor.sample_rate", p.get("sample_rate", 16000), [sample_rate])
    require("preprocessor.normalize", p.get("normalize", "per_feature"), ["per_feature"])
    require("preprocessor.window", p.get("window", "hann"), ["hann"])
    require("preprocessor.log", p.get("log", True), [True])
    require("preprocessor.log_zero_guard_type", p.get("log_zero_guard_type", "add"), ["add"])
    require("preprocessor.mel_norm", p.get("mel_norm", "slaney"), ["slaney"])
    require("preprocessor.frame_splicing", p.get("frame_splicing", 1), [1])
    require("preprocessor.exact_pad", p.get("exact_pad", False), [False])
    require("preprocessor.lowfreq", p.get("lowfreq", 0), [0])
    require("preprocessor.highfreq", p.get("highfreq"), [None, sample_rate / 2])
    require("preprocessor.stft_exact_pad", p.get("stft_exact_pad", False), [False])
    require("preprocessor.stft_conv", p.get("stft_conv", False), [False])
    n_fft = integer("preprocessor.n_fft", p.get("n_fft", 512))
    win = int(number("preprocessor.window_size", p.get("window_size", 0.02)) * sample_rate)
    hop = int(number("preprocessor.window_stride", p.get("window_stride", 0.01)) * sample_rate)
    if not 0 < win <= n_fft:
        raise ConversionError(f"preprocessor.window_size: unsupported value {p.get('window_size')} (window > n_fft)")
    return {
        "features": integer("preprocessor.features", p.get("features", 64)),
        "n_fft": n_fft,
        "win_length": win,
        "hop_length": integer("preprocessor.window_stride", hop),
        "preemph": number("preprocessor.preemph", p.get("preemph", 0.97)),
        "log_zero_guard_value": number("preprocessor.log_zero_guard_value", p.get("log_zero_guard_value", 2**-24)),
        "mag_power": number("preprocessor.mag_power", p.get("mag_power", 2.0)),
        "pad_to": integer("preprocessor.pad_to", p.get("pad_to", 16), minimum=0),
        "pad_value": number("preprocessor.pad_value", p.get("pad_value", 0.0)),
    }


def _encoder(cfg: dict, features: int) -> dict:
    e = value_at(cfg, "encoder")
    class_name("encoder._target_", e.get("_target_"), "ConformerEncoder")
    d_model = integer("encoder.d_model", value_at(e, "d_model"))
    require("encoder.feat_in", value_at(e, "feat_in"), [features])
    require("encoder.feat_out", e.get("feat_out", -1), [-1])
    require("encoder.subsampling", e.get("subsampling", "striding"), ["dw_striding"])
    require("encoder.subsampling_factor", e.get("subsampling_factor", 4), [8])
    require("encoder.causal_downsampling", e.get("causal_downsampling", False), [False])
    require("encoder.self_attention_model", e.get("self_attention_model", "rel_pos"), ["rel_pos"])
    require("encoder.untie_biases", e.get("untie_biases", True), [True])
    use_bias = require("encoder.use_bias", e.get("use_bias", True), [True, False])
    require("encoder.conv_norm_type", e.get("conv_norm_type", "batch_norm"), ["batch_norm"])
    require("encoder.conv_context_size", e.get("conv_context_size"), [None])
    require("encoder.att_context_size", list(e.get("att_context_size") or [-1, -1]), [[-1, -1]])
    require("encoder.att_context_style", e.get("att_context_style", "regular"), ["regular"])
    require("encoder.global_tokens", e.get("global_tokens", 0), [0])
    require("encoder.reduction", e.get("reduction"), [None])
    channels = e.get("subsampling_conv_channels", -1)
    channels = d_model if channels == -1 else integer("encoder.subsampling_conv_channels", channels)
    kernel = integer("encoder.conv_kernel_size", e.get("conv_kernel_size", 31))
    if kernel % 2 == 0:
        raise ConversionError(f"encoder.conv_kernel_size: unsupported value {kernel} (supported: odd sizes)")
    n_heads = integer("encoder.n_heads", e.get("n_heads", 4))
    if d_model % n_heads:
        raise ConversionError(f"encoder.n_heads: unsupported value {n_heads} (must divide d_model {d_model})")
    return {
        "feat_in": features,
        "n_layers": integer("encoder.n_layers", value_at(e, "n_layers")),
        "d_model": d_model,
        "n_heads": n_heads,
        "ff_expansion_factor": integer("encoder.ff_expansion_factor", e.get("ff_expansion_factor", 4)),
        "conv_kernel_size": kernel,
        "subsampling_factor": 8,
        "subsampling_conv_channels": channels,
        "pos_emb_max_len": integer("encoder.pos_emb_max_len", e.get("pos_emb_max_len", 5000)),
        "xscaling": require("encoder.xscaling", e.get("xscaling", True), [True, False]),
        "use_bias": use_bias,  # false: no bias in the layers' Linear and conv layers (canary-1b-v2's CTC aligner)
    }


def frontend_sections(cfg: dict, sample_rate: int) -> tuple[dict, dict]:
    """config.json `preprocessor` and `encoder` from a config holding NeMo's `preprocessor` and `encoder` (the
    same checks as the Canary models'; canary-qwen-2.5b's `perception`, convert/salm.py)."""
    preprocessor = _preprocessor(cfg, sample_rate)
    return preprocessor, _encoder(cfg, preprocessor["features"])


def _decoder(cfg: dict, vocab_size: int) -> dict:
    require("transf_encoder.num_layers", value_at(cfg, "transf_encoder.num_layers", 0), [0])
    t = value_at(cfg, "transf_decoder")
    class_name("transf_decoder._target_", t.get("_target_"), "get_nemo_transformer")
    require("transf_decoder.model_name", t.get("model_name"), [None])
    require("transf_decoder.pretrained", t.get("pretrained", False), [False])
    require("transf_decoder.pre_ln_final_layer_norm", t.get("pre_ln_final_layer_norm", True), [True])
    c = value_at(t, "config_dict")
    f = "transf_decoder.config_dict."
    require(f + "pre_ln", c.get("pre_ln", False), [True])
    require(f + "hidden_act", c.get("hidden_act", "relu"), ["relu"])
    require(f + "learn_positional_encodings", c.get("learn_positional_encodings", False), [False])
    require(f + "num_token_types", c.get("num_token_types", 0), [0])
    # A recipe-built model saves the recipe's literal `vocab_size: None` (a YAML *string*): NeMo sets the real size on
    # a copy of the config and writes back only head.num_classes (real-checkpoints.md §1). The size comes from the
    # head's rows; a number here must agree with them.
    require(f + "vocab_size", none_string(c.get("vocab_size")), [None, vocab_size])
    hidden = integer(f + "hidden_size", value_at(c, "hidden_size"))
    heads = integer(f + "num_attention_heads", value_at(c, "num_attention_heads"))
    if hidden % heads:
        raise ConversionError(f"{f}num_attention_heads: unsupported value {heads} (must divide {hidden})")
    h = value_at(cfg, "head")
    class_name("head._target_", h.get("_target_"), "TokenClassifier")
    require("head.num_layers", h.get("num_layers", 1), [1])
    require("head.log_softmax", h.get("log_softmax", True), [True])
    require("head.hidden_size", h.get("hidden_size", hidden), [hidden])
    require("head.num_classes", none_string(h.get("num_classes")), [None, vocab_size])
    return {
        "num_layers": integer(f + "num_layers", value_at(c, "num_layers")),
        "hidden_size": hidden,
        "inner_size": integer(f + "inner_size", value_at(c, "inner_size")),
        "num_attention_heads": heads,
        "max_sequence_length": integer(f + "max_sequence_length", value_at(c, "max_sequence_length")),
        "vocab_size": vocab_size,
    }


MODEL_CLASS = "EncDecMultiTaskModel"

# canary-1b-v2's unified vocabulary has a prompt token for far more languages than it was trained on; its model card
# lists these 25 (ASR and X<->en translation). Written into config.json `languages` for a model of its shape.
CANARY_1B_V2_LANGUAGES = ("bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "hr", "hu", "it", "lt", "lv",
                          "mt", "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sv", "uk")  # fmt: skip


def check_model_class(cfg: dict) -> None:
    """Only NeMo's Canary class (EncDecMultiTaskModel) converts; anything else is refused by its class name, before
    any other check (canary-qwen-2.5b, a FastConformer feeding an LLM, converts from its hub files: convert/salm.py)."""
    target = cfg.get("target")
    if isinstance(target, str) and (target == MODEL_CLASS or target.endswith("." + MODEL_CLASS)):
        return
    name = target if isinstance(target, str) else "a model with no 'target' class in model_config.yaml"
    hint = (
        " (canary-qwen-2.5b is a speech-LLM: a FastConformer feeding Qwen; it converts from its Hugging Face "
        "directory, config.json + model.safetensors, not from a .nemo: see convert/salm.py)"
        if "speechlm" in str(target)
        else ""
    )
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
    sample_rate = require("sample_rate", cfg.get("sample_rate", 16000), [16000])
    preprocessor = _preprocessor(cfg, sample_rate)
    encoder = _encoder(cfg, preprocessor["features"])
    decoder = _decoder(cfg, vocab_size)
    enc_dec_proj = encoder["d_model"] != decoder["hidden_size"]
    if enc_dec_proj != enc_dec_proj_present:
        raise ConversionError(
            f"encoder_decoder_proj: checkpoint {'has' if enc_dec_proj_present else 'lacks'} it but d_model "
            f"{encoder['d_model']} vs decoder hidden_size {decoder['hidden_size']} says otherwise"
        )
    config = {
        "format_version": FORMAT_VERSION,
        "model_type": "canary",
        "source": {"file": source_file, "nemo_version": str(cfg.get("nemo_version", "unknown"))},
        "dtype": dtype,
        "sample_rate": sample_rate,
        "prompt_format": require("prompt_format", cfg.get("prompt_format"), ["canary", "canary2"]),
        "prompt_defaults": prompt_defaults(cfg),
        "preprocessor": preprocessor,
        "encoder": encoder,
        "enc_dec_proj": enc_dec_proj,
        "decoder": decoder,
        "tokenizer": tokenizer_json(cfg),
        "decoding": decoding(cfg),
    }
    return config | _trained_languages(encoder, decoder, cfg) | _prompt_loss(cfg)


def _prompt_loss(cfg: dict) -> dict:
    """config.json `prompt_loss_masked` (only when true): NeMo's `use_loss_mask_for_prompt` left the prompt out of
    the training loss, so the decoder never learned the source-language slot and cannot detect a language."""
    masked = require("use_loss_mask_for_prompt", cfg.get("use_loss_mask_for_prompt") or False, [True, False])
    return {"prompt_loss_masked": True} if masked else {}


def _trained_languages(encoder: dict, decoder: dict, cfg: dict) -> dict:
    """config.json `languages` for a canary-1b-v2-shaped model (unified tokenizer, 32 x 1024, 8 decoder layers)."""
    unified = value_at(cfg, "tokenizer.type", None) == "bpe"
    shape = (encoder["n_layers"], encoder["d_model"], decoder["num_layers"])
    return {"languages": list(CANARY_1B_V2_LANGUAGES)} if unified and shape == (32, 1024, 8) else {}


# ---- timestamps CTC model (canary-1b-v2) -------------------------------------------------------------------

CTC_WEIGHTS_FILE = "timestamps/model.safetensors"


def build_ctc_config(cfg: dict, *, tokenizer_vocab: int, head_rows: int, sample_rate: int) -> dict:
    """config.json `timestamps_ctc` for the bundled FastConformer-CTC (`timestamps_asr_model_config.yaml`).

    Field names in errors are prefixed with `timestamps_asr_model.`; the checks are those of the main encoder."""
    try:
        class_name("target", cfg.get("target"), "EncDecCTCModelBPE")
        require("sample_rate", cfg.get("sample_rate", sample_rate), [sample_rate])
        preprocessor = _preprocessor(cfg, sample_rate)
        encoder = _encoder(cfg, preprocessor["features"])
        d = value_at(cfg, "decoder")
        class_name("decoder._target_", d.get("_target_"), "ConvASRDecoder")
        require("decoder.feat_in", d.get("feat_in"), [encoder["d_model"]])
        require("decoder.num_classes", d.get("num_classes"), [tokenizer_vocab])
        require("decoder.add_blank", d.get("add_blank", True), [True])
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
