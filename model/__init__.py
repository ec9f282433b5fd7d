"""MLX implementation of NVIDIA Canary (EncDecMultiTaskModel)."""

from model.blas import preload_openblas

preload_openblas()

from model import audio, errors  # noqa: E402
from model.canary import Canary, Transcription  # noqa: E402
from model.load import default_dtype, load  # noqa: E402

__all__ = ["Canary", "Transcription", "audio", "default_dtype", "errors", "load"]
