"""MLX implementation of NVIDIA Canary (EncDecMultiTaskModel): the network, tokenizers, prompts, batch decoders."""

from . import audio, errors
from .canary import Canary, Transcription
from .load import default_dtype, load

__all__ = ["Canary", "Transcription", "audio", "default_dtype", "errors", "load"]
