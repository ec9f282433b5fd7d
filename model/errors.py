"""Domain errors raised by the model package (the server maps them to OpenAI-style 400s)."""


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
