"""A random-weight canary-qwen-2.5b (NeMo SALM) converted directory with the real dimensions, for bench/run.py.

No download: the bench needs the model's shapes (so its cost), not its weights. Written directly in the converted
layout (ARCHITECTURE.md, `model_type: "salm"`), weights stored in bfloat16 as the release is (the server casts them
to its compute dtype when loading). The tokenizer is the small one of tests/fixtures/salm/llm: ids past it decode to
nothing, which costs the same. `<|im_end|>`'s embedding row (also its output row) is zero, so greedy decoding never
stops by itself: the bench forces the decode length (bench/serve_capped.py).

Memory to build and to serve `qwen-2.5b`: about 10 GB in float32 (5 GB bfloat16): not for the shared 2-core box.

    .venv/bin/python bench/random_salm.py qwen-2.5b [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from canary_server import model  # noqa: E402, I001  (first: preloads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from canary_server.model.salm import SALM, SalmConfig  # noqa: E402

TOKENIZER = REPO / "tests" / "fixtures" / "salm" / "llm"
DEFAULT_ROOT = Path.home() / ".cache" / "canary-server" / "bench"

PREPROCESSOR = {"features": 128, "n_fft": 512, "win_length": 400, "hop_length": 160, "preemph": 0.97,
                "log_zero_guard_value": 2**-24, "mag_power": 2.0, "pad_to": 0, "pad_value": 0.0}  # fmt: skip
MODELS = {
    # canary-1b-flash's encoder + Qwen/Qwen3-1.7B (its config.json)
    "qwen-2.5b": {
        "encoder": {"n_layers": 32, "d_model": 1024, "n_heads": 8, "subsampling_conv_channels": 256},
        "llm": {
            "hidden_size": 2048,
            "num_hidden_layers": 28,
            "intermediate_size": 6144,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
        },
    },  # fmt: skip
    "tiny-salm": {
        "encoder": {"n_layers": 2, "d_model": 64, "n_heads": 4, "subsampling_conv_channels": 32},
        "llm": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 1024,
            "max_position_embeddings": 4096,
        },
    },  # fmt: skip
}


def config_dict(name: str) -> dict:
    spec = MODELS[name]
    encoder = {"feat_in": 128, "ff_expansion_factor": 4, "conv_kernel_size": 9, "subsampling_factor": 8,
               "pos_emb_max_len": 5000, "xscaling": False, **spec["encoder"]}  # fmt: skip
    llm = {"model_type": "qwen3", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
           **spec["llm"]}  # fmt: skip
    return {
        "format_version": 1, "model_type": "salm", "source": {"file": f"random {name}", "llm": "random"},
        "dtype": "bfloat16", "sample_rate": 16000, "prompt_format": "qwen",
        "audio_locator_tag": "<|audioplaceholder|>", "preprocessor": PREPROCESSOR, "encoder": encoder, "llm": llm,
        "lora_merged": None, "generation": {"max_new_tokens": 128},
        "tokenizer": {"file": "tokenizer.json", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    }  # fmt: skip


def random_weights(cfg: SalmConfig, eos_id: int, seed: int = 0) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    from random_model import slaney_mel  # the Canary bench's filterbank

    out = {}
    for name, value in tree_flatten(SALM(cfg).parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if name == "preprocessor.window":
            w = np.hanning(value.shape[0]).astype(np.float32)
        elif name == "preprocessor.fb":
            w = slaney_mel(16000, cfg.preprocessor.n_fft, cfg.preprocessor.features)
        elif leaf == "running_var" or ("norm" in name and leaf == "weight"):
            w = np.ones(value.shape, np.float32)
        elif leaf in ("bias", "running_mean"):
            w = np.zeros(value.shape, np.float32)
        else:
            w = rng.standard_normal(value.shape, dtype=np.float32) * 0.02
        keep = name.startswith("preprocessor.")
        out[name] = mx.array(w) if keep else mx.array(w).astype(mx.bfloat16)
    out["llm.model.embed_tokens.weight"][eos_id] = 0  # never the argmax: the bench forces the decode length
    return out


def build(name: str, out: Path, seed: int = 0) -> Path:
    """Write the random `name` SALM to `out` (skipped when a complete one is already there)."""
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, out / f)
    raw = config_dict(name)
    cfg = SalmConfig.from_dict(raw)
    eos = json.loads((TOKENIZER / "tokenizer.json").read_text())["added_tokens"]
    eos_id = next(t["id"] for t in eos if t["content"] == "<|im_end|>")
    mx.save_safetensors(str(out / "model.safetensors"), random_weights(cfg, eos_id, seed))
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, help=f"default: {DEFAULT_ROOT}/<name>")
    args = ap.parse_args()
    out = build(args.name, args.out or DEFAULT_ROOT / args.name)
    m = model.load(out)  # strict
    n = sum(v.size for _, v in tree_flatten(m.parameters()))
    print(f"{out}: {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
