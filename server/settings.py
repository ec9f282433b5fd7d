"""Server settings: one pydantic-settings class read from an optional TOML file and `CANARY_*` env vars.

Precedence, highest first: explicit overrides (CLI flags), environment variables, the TOML file, defaults.
`config.example.toml` documents every field with its default; a test keeps the two in sync.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from canary_server.pipeline.fairness import DEFAULT_SHARE
from canary_server.pipeline.options import PipelineConfig

# The TOML file of the `Settings.load` call in progress (a class attribute would leak between calls).
_config_file: ContextVar[Path | None] = ContextVar("canary_config_file", default=None)

DEFAULT_ALIASES = [
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-transcribe",
]


class Settings(BaseSettings):
    """Everything the server can be configured with."""

    model_config = SettingsConfigDict(env_prefix="CANARY_", extra="forbid", validate_default=True)

    model: str = Field(
        "nvidia/canary-1b-flash",
        description="Converted model directory, .nemo file, or Hugging Face repo id (converted on 1st boot).",
    )
    cache_dir: Path | None = Field(None, description="Where converted models are cached (None: the default).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Compute dtype; auto: bfloat16 on Apple Silicon (Metal), float32 elsewhere."
    )
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port.")
    api_key: str | None = Field(None, description="If set, requests need `Authorization: Bearer <api_key>`.")
    max_upload_mb: float = Field(25.0, gt=0, description="Largest accepted request body, in MiB.")
    max_audio_seconds: float = Field(3600.0, gt=0, description="Longer audio is rejected with 400.")
    chunk_seconds: float = Field(30.0, gt=0, le=40, description="Longest piece of audio decoded at once.")
    default_language: str = Field("en", description="Source language when a request names none.")
    batch_size: int = Field(
        16, ge=1, description="Most sequences (requests or chunks) decoded together in the shared decoder loop."
    )
    encode_batch_seconds: float = Field(
        30.0, gt=0, description="Most seconds of audio in one encoder batch (the decoder loop waits for it)."
    )
    max_queued_requests: int = Field(64, ge=1, description="Requests accepted at once; more get 429.")
    beam_size: int | None = Field(
        None, ge=1, le=16, description="Beam width; unset: the model's own decoding config (1 = greedy)."
    )
    length_penalty: float | None = Field(
        None, ge=0, description="Beam length penalty alpha, ((5+len)/6)**alpha; unset: the model's (NeMo: 0)."
    )
    long_request_share: float = Field(
        DEFAULT_SHARE,
        ge=0,
        le=1,
        description="Share of engine time kept by work deferred for shorter requests (0: pure short-first).",
    )
    model_aliases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALIASES),
        description="Extra model names accepted in requests and listed by /v1/models.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Logs.")

    # ---- spoken-language detection, Wyoming (Home Assistant), idle unload ----
    detect_language: bool = Field(
        False, description="Detect the language of requests that name none (language=auto always detects)."
    )
    detect_languages: list[str] = Field(
        default_factory=list, description="Detection picks only among these codes (empty: all the model's)."
    )
    detect_threshold: float = Field(
        0.5, ge=0, le=1, description="Below this probability of the detected language, decode default_language."
    )
    wyoming_port: int = Field(10300, ge=0, le=65535, description="Wyoming (Home Assistant) port; 0 turns it off.")
    wyoming_host: str = Field("127.0.0.1", description="Wyoming bind address (0.0.0.0: reachable from the LAN).")
    wyoming_zeroconf: bool = Field(
        False, description="Announce the Wyoming server over zeroconf (_wyoming._tcp) for Home Assistant."
    )
    idle_unload_seconds: float | None = Field(
        None, gt=0, description="Free the model after this many seconds without requests; unset: never."
    )

    @model_validator(mode="after")
    def _one_port_each(self) -> Settings:
        if self.wyoming_port and self.wyoming_port == self.port:
            raise ValueError(f"wyoming_port and port are both {self.port}: give Wyoming another port (or 0: off)")
        return self

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, v: str | None) -> str | None:
        return v or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file.get())
        return (init_settings, env_settings, toml)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from `config_file` (TOML), the environment, and `overrides` (None values are ignored)."""
        if config_file is not None and not Path(config_file).is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        token = _config_file.set(Path(config_file) if config_file is not None else None)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            chunk_seconds=self.chunk_seconds,
            max_audio_seconds=self.max_audio_seconds,
            batch_size=self.batch_size,
            encode_batch_seconds=self.encode_batch_seconds,
            max_queued_requests=self.max_queued_requests,
            beam_size=self.beam_size,
            length_penalty=self.length_penalty,
            long_request_share=self.long_request_share,
            default_language=self.default_language,
            detect_language=self.detect_language,
            detect_languages=tuple(self.detect_languages),
            detect_threshold=self.detect_threshold,
            idle_unload_seconds=self.idle_unload_seconds,
        )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def model_id(self) -> str:
        """The id /v1/models lists for the loaded model: a repo id as is, a local path by its name."""
        path = Path(self.model).expanduser()
        if path.exists() or self.model.startswith((".", "/", "~")):
            return path.name.removesuffix(".nemo")
        return self.model

    @property
    def served_models(self) -> list[str]:
        return [self.model_id, *[a for a in self.model_aliases if a != self.model_id]]
