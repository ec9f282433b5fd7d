"""MLX affine weight quantization of the linear layers, shared by the converter and the loader.

The converter quantizes a built module with `quantize()` and saves its parameters; `model.load` builds the same
module, calls `quantize()` with the config's bits/group size, then loads strictly: one predicate, one layout.
"""

from __future__ import annotations

import mlx.nn as nn

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports in "affine" mode
DEFAULT_GROUP_SIZE = 64


def quantizable(module: nn.Module, group_size: int) -> bool:
    """Linear layers whose input dim splits into whole groups (mx.quantize needs that).

    Only nn.Linear: convs, norms and preprocessor/position buffers stay in the base dtype, and so does the
    decoder token embedding (an nn.Embedding), because it is also the tied output head (`Canary.logits`).
    """
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def quantize(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """Replace every quantizable Linear of `model` (in place) by an affine nn.QuantizedLinear."""
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantization group size must be one of {GROUP_SIZES}, got {group_size!r}")
    nn.quantize(
        model, group_size=group_size, bits=bits, mode="affine", class_predicate=lambda _, m: quantizable(m, group_size)
    )
    return model
