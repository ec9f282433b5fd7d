"""Write a converted model directory with RANDOM weights and the real dimensions of a released Canary model.

No download: the bench needs the shapes (and so the cost) of canary-180m-flash / canary-1b-flash, not their
accuracy. `tiny` (2-layer encoder and decoder of width 64, 256-piece language tokenizers) is for the smoke test of
the bench scripts (tests/test_bench_smoke.py): the same code paths in seconds. The directory has the format of
ARCHITECTURE.md (config.json + model.safetensors + tokenizer files) and loads with `model.load(dir)` (strict).

* Weights: every parameter the MLX module has, by name: linear/conv/embedding weights normal * 0.02, biases 0,
  LayerNorm and BatchNorm weights 1, running_var 1, the decoder's sinusoidal positions as NeMo computes them,
  a slaney mel filterbank and a symmetric hann window, so activations stay finite.
* Decode length: `head.bias` is -1000 on <|endoftext|> and <pad>, so the model never stops by itself; the bench
  caps every request at round(4 * seconds) tokens (see bench/serve_capped.py), i.e. the decode length is forced.
* Tokenizer (aggregate, 5248 ids): spl_tokens is the canary2 1152-piece special table (built with
  sentencepiece as NeMo's build_canary_2_special_tokenizer.py does), then en/de/es/fr SentencePiece models of
  1024 pieces each trained here on seeded synthetic text.

    .venv/bin/python bench/random_model.py 180m-flash [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from canary_server import model  # noqa: E402, I001  (first: preloads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from canary_server.model.canary import Canary  # noqa: E402
from canary_server.model.config import ModelConfig  # noqa: E402

LANGS = ("en", "de", "es", "fr")
LANG_VOCAB = 1024
SPECIAL_VOCAB = 1152  # the canary2 special-token table below
DECODER = {
    "num_layers": 4,
    "hidden_size": 1024,
    "inner_size": 4096,
    "num_attention_heads": 8,
    "max_sequence_length": 1024,
    "vocab_size": SPECIAL_VOCAB + LANG_VOCAB * len(LANGS),
}
TEXT_LINES = 20000  # synthetic sentences per language tokenizer
# Encoder dims of the released checkpoints (reference §2.6); both have the 4 x 1024 decoder above.
MODELS = {
    "180m-flash": {"encoder": {"n_layers": 17, "d_model": 512, "n_heads": 8, "subsampling_conv_channels": 256},
                   "enc_dec_proj": True},
    "1b-flash": {"encoder": {"n_layers": 32, "d_model": 1024, "n_heads": 8, "subsampling_conv_channels": 256},
                 "enc_dec_proj": False},
    "tiny": {"encoder": {"n_layers": 2, "d_model": 64, "n_heads": 8, "subsampling_conv_channels": 32},
             "enc_dec_proj": False, "lang_vocab": 256, "text_lines": 2000,
             "decoder": {"num_layers": 2, "hidden_size": 64, "inner_size": 256,
                         "vocab_size": SPECIAL_VOCAB + 256 * len(LANGS)}},
}  # fmt: skip


def decoder_dict(name: str) -> dict:
    return {**DECODER, **MODELS[name].get("decoder", {})}


DEFAULT_ROOT = Path.home() / ".cache" / "canary-bench"

# The canary2 special-token table in NeMo's order
# (scripts/speech_recognition/canary/build_canary_2_special_tokenizer.py).
GENERIC = [
    "<|endoftext|>", "<|startoftranscript|>", "<|nopnc|>", "<|pnc|>", "<|nospeech|>", "<|startofcontext|>",
    "<|itn|>", "<|noitn|>", "<|timestamp|>", "<|notimestamp|>", "<|diarize|>", "<|nodiarize|>", "<|spkchange|>",
    "<|audioseparator|>", "<|emo:undefined|>", "<|emo:neutral|>", "<|emo:happy|>", "<|emo:sad|>", "<|emo:angry|>",
]  # fmt: skip


def config_dict(name: str) -> dict:
    spec = MODELS[name]
    enc = {"feat_in": 128, "ff_expansion_factor": 4, "conv_kernel_size": 9, "subsampling_factor": 8,
           "pos_emb_max_len": 5000, "xscaling": False, **spec["encoder"]}  # fmt: skip
    return {
        "format_version": 1,
        "model_type": "canary",
        "source": {"file": f"random canary-{name} (bench/random_model.py)", "nemo_version": None},
        "dtype": "float32",
        "sample_rate": 16000,
        "prompt_format": "canary2",
        "prompt_defaults": {"source_lang": "en", "target_lang": "en", "pnc": True},
        "preprocessor": {"features": 128, "n_fft": 512, "win_length": 400, "hop_length": 160, "preemph": 0.97,
                         "log_zero_guard_value": 2.0**-24, "mag_power": 2.0, "pad_to": 0, "pad_value": 0.0},
        "encoder": enc,
        "enc_dec_proj": spec["enc_dec_proj"],
        "decoder": decoder_dict(name),
        "tokenizer": {"type": "aggregate", "langs": [{"name": n, "file": f"tokenizer.{n}.model"}
                                                      for n in ("spl_tokens", *LANGS)]},
        "decoding": {"beam_size": 1, "length_penalty": 0.0, "max_generation_delta": 50},
    }  # fmt: skip


# ---- tokenizers -----------------------------------------------------------------------------------------------
def _canary2_tokens() -> list[str]:
    langs = _iso_langs()
    tokens = GENERIC + ["<|unklang|>"] + langs  # already written "<|xx|>"
    tokens += [f"<|{i}|>" for i in range(900)] + [f"<|spk{i}|>" for i in range(16)]
    n = len(tokens) + 3
    extra = math.ceil(n / 64) * 64 - n
    return tokens + [f"<|spltoken{i}|>" for i in range(extra)]


def _iso_langs() -> list[str]:
    """The ISO code list of NeMo's build script, read from the script kept in ../shared (no NeMo import)."""
    script = REPO.parent / "shared" / "models" / "training" / "build_canary_2_special_tokenizer.py"
    ns: dict = {}
    src = script.read_text()
    start = src.index("ISO_LANGS = ")
    exec(src[start : src.index("\n]", start) + 2], ns)  # noqa: S102 - a literal list from a trusted file
    return list(ns["ISO_LANGS"])


