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


class AudioTooCostly(AudioDecodeError):
    """Decoding the file would cost (from its header) or did cost (while decoding) more than the caller allows."""

    @classmethod
    def samples(cls, rate: int, channels: int, seconds: float, limit: float) -> AudioTooCostly:
        return cls(
            f"the file holds {rate} Hz x {channels} channel(s) x {seconds:.0f} s = {rate * channels * seconds:.3g} "
            f"samples to decode; this server decodes at most {limit:.3g} per file"
        )


class ModelLoadError(CanaryError):
    """A converted model directory is missing, incomplete or of an unknown format."""


class NonFiniteError(ArithmeticError):
    """A float16/bfloat16 computation overflowed (inf or NaN in the encoder output or the logits). Not the input's
    fault (so not a CanaryError): callers recompute in float32 with `Canary.float32()`."""

    @classmethod
    def overflow(cls, what: str, dtype: object) -> NonFiniteError:
        return cls(f"{what} overflowed {str(dtype).removeprefix('mlx.core.')}")


class AudioTooLong(CanaryError):
    """Longer than the caller's limit: known from the file header, or from decoding that stopped at the limit."""

    def __init__(self, seconds: float, limit: float, *, at_least: bool = False) -> None:
        self.seconds, self.limit = seconds, limit
        length = f"more than {limit:g} s" if at_least else f"{seconds:.1f} s"
        super().__init__(f"audio is {length} long; this server accepts at most {limit:g} s")


class PromptTooLong(CanaryError):
    """The decoder prompt does not fit the decoder's position table (max_sequence_length)."""

    def __init__(self, prompt_tokens: int, max_tokens: int) -> None:
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        super().__init__(
            f"the decoder prompt is {prompt_tokens} tokens; this model's decoder holds at most {max_tokens} "
            f"(shorten the prompt)"
        )
