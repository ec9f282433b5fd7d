"""Server settings: one pydantic-settings class read from an optional TOML file and `CANARY_*` env vars.

Precedence, highest first: explicit overrides (CLI flags), environment variables, the TOML file, defaults.
`config.example.toml` documents every field with its default; a test keeps the two in sync.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as _SourceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (pydantic-settings uses it too)
    import tomli as tomllib

from canary_server.model.boosting import DEFAULT_ALPHA
from canary_server.pipeline.fairness import DEFAULT_SHARE
from canary_server.pipeline.keywords import MAX_SERVER_PHRASES, InvalidKeywords, clean_keywords, read_keywords_file
from canary_server.pipeline.options import PipelineConfig

# The TOML file of the `Settings.load` call in progress (a class attribute would leak between calls).
_config_file: ContextVar[Path | None] = ContextVar("canary_config_file", default=None)

# Settings that name files or directories: `~` and `$VARS` in them are expanded (TOML and env values are not
# expanded by a shell, so "~/.cache/x" would otherwise be a directory named "~").
PATH_SETTINGS = ("model", "cache_dir", "keywords_file")

ENV_PREFIX = "CANARY_"

DEFAULT_ALIASES = [
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-transcribe",
]


class Settings(BaseSettings):
    """Everything the server can be configured with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    model: str = Field(
        "nvidia/canary-1b-flash",
        description="Converted model directory, .nemo file, or Hugging Face repo id (converted on 1st boot).",
    )
    cache_dir: Path | None = Field(
        None, description="Where converted models are kept (unset: ~/.cache/canary-server); ~ and $VARS are expanded."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Compute dtype; auto: float32 everywhere (the one that matches NeMo on every fixture)."
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
    # ---- limits on hostile or accidental input (issue 11) ------------------------------------------------
    max_queued_audio_seconds: float = Field(
        4 * 3600.0,
        gt=0,
        description="Seconds of audio held by accepted requests at once (64 KB of memory each); more get 429.",
    )
    max_concurrent_decodes: int = Field(
        2, ge=1, description="Uploads decoded and resampled at once (each holds up to max_audio_seconds)."
    )
    max_prompt_tokens: int = Field(
        224, ge=0, description="The prompt (decoder context) keeps its last this many tokens (OpenAI's whisper-1)."
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT, running requests get this long to finish; then they get 503."
    )
    idle_release_seconds: float = Field(
        2.0, ge=0, description="Idle this long after work, freed memory goes back to the system (0: never)."
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host names accepted besides loopback names and IPs (DNS-rebinding guard); unset + api_key: any.",
    )
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
    keywords: list[str] = Field(
        default_factory=list,
        description="Phrases boosted for requests without their own keywords[] and for every Wyoming utterance.",
    )
    keywords_file: Path | None = Field(None, description="More such phrases, one a line (UTF-8).")
    boosting_tree_alpha: float = Field(
        DEFAULT_ALPHA, ge=0, le=10, description="Keyword boost weight (NeMo's boosting_tree_alpha); 0: none."
    )
    model_aliases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALIASES),
        description="Extra model names accepted in requests and listed by /v1/models.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Logging level (info shows the first start's download and conversion progress)."
    )

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

    @model_validator(mode="after")
    def _keywords_readable(self) -> Settings:
        try:
            self.server_keywords()  # refused at startup, not at the first request
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator(*PATH_SETTINGS, mode="before")
    @classmethod
    def _expand_path(cls, v: Any) -> Any:
        return expand_path(v) if isinstance(v, str | Path) else v

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
        """Settings from `config_file` (TOML), the environment, and `overrides` (None values are ignored).

        Raises SettingsError, one line naming the setting, where its value came from, the value and what is
        allowed, for a missing or malformed file, an unknown key or a value that does not validate."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        path = Path(expand_path(config_file)) if config_file is not None else None
        file_values = _read_toml(path) if path is not None else {}
        token = _config_file.set(path)
        try:
            return cls(**overrides)
        except ValidationError as e:
            raise SettingsError("; ".join(_describe(err, path, file_values, overrides) for err in e.errors())) from None
        except _SourceError as e:  # a CANARY_* list/dict value that is not JSON
            raise SettingsError(f'{e} (list settings take JSON in environment variables: \'["a", "b"]\')') from None
        finally:
            _config_file.reset(token)

    def pipeline_config(self) -> PipelineConfig:
        """The pipeline's limits and scheduling: every setting named like a `PipelineConfig` field."""
        names = [f.name for f in dataclasses.fields(PipelineConfig) if f.name in Settings.model_fields]
        values = {name: getattr(self, name) for name in names}
        values["detect_languages"] = tuple(values["detect_languages"])
        values["keywords"] = self.server_keywords()
        return PipelineConfig(**values)

    def server_keywords(self) -> tuple[str, ...]:
        """`keywords` then the phrases of `keywords_file`, checked (pipeline/keywords.py); raises SettingsError."""
        try:
            listed = clean_keywords(self.keywords, MAX_SERVER_PHRASES, "keywords")
            from_file = read_keywords_file(self.keywords_file) if self.keywords_file else ()
            return clean_keywords(listed + from_file, MAX_SERVER_PHRASES, "keywords")
        except (InvalidKeywords, OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"keywords / keywords_file: {exc}") from None

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


class SettingsError(ValueError):
    """A settings file, environment variable or flag that cannot be used (the message is one line)."""


def expand_path(value: str | Path) -> str:
    """`~` and `$VARS` expanded, as a shell would for a path typed on the command line."""
    return os.path.expanduser(os.path.expandvars(str(value)))


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"config file {path}: cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path}: not valid TOML ({e})") from None


def _describe(err: dict, path: Path | None, file_values: dict[str, Any], overrides: dict[str, Any]) -> str:
    """One pydantic error as "setting port = 'abc' (from CANARY_PORT): input should be a valid integer"."""
    name = str(err["loc"][0]) if err.get("loc") else "?"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(name, list(Settings.model_fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"config file {path}: unknown setting {name!r} ({hint}settings: {', '.join(Settings.model_fields)})"
    if name in overrides:
        source = f"--{name.replace('_', '-')}"
    elif env_name(name) in os.environ:
        source = env_name(name)
    elif name in file_values:
        source = f"config file {path}"
    else:
        source = "default"
    allowed = err["msg"][:1].lower() + err["msg"][1:]
    return f"setting {name} = {err.get('input')!r} (from {source}): {allowed}"