def write_special_tokenizer(out: Path) -> None:
    """CanaryTokenizer.build_special_tokenizer + create_spt_model (NeMo 3.0.0): a unigram SPM trained on the
    tokens themselves, each a user-defined symbol, <|nospeech|> and <pad> first (NeMo's DEFAULT_TOKENS)."""
    import sentencepiece as spm

    tokens = list(dict.fromkeys(["<|nospeech|>", "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|pnc|>",
                                 "<|nopnc|>", *_canary2_tokens()]))  # fmt: skip
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokens),
        model_prefix=str(out / "tokenizer.spl_tokens"),
        vocab_size=len(tokens) + 2,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=tokens,
        minloglevel=2,
    )
    (out / "tokenizer.spl_tokens.vocab").unlink(missing_ok=True)


def synthetic_text(lang: str, lines: int = TEXT_LINES) -> list[str]:
    """Seeded pseudo-words from a per-language syllable set: enough distinct pieces for a 1024 BPE vocab."""
    rng = np.random.default_rng(sum(map(ord, lang)))
    onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "qu", "br", "tr", "pl", "gr", "st"]
    vowels = {"en": "aeiouy", "de": "aeiouäöü", "es": "aeiouáéíó", "fr": "aeiouéèà"}[lang]
    sylls = [o + v for o in onsets for v in vowels] + list(vowels)
    out = []
    for _ in range(lines):
        words = ["".join(rng.choice(sylls, rng.integers(1, 4))) for _ in range(rng.integers(4, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ",", "?", "!"]))
    return out


def write_lang_tokenizer(out: Path, lang: str, vocab: int = LANG_VOCAB, lines: int = TEXT_LINES) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_text(lang, lines)),
        model_prefix=str(out / f"tokenizer.{lang}"),
        vocab_size=vocab,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    (out / f"tokenizer.{lang}.vocab").unlink(missing_ok=True)


# ---- weights --------------------------------------------------------------------------------------------------
def slaney_mel(sr: int = 16000, n_fft: int = 512, n_mels: int = 128) -> np.ndarray:
    """librosa.filters.mel(norm="slaney", htk=False), which NeMo uses: (n_mels, n_fft // 2 + 1)."""

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        mel = f / (200.0 / 3)
        log_region = f >= 1000.0
        return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)

    def mel_to_hz(m):
        hz = m * (200.0 / 3)
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), hz)

    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower, upper = -ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def sinusoid_positions(max_len: int, hidden: int) -> np.ndarray:
    """NeMo FixedPositionalEncoding: sin on even, cos on odd channels, divided by sqrt(hidden)."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, hidden, 2, dtype=np.float64) * -(math.log(10000.0) / hidden))
    pe = np.zeros((max_len, hidden))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return (pe / math.sqrt(hidden)).astype(np.float32)


def random_weights(cfg: ModelConfig, eos_id: int, pad_id: int, seed: int = 0) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in tree_flatten(Canary(cfg).parameters())}
    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name  # norm_*, layer_norm*, final_layer_norm, batch_norm
        if name == "preprocessor.window":
            w = np.hanning(shape[0]).astype(np.float32)  # torch.hann_window(periodic=False)
        elif name == "preprocessor.fb":
            w = slaney_mel(cfg.sample_rate, cfg.preprocessor.n_fft, cfg.preprocessor.features)
        elif name.endswith("position_embedding.pos_enc"):
            w = sinusoid_positions(*shape)
        elif leaf in ("running_var",) or (is_norm and leaf == "weight"):
            w = np.ones(shape, np.float32)
        elif leaf in ("bias", "running_mean"):
            w = np.zeros(shape, np.float32)
        else:
            w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        out[name] = w
    out["head.bias"][[eos_id, pad_id]] = -1000.0  # never stop: the bench forces the decode length
    return {k: mx.array(v) for k, v in out.items()}


def build(name: str, out: Path, seed: int = 0) -> Path:
    """Write the random `name` model to `out` (skipped when a complete one is already there)."""
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_special_tokenizer(out)
    spec = MODELS[name]
    for lang in LANGS:
        write_lang_tokenizer(out, lang, spec.get("lang_vocab", LANG_VOCAB), spec.get("text_lines", TEXT_LINES))
    raw = config_dict(name)
    cfg = ModelConfig.from_dict(raw)
    tok = model.tokenizer.load_tokenizer(out, cfg.tokenizer)
    assert tok.vocab_size == raw["decoder"]["vocab_size"], tok.vocab_size
    mx.save_safetensors(str(out / "model.safetensors"), random_weights(cfg, tok.eos_id, tok.pad_id, seed))
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, help=f"default: {DEFAULT_ROOT}/<name>")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = build(args.name, args.out or DEFAULT_ROOT / args.name, args.seed)
    m = model.load(out)  # strict
    n = sum(v.size for _, v in tree_flatten(m.parameters()))
    print(f"{out}: {n / 1e6:.1f}M parameters, languages {m.languages}, vocab {m.tokenizer.vocab_size}")


if __name__ == "__main__":
    main()
