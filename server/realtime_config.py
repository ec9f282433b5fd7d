"""A Realtime transcription session's configuration: OpenAI's GA shape (`session.update`, `session.type:
"transcription"`, `audio.input.*`) and the beta shape (`transcription_session.update`, `input_audio_format`,
`input_audio_transcription`, `turn_detection`), read into one `SessionConfig` and written back in either shape.

Only what canary-server does is accepted: `audio/pcm` (16-bit little-endian mono) at a rate in [8000, 48000]
(24 kHz by default, as OpenAI's), `server_vad` turn detection or none, `include` of the token log-probs.
`semantic_vad` (an OpenAI model that judges whether the user finished a thought) is refused with a clear error
rather than pretended; g711 likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from canary_server.pipeline.live_turns import MAX_RATE, MIN_RATE, TurnDetection

DEFAULT_RATE = 24000
LOGPROBS = "item.input_audio_transcription.logprobs"


class SessionError(ValueError):
    """A session update that cannot be applied: message, param (the field) and code for the `error` event."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class SessionConfig:
    model: str
    rate: int = DEFAULT_RATE
    language: str | None = None
    prompt: str | None = None
    turn_detection: TurnDetection | None = TurnDetection()
    include: tuple[str, ...] = ()

    def ga(self, session_id: str) -> dict[str, Any]:
        """The session as OpenAI's GA `session.created` / `session.updated` carry it."""
        return {
            "type": "transcription",
            "id": session_id,
            "object": "realtime.transcription_session",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.rate},
                    "noise_reduction": None,
                    "transcription": {"model": self.model, "language": self.language, "prompt": self.prompt or ""},
                    "turn_detection": _vad_out(self.turn_detection),
                }
            },
            "include": list(self.include),
        }

    def beta(self, session_id: str) -> dict[str, Any]:
        """The session as the beta `transcription_session.updated` carries it."""
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": "pcm16",
            "input_audio_transcription": {"model": self.model, "language": self.language, "prompt": self.prompt or ""},
            "turn_detection": _vad_out(self.turn_detection),
            "input_audio_noise_reduction": None,
            "include": list(self.include),
        }


def _vad_out(det: TurnDetection | None) -> dict[str, Any] | None:
    if det is None:
        return None
    return {
        "type": "server_vad",
        "threshold": det.threshold,
        "prefix_padding_ms": det.prefix_ms,
        "silence_duration_ms": det.silence_ms,
    }


def _obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SessionError(f"{param} must be an object", param)
    return value


def update_ga(config: SessionConfig, session: Any) -> SessionConfig:
    """Apply a GA `session.update`'s `session` object."""
    session = _obj(session, "session")
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise SessionError(
            f"session.type {kind!r} is not served here: this server only transcribes (use 'transcription')",
            "session.type",
        )
    config = _include(config, session, "session.include")
    audio = _obj(session.get("audio", {}), "session.audio")
    inp = _obj(audio.get("input", {}), "session.audio.input")
    if "format" in inp:
        config = replace(config, rate=_format(inp["format"], "session.audio.input.format"))
    if "transcription" in inp:
        config = _transcription(config, inp["transcription"], "session.audio.input.transcription")
    if "turn_detection" in inp:
        config = replace(config, turn_detection=_vad(inp["turn_detection"], "session.audio.input.turn_detection"))
    _refuse_noise_reduction(inp.get("noise_reduction"), "session.audio.input.noise_reduction")
    return config


def update_beta(config: SessionConfig, session: Any) -> SessionConfig:
    """Apply a beta `transcription_session.update`'s `session` object."""
    session = _obj(session, "session")
    config = _include(config, session, "session.include")
    if "input_audio_format" in session:
        fmt = session["input_audio_format"]
        if fmt != "pcm16":
            raise SessionError(
                f"input_audio_format {fmt!r} is not supported: send 'pcm16' (16-bit little-endian mono, 24 kHz)",
                "session.input_audio_format",
            )
        config = replace(config, rate=DEFAULT_RATE)
    if "input_audio_transcription" in session:
        config = _transcription(config, session["input_audio_transcription"], "session.input_audio_transcription")
    if "turn_detection" in session:
        config = replace(config, turn_detection=_vad(session["turn_detection"], "session.turn_detection"))
    _refuse_noise_reduction(session.get("input_audio_noise_reduction"), "session.input_audio_noise_reduction")
    return config


def _include(config: SessionConfig, session: dict[str, Any], param: str) -> SessionConfig:
    if "include" not in session:
        return config
    include = session["include"]
    if include is None:
        return replace(config, include=())
    if not isinstance(include, list):
        raise SessionError(f"{param} must be a list", param)
    unknown = [x for x in include if x != LOGPROBS]
    if unknown:
        raise SessionError(f"{param}: {str(unknown[0])[:64]!r} is not supported; the one choice is {LOGPROBS!r}", param)
    return replace(config, include=(LOGPROBS,) if include else ())


def _format(fmt: Any, param: str) -> int:
    fmt = _obj(fmt, param)
    if fmt.get("type") != "audio/pcm":
        raise SessionError(
            f"audio format {fmt.get('type')!r} is not supported: send 'audio/pcm' (16-bit little-endian mono)", param
        )
    rate = fmt.get("rate", DEFAULT_RATE)
    if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
        message = f"{param}.rate must be an integer in [{MIN_RATE}, {MAX_RATE}], not {rate!r}"
        raise SessionError(message, f"{param}.rate")
    return rate


def _transcription(config: SessionConfig, value: Any, param: str) -> SessionConfig:
    if value is None:
        return config
    value = _obj(value, param)
    if value.get("keywords"):  # never dropped silently: NeMo's streaming decoder has no phrase boosting
        raise SessionError(
            "keywords are not applied to live transcription (the streaming decoder has no phrase boosting); "
            "send keywords[] with /v1/audio/transcriptions, or set the server's keywords for Wyoming",
            f"{param}.keywords",
            "unsupported_keywords",
        )
    for key in ("model", "language", "prompt"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise SessionError(f"{param}.{key} must be a string", f"{param}.{key}")
    return replace(
        config,
        model=value.get("model") or config.model,
        language=value.get("language") or None,
        prompt=value.get("prompt") or None,
    )


def _vad(value: Any, param: str) -> TurnDetection | None:
    if value is None:
        return None
    value = _obj(value, param)
    kind = value.get("type", "server_vad")
    if kind == "semantic_vad":
        raise SessionError(
            "turn_detection 'semantic_vad' is not supported: use 'server_vad' (voice activity, silence_duration_ms) "
            "or null (commit the buffer yourself)",
            f"{param}.type",
            "unsupported_turn_detection",
        )
    if kind != "server_vad":
        raise SessionError(f"turn_detection type {kind!r} is unknown: use 'server_vad' or null", f"{param}.type")
    defaults = TurnDetection()
    fields = {"threshold": defaults.threshold, "prefix_padding_ms": defaults.prefix_ms}
    fields["silence_duration_ms"] = defaults.silence_ms
    got: dict[str, Any] = {}
    for key, default in fields.items():
        v = value.get(key)
        v = default if v is None else v
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise SessionError(f"{param}.{key} must be a number", f"{param}.{key}")
        got[key] = v
    try:
        return TurnDetection(
            float(got["threshold"]), int(got["prefix_padding_ms"]), int(got["silence_duration_ms"])
        )  # fmt: skip
    except ValueError as exc:
        raise SessionError(f"{param}: {exc}", param) from None


def _refuse_noise_reduction(value: Any, param: str) -> None:
    if value is not None:
        raise SessionError("noise_reduction is not supported here: send null", param)
