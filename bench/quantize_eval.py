"""Effect of `convert --quantize` on the espeak-trained tiny test model (NOT a real Canary).

Converts ../shared/models/espeak-tiny-en.nemo at float32, 8-bit and 4-bit (and loads the float32 one with its
decoder quantized to 8 bits, `decoder_bits=8`), transcribes the 12 held-out clips
(batch size 4, as NeMo's reference run) and prints a Markdown table: size on disk, share of linear-layer weights
quantized, WER and exact matches against NeMo's own transcripts, and transcription time (median of --repeats
runs after one warm-up).

    .venv/bin/python bench/quantize_eval.py [--group-size 64] [--repeats 5] [--clips 12]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from canary_server import model  # noqa: E402, I001  (first: preloads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from canary_server.convert import convert_nemo  # noqa: E402
from canary_server.model.cpu_layout import PackedLinear, TransposedLinear  # noqa: E402
from wer import word_errors  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
NEMO = SHARED / "espeak-tiny-en.nemo"
CLIPS = SHARED / "espeak-tiny-en-clips"


def quantized_share(m: nn.Module) -> float:
    """Fraction of all Linear weights (by element count) held in QuantizedLinear layers. On the CPU backend the
    loader swaps unquantized nn.Linears for TransposedLinear or PackedLinear (model/cpu_layout.py): those count too."""
    full = quant = 0
    for _, layer in m.named_modules():
        if isinstance(layer, nn.QuantizedLinear):
            n = layer.weight.shape[0] * layer.weight.shape[1] * 32 // layer.bits
            quant, full = quant + n, full + n
        elif isinstance(layer, nn.Linear):
            full += layer.weight.size
        elif isinstance(layer, TransposedLinear):
            full += layer.weight_t.size
        elif isinstance(layer, PackedLinear):
            full += layer.weight_p.size
    if full == 0:
        raise RuntimeError("no linear layers found: has the model's layer layout changed?")
    return quant / full


def evaluate(directory: Path, refs: dict[str, str], repeats: int, decoder_bits: int = 0) -> dict:
    m = model.load(directory, decoder_bits=decoder_bits)
    paths = [str(CLIPS / n) for n in refs]
    m.generate(paths, source_lang="en", batch_size=4)  # warm-up
    times, results = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        results = m.generate(paths, source_lang="en", batch_size=4)
        times.append(time.perf_counter() - start)
    hyps = {n: r.text for n, r in zip(refs, results, strict=True)}
    errors = sum(word_errors(refs[n], hyps[n]) for n in refs)
    words = sum(len(t.split()) for t in refs.values())
    return {
        "size_mb": (directory / "model.safetensors").stat().st_size / 1e6,
        "quantized": quantized_share(m),
        "wer": errors / words,
        "errors": errors,
        "words": words,
        "exact": sum(hyps[n] == refs[n] for n in refs),
        "seconds": statistics.median(times),
        "diffs": {n: (refs[n], hyps[n]) for n in refs if hyps[n] != refs[n]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clips", type=int, default=12, help="how many of the 12 held-out clips")
    args = parser.parse_args()
    refs = {n: t.strip() for n, t in sorted(json.loads((CLIPS / "nemo_transcripts.json").read_text()).items())}
    refs = dict(list(refs.items())[: args.clips])
    audio_s = sum(model.audio.load_audio(CLIPS / n).shape[0] for n in refs) / 16000
    print(f"machine: {platform.system()} {platform.machine()}, MLX {mx.__version__} ({mx.default_device()})")
    print(f"espeak-tiny-en (not a real Canary), {len(refs)} held-out clips, {audio_s:.1f} s of audio, batch 4\n")
    print(
        f"| weights | size on disk | linear weights quantized | WER vs NeMo | exact matches | time, {len(refs)} clips |"
    )
    print("|---|---|---|---|---|---|")
    diffs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(None, 0, "float32"), (None, 8, "float32, decoder quantized to 8 bits at load (decoder_bits = 8)")]
        runs += [(bits, 0, f"{bits}-bit affine, group {args.group_size}") for bits in (8, 4)]
        for bits, decoder_bits, name in runs:
            out = Path(tmp) / str(bits)
            if not out.is_dir():
                out = convert_nemo(NEMO, out, quantize=bits, group_size=args.group_size)
            r = evaluate(out, refs, args.repeats, decoder_bits)
            print(
                f"| {name} | {r['size_mb']:.1f} MB | {r['quantized']:.0%} | {r['wer']:.1%} "
                f"({r['errors']}/{r['words']} words) | {r['exact']}/{len(refs)} | {r['seconds']:.2f} s |"
            )
            diffs[name] = r["diffs"]
    for name, d in diffs.items():
        for clip, (ref, hyp) in d.items():
            print(f"\n{name}, {clip}:\n  NeMo: {ref}\n  ours: {hyp}")


if __name__ == "__main__":
    main()
