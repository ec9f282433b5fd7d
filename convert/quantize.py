"""`convert --quantize`: MLX affine quantization of the mapped weights, through the model's own module.

The weights are loaded (strictly) into a `model.canary.Canary`, quantized with `model.quantize.quantize`, and
its parameters are what gets saved, so the file matches what `model.load` builds from config.json exactly.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from canary_server.model.canary import Canary
from canary_server.model.config import ModelConfig
from canary_server.model.quantize import BITS, GROUP_SIZES, quantize

from .errors import ConversionError


def check_quantization(bits: int | None, group_size: int) -> None:
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise ConversionError(f"quantize: unsupported value {bits!r} (supported: {', '.join(map(str, BITS))} bits)")
    if group_size not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES))
        raise ConversionError(f"group_size: unsupported value {group_size!r} (supported: {sizes})")


def quantize_weights(arrays: dict[str, mx.array], cfg: dict[str, Any]) -> dict[str, mx.array]:
    """`arrays` (cast to the base dtype) -> quantized parameters; `cfg` is config.json with "quantization" set."""
    q = cfg["quantization"]
    canary = Canary(ModelConfig.from_dict(cfg))
    canary.load_weights(list(arrays.items()), strict=True)
    quantize(canary, q["bits"], q["group_size"])
    out = dict(tree_flatten(canary.parameters()))
    mx.eval(out)
    return out
