"""NeMo PyTorch baseline of canary-qwen-2.5b (NeMo 3.0.0's speechlm2 `SALM`) for `bench/run.py --model qwen-2.5b`.

Run with NeMo's interpreter (NeMo is never a dependency of this project; `peft` must be installed there):

    ../nemo-venv/bin/python bench/nemo_salm.py --model-dir ~/.cache/canary-server/bench/qwen-2.5b

Builds NeMo's `SALM` with random weights (NeMo's / transformers' own init) and no download, at the dims of the
converted directory that bench/random_salm.py wrote for our side (its config.json: for `qwen-2.5b` canary-1b-flash's
encoder and a Qwen/Qwen3-1.7B-shaped `Qwen3Config`, 28 layers, hidden 2048, 16 / 8 heads, head_dim 128,
intermediate 6144, vocab 151936, tied embeddings), the same small tokenizer (tests/fixtures/salm/llm, plus the audio
locator tag NeMo adds), an IdentityConnector + projection, and LoRA on q_proj/v_proj (rank 128, alpha 256, as the
release; un-merged, as NeMo runs it), float32, torch threads 2. tests/fixtures/make_salm_fixtures.py builds the tiny
one the same way.

Forced decode length, as ours (bench/serve_capped.py): every row generates exactly round(4 * seconds) tokens. NeMo's
`generate()` passes `generation_config` to HF `generate()`; it gets `max_new_tokens = min_new_tokens =` that count,
so HF's MinNewTokensLengthLogitsProcessor sets `<|im_end|>`'s logit to -inf until the last one (eos impossible).

* single stream: one `generate()` per clip (5 s, 30 s; longer clips are cut with pipeline/chunking.py into pieces of
  at most 40 s, all in one batch), median of --repeats;
* concurrency c: NeMo has no server and no continuous batching; the closest a server built on its API gets is the
  c concurrent requests batched in ONE `generate()` call (same 5 s clips as bench/run.py's clients, each client's
  next request in the next call). Latency of every request in a call = that call's wall time.

`--model-dir` a tiny-salm directory (bench/random_salm.py tiny-salm) with `--seconds 2` is the smoke test's run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from nemo_baseline import split_audio  # noqa: E402

from machine_info import peak_rss_bytes  # noqa: E402
from synth import SR, speech_like  # noqa: E402

TOKENS_PER_SECOND = 4.0
TAG = "<|audioplaceholder|>"
PROMPT = f"Transcribe the following: {TAG}"  # our user turn (model/salm_prompt.py) without a request prompt
LORA = {"task_type": "CAUSAL_LM", "r": 128, "lora_alpha": 256, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"]}  # fmt: skip


def write_llm(ours: dict, src: Path, llm_dir: Path) -> None:
    """A Qwen3 config.json at our converted dir's LLM dims and its tokenizer files: what `pretrained_llm` points at."""
    from transformers import Qwen3Config

    llm = ours["llm"]
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings")  # fmt: skip
    cfg = Qwen3Config(**{k: llm[k] for k in keys}, bos_token_id=None, eos_token_id=None)
    cfg.architectures = ["Qwen3ForCausalLM"]
    llm_dir.mkdir(parents=True)
    cfg.save_pretrained(llm_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, llm_dir / f)


def salm_config(ours: dict, llm_dir: Path) -> dict:
    enc, pre = ours["encoder"], ours["preprocessor"]
    keys = ("feat_in", "n_layers", "d_model", "n_heads", "subsampling_conv_channels", "subsampling_factor",
            "ff_expansion_factor", "conv_kernel_size", "pos_emb_max_len", "xscaling")  # fmt: skip
    return {
        "pretrained_llm": str(llm_dir), "pretrained_asr": "nvidia/canary-1b-flash", "pretrained_weights": False,
        "audio_locator_tag": TAG, "prompt_format": "qwen", "freeze_params": [], "prevent_freeze_params": [],
        "lora": LORA,
        "perception": {
            "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
            "output_dim": ours["llm"]["hidden_size"],
            "modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                                 "d_model": enc["d_model"]},
            "preprocessor": {
                "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", "sample_rate": SR,
                "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01, "window": "hann",
                "features": pre["features"], "n_fft": pre["n_fft"], "log": True, "frame_splicing": 1,
                "dither": 1.0e-05, "pad_to": 0, "pad_value": 0.0},
            "encoder": {
                "_target_": "nemo.collections.asr.modules.ConformerEncoder", **{k: enc[k] for k in keys},
                "feat_out": -1, "subsampling": "dw_striding", "causal_downsampling": False,
                "self_attention_model": "rel_pos", "att_context_size": [-1, -1], "untie_biases": True,
                "conv_norm_type": "batch_norm", "conv_context_size": None, "dropout": 0.0,
                "dropout_pre_encoder": 0.0, "dropout_emb": 0.0, "dropout_att": 0.0},
        },
    }  # fmt: skip


