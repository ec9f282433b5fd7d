"""Which code paths the model takes: the CPU paths or the GPU paths. One switch, read wherever the paths differ.

* CPU paths (`"cpu"`): the exp-based activations of model/cpu_math.py, the shift-and-add depthwise subsampling conv
  (model/conformer.py), pre-transposed Linear weights and the larger buffer cache (model/cpu_layout.py, applied by
  `model.load`), and an uncompiled decoder step (model/batch_decoder.py). Tuned for MLX's CPU backend.
* GPU paths (`"gpu"`): MLX's own kernels and `nn.Linear` layout, and the decoder step through `mx.compile`. What
  runs on Metal and CUDA.

Both compute the same function (the parity tests run each against NeMo's goldens). By default the paths follow
MLX's default device: CPU paths when MLX computes on its CPU backend (Linux CPU wheels, or
`mx.set_default_device(mx.cpu)` anywhere), GPU paths otherwise. `CANARY_BACKEND=cpu|gpu` (read at import) or
`force()` / `forced()` pick one whatever the device: forcing the GPU paths on a CPU is how CI tests them
(tests/test_backend.py). The layout is chosen when a model is loaded, so force before `model.load`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import mlx.core as mx

CPU, GPU = "cpu", "gpu"
KINDS = (CPU, GPU)
ENV = "CANARY_BACKEND"


def from_env(env: Mapping[str, str]) -> str | None:
    """The paths `CANARY_BACKEND` asks for (None when unset, empty or "auto")."""
    value = env.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in KINDS:
        raise ValueError(f"{ENV} must be one of cpu, gpu, auto; got {env[ENV]!r}")
    return value


_forced: str | None = from_env(os.environ)


def paths() -> str:
    """ "cpu" or "gpu": the forced paths, else those of MLX's default device."""
    if _forced is not None:
        return _forced
    return CPU if mx.default_device() == mx.cpu else GPU


def cpu_paths() -> bool:
    return paths() == CPU


def force(kind: str | None) -> None:
    """Force the CPU or GPU paths for the whole process (None: follow the default device again)."""
    global _forced
    if kind is not None and kind not in KINDS:
        raise ValueError(f"backend paths must be one of {KINDS} or None, got {kind!r}")
    _forced = kind


@contextmanager
def forced(kind: str | None) -> Iterator[None]:
    """`force(kind)` inside the block, the previous setting after it."""
    previous = _forced
    force(kind)
    try:
        yield
    finally:
        force(previous)
