"""canary-server: NVIDIA Canary speech recognition and translation on Apple MLX, behind OpenAI's audio API.

    import canary_server
    m = canary_server.load("./canary-180m-flash-mlx")   # or a .nemo file, or a Hugging Face repo id
    print(m.transcribe("talk.wav", source_lang="en").text)

Subpackages, lowest layer first: `model` (the MLX network), `convert` (.nemo -> MLX directory), `pipeline`
(limits, cutting, scheduling, the engine), `server` (HTTP), `cli` (the command line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from canary_server._blas import preload_openblas

preload_openblas()  # before anything imports MLX (Linux: MLX's CPU wheel links a slow reference BLAS)

__version__ = "0.2.0"

if TYPE_CHECKING:
    from canary_server.pipeline import Transcriber


def load(model: Any, **kwargs: Any) -> Transcriber:
    """A model behind the full pipeline (`canary_server.pipeline.load`); see `Transcriber.transcribe`."""
    from canary_server.pipeline import load as _load

    return _load(model, **kwargs)


__all__ = ["__version__", "load"]