def build(model_dir: Path, work: Path):
    from nemo.collections.speechlm2.models.salm import SALM

    ours = json.loads((model_dir / "config.json").read_text())
    write_llm(ours, model_dir, work / "llm")
    model = SALM(salm_config(ours, work / "llm"))
    return model.to(torch.float32).eval()


def generate(model, audios: list[np.ndarray], seconds_for_limit: float) -> tuple[float, int]:
    """One timed generate() on a batch, every row forced to round(4 * seconds_for_limit) tokens -> (s, tokens)."""
    from transformers import GenerationConfig

    n = max(1, round(TOKENS_PER_SECOND * seconds_for_limit))
    gen = GenerationConfig(bos_token_id=model.text_bos_id, eos_token_id=model.text_eos_id,
                           pad_token_id=model.text_pad_id, do_sample=False,
                           max_new_tokens=n, min_new_tokens=n)  # fmt: skip
    lens = torch.tensor([len(a) for a in audios], dtype=torch.int64)
    batch = torch.zeros(len(audios), int(lens.max()), dtype=torch.float32)
    for i, a in enumerate(audios):
        batch[i, : len(a)] = torch.from_numpy(a.astype(np.float32))
    prompts = [[{"role": "user", "content": PROMPT}] for _ in audios]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompts=prompts, audios=batch, audio_lens=lens, generation_config=gen)
    wall = time.perf_counter() - t0
    assert out.shape[1] == n, f"expected {n} tokens per row, got {tuple(out.shape)}"  # forced length held
    return wall, int(out.numel())


def single(model, seconds: float, repeats: int, split) -> dict:
    audio = speech_like(seconds, seed=int(seconds))  # bench/run.py's clip of that length
    chunks = [c.audio for c in split(audio, SR, 40.0)]  # our pieces: chunk_seconds, 40 by default
    limit_s = max(len(c) for c in chunks) / SR
    runs = [generate(model, chunks, limit_s) for _ in range(repeats)]
    lat = statistics.median(r[0] for r in runs)
    return {"seconds": seconds, "latency_s": lat, "rtfx": seconds / lat, "tokens": runs[0][1],
            "tokens_per_s": runs[0][1] / lat, "chunks": len(chunks), "latencies_s": [r[0] for r in runs]}  # fmt: skip


def concurrent(model, clips: list[np.ndarray], c: int, per_client: int) -> dict:
    """c clients' requests batched per round in one generate() call; per_client rounds."""
    latencies, t0 = [], time.perf_counter()
    for j in range(per_client):
        wall, _ = generate(model, [clips[(k * per_client + j) % len(clips)] for k in range(c)], 5.0)
        latencies += [wall] * c
    wall = time.perf_counter() - t0
    n = c * per_client
    return {"concurrency": c, "requests": n, "wall_s": wall, "throughput": n * 5.0 / wall,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
            "mode": "batched generate()"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="a directory written by bench/random_salm.py")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seconds", type=float, nargs="+", default=[5.0, 30.0], help="single-stream clip lengths")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16], help="batch sizes (none: skip)")
    ap.add_argument("--clips-per-client", type=int, default=None, help="default: max(2, 16 // concurrency)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    split = split_audio()
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        model = build(args.model_dir, Path(work))
        load_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        log(f"NeMo SALM: {n_params / 1e6:.1f}M parameters (LoRA un-merged), built in {load_s:.0f} s")
        generate(model, [speech_like(5.0, seed=100)], 5.0)  # warm-up
        rows = []
        for s in args.seconds:
            rows.append(single(model, s, args.repeats if s < 300 else max(1, args.repeats - 1), split))
            log(f"NeMo single {s:g}s: {rows[-1]['rtfx']:.2f}x, {rows[-1]['tokens']} tokens")
        clips = [speech_like(5.0, seed=100 + i) for i in range(16)]  # bench/run.py's concurrency clips
        conc = []
        for c in args.concurrency:
            runs = [concurrent(model, clips, c, args.clips_per_client or max(2, 16 // c)) for _ in range(args.repeats)]
            conc.append(sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2])
            log(f"NeMo c={c}: {conc[-1]['throughput']:.2f} audio s/s")
    res = {"torch": torch.__version__, "threads": args.threads, "parameters": n_params, "load_s": load_s,
           "single": rows, "concurrency": conc, "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    else:
        print(json.dumps(res, indent=2))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
