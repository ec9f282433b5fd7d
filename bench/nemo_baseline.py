"""NeMo PyTorch baseline for bench/run.py: the same dims, the same forced decode length, the same audio.

Run with NeMo's interpreter (NeMo is never a dependency of this project):

    ../nemo-venv/bin/python bench/nemo_baseline.py --model 180m-flash --tokenizers ~/.cache/canary-bench/180m-flash

Builds an `EncDecMultiTaskModel` from a config like the espeak model's model_config.yaml scaled to the real
canary-180m-flash / canary-1b-flash dimensions (random weights: NeMo's own init), with the tokenizer files that
bench/random_model.py wrote. <|endoftext|> and <pad> get a -1000 head bias (as ours) and the generator's
`max_seq_length` is set per call so every row emits exactly round(4 * seconds) tokens (seconds of the longest item
in the batch: NeMo's batch limit is shared). Times `model.transcribe()` single-stream on 5 s, 30 s and 5 min
(the 5 min file cut with pipeline/chunking.py, all chunks in one batch), torch threads = 2, median of --repeats.
`--model tiny --seconds 2` (tokenizers from `random_model.py tiny`) is the smoke test's run (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from omegaconf import OmegaConf

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from machine_info import peak_rss_bytes  # noqa: E402
from synth import SR, speech_like  # noqa: E402

TOKENS_PER_SECOND = 4.0
SECONDS = (5.0, 30.0, 300.0)
# layers, d_model, subsampling channels; the decoder's dims (bench/random_model.py has the same table)
ENCODERS = {"180m-flash": (17, 512, 256), "1b-flash": (32, 1024, 256), "tiny": (2, 64, 32)}
DEC = {"layers": 4, "hidden": 1024, "inner": 4096, "heads": 8, "max_len": 1024}
DECODERS = {"tiny": {**DEC, "layers": 2, "hidden": 64, "inner": 256}}
LANGS = ("spl_tokens", "en", "de", "es", "fr")


def split_audio():
    """pipeline/chunking.py's split_audio, loaded by path (the package itself imports MLX)."""
    spec = importlib.util.spec_from_file_location("chunking", BENCH.parent / "pipeline" / "chunking.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["chunking"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.split_audio


def tokenizer_dirs(src: Path, work: Path) -> dict:
    """NeMo's aggregate config wants one directory per language holding tokenizer.model."""
    langs = {}
    for name in LANGS:
        d = work / f"tok_{name}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f"tokenizer.{name}.model", d / "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        (d / "vocab.txt").write_text("".join(f"{p}\n" for p, _ in pieces))  # registered as artifacts by NeMo
        (d / "tokenizer.vocab").write_text("".join(f"{p}\t{s}\n" for p, s in pieces))
        langs[name] = {"dir": str(d), "type": "bpe"}
    return langs


def make_cfg(name: str, langs: dict):
    n_layers, d_model, channels = ENCODERS[name]
    dec = DECODERS.get(name, DEC)
    h = dec["hidden"]
    slots = {"decodercontext": "", "source_lang": "<|en|>", "target_lang": "<|en|>",
             "emotion": "<|emo:undefined|>", "pnc": "<|pnc|>", "itn": "<|noitn|>", "diarize": "<|nodiarize|>",
             "timestamp": "<|notimestamp|>"}  # fmt: skip
    return OmegaConf.create({
        "sample_rate": SR,
        "prompt_format": "canary2",
        "prompt_defaults": [{"role": "user", "slots": slots},
                            {"role": "user_partial", "slots": {"decodercontext": ""}}],
        "model_defaults": {"asr_enc_hidden": d_model, "lm_enc_hidden": h, "lm_dec_hidden": h},
        "tokenizer": {"dir": None, "type": "agg", "langs": langs, "custom_tokenizer": {
            "_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer", "tokenizers": None}},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SR, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": 128, "n_fft": 512, "log": True, "frame_splicing": 1,
            "dither": 1.0e-05, "pad_to": 0, "pad_value": 0.0},
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 128, "feat_out": -1, "n_layers": n_layers, "d_model": d_model,
            "subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": channels,
            "causal_downsampling": False, "ff_expansion_factor": 4, "self_attention_model": "rel_pos",
            "n_heads": 8, "att_context_size": [-1, -1], "xscaling": False, "untie_biases": True,
            "pos_emb_max_len": 5000, "conv_kernel_size": 9, "conv_norm_type": "batch_norm",
            "conv_context_size": None, "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_emb": 0.0,
            "dropout_att": 0.0},
        "transf_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 0, "hidden_size": h, "inner_size": dec["inner"], "num_attention_heads": dec["heads"],
            "ffn_dropout": 0.0, "attn_score_dropout": 0.0, "attn_layer_dropout": 0.0, "mask_future": False,
            "pre_ln": True, "pre_ln_final_layer_norm": True},
        "transf_decoder": {
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "model_name": None, "pretrained": False, "encoder": None, "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": dec["max_len"], "num_token_types": 0, "embedding_dropout": 0.0,
                "learn_positional_encodings": False, "hidden_size": h, "inner_size": dec["inner"],
                "num_layers": dec["layers"], "num_attention_heads": dec["heads"], "ffn_dropout": 0.0,
                "attn_score_dropout": 0.0, "attn_layer_dropout": 0.0, "hidden_act": "relu", "pre_ln": True,
                "vocab_size": None}},
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1, "activation": "relu", "log_softmax": True, "hidden_size": h,
            "num_classes": None, "dropout": 0.0, "use_transformer_init": True},
        "decoding": {"strategy": "beam", "return_best_hypothesis": True,
                     "beam": {"beam_size": 1, "len_pen": 0.0, "max_generation_delta": 50}},
        "loss": {"_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
                 "label_smoothing": 0.0, "pad_id": None},
    })  # fmt: skip


