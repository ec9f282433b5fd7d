"""Domain errors raised by the model package (the server maps them to OpenAI-style 400s)."""

from __future__ import annotations


class CanaryError(ValueError):
    """Base class for user-facing errors."""


class UnsupportedLanguageError(CanaryError):
    def __init__(self, language: str, supported: list[str], role: str = "language") -> None:
        self.language, self.supported, self.role = language, supported, role
        super().__init__(f"unsupported {role} {language!r}; this model supports: {', '.join(supported)}")


class AudioDecodeError(CanaryError):
    """The audio could not be decoded."""


class ModelLoadError(CanaryError):
    """A converted model directory is missing, incomplete or of an unknown format."""


class NonFiniteError(ArithmeticError):
    """A float16/bfloat16 computation overflowed (inf or NaN in the encoder output or the logits). Not the input's
    fault (so not a CanaryError): callers recompute in float32 with `Canary.float32()`."""

    @classmethod
    def overflow(cls, what: str, dtype: object) -> NonFiniteError:
        return cls(f"{what} overflowed {str(dtype).removeprefix('mlx.core.')}")
