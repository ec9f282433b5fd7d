"""Write pipeline/silero_vad/silero_vad_16k.safetensors: Silero VAD v6's 16 kHz weights, taken from the ONNX
model its `silero-vad` wheel ships (the wheel's own silero_vad_16k.safetensors holds older weights that do not
match its ONNX models). Needs `onnx` and mlx; nothing here runs at serving time.

    pip download --no-deps silero-vad==6.2.3 -d /tmp/w && unzip -o /tmp/w/silero_vad-6.2.3-*.whl -d /tmp/w
    pip install onnx && python scripts/silero_vad_weights.py /tmp/w/silero_vad/data/silero_vad_16k_op15.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnx
from onnx import numpy_helper

OUT = Path(__file__).resolve().parents[1] / "pipeline" / "silero_vad" / "silero_vad_16k.safetensors"
NAMES = {  # ONNX initializer -> pipeline/vad.py name
    "model.stft.forward_basis_buffer": "stft_conv.weight",
    **{f"model.encoder.{i}.reparam_conv.{p}": f"conv{i + 1}.{p}" for i in range(4) for p in ("weight", "bias")},
    **{f"model.decoder.rnn.{p}": f"lstm_cell.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "model.decoder.decoder.2.weight": "final_conv.weight",
    "model.decoder.decoder.2.bias": "final_conv.bias",
}


def main(path: str) -> None:
    found = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    missing = sorted(set(NAMES) - set(found))
    if missing:
        raise SystemExit(f"not in {path}: {missing}")
    mx.save_safetensors(str(OUT), {NAMES[k]: mx.array(found[k].astype(np.float32)) for k in NAMES})
    print("wrote", OUT)


if __name__ == "__main__":
    main(sys.argv[1])