def build(name: str, tokenizers: Path, work: Path):
    from nemo.collections.asr.models import EncDecMultiTaskModel

    model = EncDecMultiTaskModel(cfg=make_cfg(name, tokenizer_dirs(tokenizers, work)))
    model.eval()
    tok = model.tokenizer
    with torch.no_grad():  # never stop by itself: the decode length is forced, as in ours
        model.log_softmax.mlp.layer0.bias[[tok.eos_id, tok.pad_id]] = -1000.0
    force_length(model)
    return model


def force_length(model) -> None:
    """Wrap the generator's `_prepare_for_search` so that its max_generation_length is `gen.forced - 1`
    (NeMo then emits max_generation_length + 1 tokens per row when <|endoftext|> never wins)."""
    gen = model.decoding.decoding.beam_search
    original = gen._prepare_for_search

    def prepare(*a, **kw):
        tgt, batch_size, _ = original(*a, **kw)
        return tgt, batch_size, gen.forced - 1

    gen._prepare_for_search = prepare


def transcribe(model, audios: list[np.ndarray], seconds_for_limit: float) -> tuple[float, int]:
    """One timed transcribe() call, every row forced to round(4 * seconds_for_limit) tokens -> (s, tokens)."""
    model.decoding.decoding.beam_search.forced = max(1, round(TOKENS_PER_SECOND * seconds_for_limit))
    t0 = time.perf_counter()
    hyps = model.transcribe(audios, source_lang="en", target_lang="en", pnc="yes", batch_size=16, verbose=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(h.y_sequence) for h in hyps if getattr(h, "y_sequence", None) is not None)
    return wall, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(ENCODERS), default="180m-flash")
    ap.add_argument("--tokenizers", type=Path, required=True, help="a directory written by bench/random_model.py")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seconds", type=float, nargs="+", default=list(SECONDS), help="clip lengths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    split = split_audio()
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        model = build(args.model, args.tokenizers, Path(work))
        load_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        print(f"NeMo {args.model}: {n_params / 1e6:.1f}M parameters", file=sys.stderr, flush=True)
        transcribe(model, [speech_like(5.0, seed=100)], 5.0)  # warm-up
        rows = []
        for s in args.seconds:
            audio = speech_like(s, seed=int(s))
            chunks = [c.audio for c in split(audio, SR, 40.0)]  # our pieces: chunk_seconds, 40 by default
            limit_s = max(len(c) for c in chunks) / SR
            runs = [
                transcribe(model, chunks, limit_s) for _ in range(args.repeats if s < 300 else max(1, args.repeats - 1))
            ]
            lat = statistics.median(r[0] for r in runs)
            rows.append({"seconds": s, "latency_s": lat, "rtfx": s / lat, "tokens": runs[0][1],
                         "tokens_per_s": runs[0][1] / lat, "chunks": len(chunks),
                         "latencies_s": [r[0] for r in runs]})  # fmt: skip
            print(f"NeMo single {s:g}s: {rows[-1]['rtfx']:.1f}x, {runs[0][1]} tokens", file=sys.stderr, flush=True)
    res = {"torch": torch.__version__, "threads": args.threads, "parameters": n_params, "load_s": load_s,
           "single": rows, "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    else:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
