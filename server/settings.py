"""Server settings: one pydantic-settings class read from an optional TOML file and `CANARY_*` env vars.

Precedence, highest first: explicit overrides (CLI flags), environment variables, the TOML file, defaults.
`config.example.toml` documents every field with its default; a test keeps the two in sync.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
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
    decoder_bits: int = Field(
        0,
        description="8: quantize the decoder's weights to 8 bits as the model loads (faster decoding on CPUs; "
        "canary-qwen ignores it).",
    )
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port.")
    api_key: str | None = Field(None, description="If set, requests need `Authorization: Bearer <api_key>`.")
    max_upload_mb: float = Field(25.0, gt=0, description="Largest accepted request body, in MiB.")
    max_audio_seconds: float = Field(3600.0, gt=0, description="Longer audio is rejected with 400.")
    chunk_seconds: float = Field(
        40.0, gt=0, le=40, description="Audio up to this long is decoded whole; longer audio is cut at pauses."
    )
    default_language: str = Field(
        "auto", description="Language of requests that name none: auto detects it; a code fixes it (no detection)."
    )
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
    max_decode_samples: float = Field(
        3600 * 96000 * 2.0,
        gt=0,
        description="Most samples (rate x channels x seconds, at the file's own rate) one upload may decode; "
        "checked from the header, then while decoding; more get 400.",
    )
    max_decode_seconds: float = Field(
        120.0, gt=0, description="Wall-clock seconds one upload's decode may take; longer gets 400."
    )
    max_decode_cpu_seconds: float = Field(
        60.0, gt=0, description="CPU seconds one upload's decode may take; longer gets 400."
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
    # ---- connections (issue 19): deadlines, caps, browsers, proxies ----------------------------------------
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="A request line and headers must arrive within this (else 408 and closed)."
    )
    body_timeout_seconds: float = Field(
        20.0, gt=0, description="A request body gets this long, plus 1 s per body_min_rate bytes received."
    )
    body_min_rate: int = Field(1024, gt=0, description="Slowest accepted upload, in bytes per second.")
    keep_alive_seconds: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this.")
    max_connections: int = Field(
        512, ge=1, description="Open HTTP connections at most (also kept below the descriptor limit)."
    )
    max_spooled_uploads_mb: float = Field(
        1024.0, gt=0, description="MiB of request bodies held at once by all requests (memory and temp files)."
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web page origins allowed to call the server besides its own pages (['*']: any).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Proxy addresses/networks whose X-Forwarded-For/-Proto are believed (empty: none).",
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
        False, description="With a default_language code: detect anyway, decoding the code only below detect_threshold."
    )
    detect_languages: list[str] = Field(
        default_factory=list, description="Detection picks only among these codes (empty: all the model's)."
    )
    vad: bool = Field(
        True,
        description="Silero VAD: audio without speech gets empty text undecoded; long audio is cut in its pauses.",
    )
    detect_threshold: float = Field(
        0.5, ge=0, le=1, description="Below this probability of the detected language, decode a default_language code."
    )
    wyoming_port: int = Field(10300, ge=0, le=65535, description="Wyoming (Home Assistant) port; 0 turns it off.")
    wyoming_host: str = Field("127.0.0.1", description="Wyoming bind address (0.0.0.0: reachable from the LAN).")
    wyoming_zeroconf: bool = Field(
        False, description="Announce the Wyoming server over zeroconf (_wyoming._tcp) for Home Assistant."
    )
    wyoming_max_connections: int = Field(
        64, ge=1, description="Wyoming connections open at once; more get an error event and are closed."
    )
    wyoming_idle_seconds: float = Field(
        30.0, gt=0, description="A Wyoming connection silent this long between utterances (or mid-frame) is closed."
    )
    wyoming_chunk_seconds: float = Field(
        10.0, gt=0, description="Within a Wyoming utterance, the longest wait for its next event; then it is closed."
    )
    wyoming_max_utterance_seconds: float | None = Field(
        None,
        gt=0,
        description="Wall clock from a Wyoming utterance's start to its audio-stop (unset: 2 x max_audio_seconds).",
    )
    wyoming_max_utterance_mb: float = Field(
        32.0, gt=0, description="PCM one Wyoming utterance may send, in MiB as sent (max_audio_seconds applies too)."
    )
    wyoming_max_chunks: int = Field(50_000, ge=1, description="audio-chunk events in one Wyoming utterance.")
    wyoming_max_held_mb: float = Field(
        256.0, gt=0, description="PCM held by all Wyoming connections together, in MiB; past it: rate_limit_exceeded."
    )
    wyoming_max_held_seconds: float = Field(
        3600.0, gt=0, description="Seconds of audio held by all Wyoming connections together; past it: same."
    )
    wyoming_partials: Literal["off", "preview", "final"] = Field(
        "preview",
        description="Wyoming transcript-chunks while the audio arrives (streaming decoder): preview (final "
        "transcript decoded whole at audio-stop), final (the stream's text is the transcript), off.",
    )
    idle_unload_seconds: float | None = Field(
        None, gt=0, description="Free the model after this many seconds without requests; unset: never."
    )

    # ---- OpenAI Realtime transcription (issue 20): /v1/realtime WebSocket ----
    realtime_max_sessions: int = Field(
        16, ge=0, description="Realtime sessions open at once; more get an error event and are closed (0: off)."
    )
    realtime_idle_seconds: float = Field(
        60.0, gt=0, description="A Realtime session that sends nothing for this long gets an error and is closed."
    )
    realtime_max_session_seconds: float = Field(
        3600.0, gt=0, description="Longest a Realtime session may stay open; then it gets an error and is closed."
    )
    realtime_max_turn_seconds: float = Field(
        300.0, gt=0, description="Audio seconds one Realtime turn (one committed item) may hold; past it: an error."
    )
    realtime_max_held_mb: float = Field(
        256.0, gt=0, description="MiB of audio (16 kHz float32) all Realtime turns hold together; past it: error."
    )
    realtime_max_frame_mb: float = Field(
        16.0, gt=0, description="Largest WebSocket message a Realtime client may send, in MiB (larger: closed, 1009)."
    )
    realtime_chunk_seconds: float = Field(
        1.0, gt=0, le=10, description="Realtime streaming decode step: new audio per step (partials come this often)."
    )
    realtime_left_context_seconds: float = Field(
        10.0, ge=0, le=30, description="Realtime streaming decode: seconds of past audio each step's encoder sees."
    )
    realtime_right_context_seconds: float = Field(
        0.5, ge=0, le=10, description="Realtime streaming decode: seconds of look-ahead (added to the latency)."
    )
    realtime_policy: Literal["waitk", "alignatt"] = Field(
        "alignatt", description="Realtime streaming decode policy (NeMo's waitk or alignatt)."
    )
    live_detect_seconds: float = Field(
        1.5,
        gt=0,
        le=30,
        description="A Realtime turn without a language: audio held to detect the language from before decoding.",
    )

    # ---- monitoring and routers (issue 24) ----
    metrics_loopback_only: bool = Field(
        False, description="Serve /metrics only to clients on this machine (others get 403)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or as one JSON object each (with the request id)."
    )

    @model_validator(mode="after")
    def _one_port_each(self) -> Settings:
        if self.wyoming_port and self.wyoming_port == self.port:
            raise ValueError(f"wyoming_port and port are both {self.port}: give Wyoming another port (or 0: off)")
        return self

    @field_validator("decoder_bits")
    @classmethod
    def _decoder_bits(cls, v: int) -> int:
        if v not in (0, 8):  # an int field: the environment's "8" parses (a Literal[0, 8] refused every string)
            raise ValueError(f"decoder_bits is 0 (off) or 8, not {v}")
        return v

    @field_validator("default_language")
    @classmethod
    def _language_code(cls, v: str) -> str:
        v = v.strip().lower()  # the model's own check (at start) says whether it knows the code
        if not v:
            raise ValueError('give a language code, or "auto" to detect it')
        return v

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
        return (init_settings, _EnvSource(settings_cls), toml)

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
            settings = cls(**overrides)
        except ValidationError as e:
            raise SettingsError("; ".join(_describe(err, path, file_values, overrides) for err in e.errors())) from None
        except _ListValueError as e:
            raise SettingsError(str(e)) from None
        except _SourceError as e:  # an environment variable pydantic-settings cannot read
            raise SettingsError(str(e)) from None
        finally:
            _config_file.reset(token)
        return settings if path is None else _paths_from(settings, path.absolute().parent, file_values, overrides)

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
    def max_spooled_upload_bytes(self) -> int:
        return int(self.max_spooled_uploads_mb * 1024 * 1024)

    @property
    def wyoming_utterance_seconds(self) -> float:
        """A Wyoming utterance streams in real time, so the longest one accepted takes max_audio_seconds of wall
        clock; twice that lets a client send at half real time, and still no client holds a slot for ever."""
        return self.wyoming_max_utterance_seconds or 2 * self.max_audio_seconds

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


class _ListValueError(Exception):
    """A CANARY_* list value that is neither. Not a ValueError: pydantic-settings would swallow that for an
    optional list (allowed_hosts) and pass the text on."""


class _EnvSource(EnvSettingsSource):
    """CANARY_* variables, where a list setting is comma-separated text (`a,b`) or a JSON list (`["a", "b"]`)."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        text = str(value).strip()
        if not text.startswith(("[", "{")):
            return [part.strip() for part in text.split(",") if part.strip()]
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if not isinstance(items, list):
            raise _ListValueError(
                f"setting {field_name} = {value!r} (from {env_name(field_name)}): not a list: give comma-separated "
                'values (a,b) or a JSON list (["a", "b"])'
            )
        return items


def expand_path(value: str | Path) -> str:
    """`~` and `$VARS` expanded, as a shell would for a path typed on the command line."""
    return os.path.expanduser(os.path.expandvars(str(value)))


def _paths_from(settings: Settings, folder: Path, file_values: dict[str, Any], overrides: dict[str, Any]) -> Settings:
    """Relative paths that come from the config file are taken from its folder, wherever `serve` was started (as
    install-service runs it: in that folder). `model` only where it is one (starts with `.` or exists there): a
    Hugging Face repo id such as nvidia/canary-1b-flash looks relative too."""
    updates: dict[str, Any] = {}
    for name in PATH_SETTINGS:
        value = getattr(settings, name)
        from_file = name in file_values and name not in overrides and env_name(name) not in os.environ
        if not from_file or value is None or Path(value).is_absolute():
            continue
        candidate = Path(os.path.normpath(folder / value))
        if name != "model" or str(value).startswith(".") or candidate.exists():
            updates[name] = candidate if isinstance(value, Path) else str(candidate)
    return settings.model_copy(update=updates) if updates else settings


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
