"""Every error leaves the server as OpenAI's body `{"error": {"message", "type", "param", "code"}}`.

One handler, `error_response`, maps each kind of exception to that body and a status code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from canary_server.model.boosting import UnspellablePhrase
from canary_server.model.errors import AudioDecodeError, CanaryError, UnsupportedLanguageError
from canary_server.pipeline.errors import (
    AudioTooLong,
    EngineBusy,
    EngineNotReady,
    InvalidAudio,
    LanguageDetectionUnavailable,
    PromptTooLong,
)
from canary_server.pipeline.keywords import InvalidKeywords

log = logging.getLogger("canary.server")

_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ClientDisconnected(Exception):
    """The client closed the connection before its result was ready (nobody reads the answer)."""


class ApiError(Exception):
    """An error a route raises on purpose, with the fields OpenAI's body carries."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else _TYPES.get(status, "invalid_request_error"))
        self.headers = headers


def _from_validation(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header", "path")]
    param = loc[-1] if loc else None
    if err.get("type") == "missing":
        message = f"missing required parameter: {param!r}"
    else:
        message = f"invalid value for {param!r}: {err.get('msg', 'invalid')}"
    return ApiError(400, message, param=param, code="invalid_value" if err.get("type") != "missing" else None)


# An absolute or home-relative path: kept to its last component. Not after a word character, ':' or '/', so
# repo ids (nvidia/canary-1b-flash) and URLs (https://...) stay whole.
_PATH = re.compile(r"(?<![\w:/.~-])(?:~|/)[^\s'\"]*/([^\s'\"/]*)")
# The same in quotes (Python's OSError messages quote the path), where spaces belong to the path.
_QUOTED_PATH = re.compile(r"(['\"])(?:~|/)[^'\"\n]*/([^'\"/\n]*)\1")

# Local paths the settings name (the model, the caches): unquoted, with spaces, only a known path can be found.
_private_paths: set[str] = set()


def keep_private(*paths: str | os.PathLike | None) -> None:
    """Have `without_paths` shorten these paths (as given, absolute and resolved) wherever they appear."""
    for path in paths:
        if path is None or not str(path).startswith(("/", "~", ".")):  # a repo id is no local path
            continue
        expanded = os.path.expanduser(str(path))
        _private_paths.update(p.rstrip("/") for p in (str(path), expanded, os.path.abspath(expanded)) if len(p) > 1)
        with contextlib.suppress(OSError, RuntimeError):
            _private_paths.add(str(Path(expanded).resolve()))


def without_paths(message: str) -> str:
    """`message` with local paths shortened to their file or directory name (for unauthenticated readers)."""
    for path in sorted(_private_paths, key=len, reverse=True):  # the longest first: a model inside the cache
        whole = re.compile(rf"(?<![\w/.~-]){re.escape(path)}(?![\w.-])")  # a whole path, not part of a longer name
        message = whole.sub(lambda _, name=Path(path).name: name, message)
    return _PATH.sub(r"\1", _QUOTED_PATH.sub(r"\1\2\1", message))


def to_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException):
        headers = dict(exc.headers) if exc.headers else None
        return ApiError(exc.status_code, str(exc.detail), headers=headers)
    if isinstance(exc, UnsupportedLanguageError):
        return ApiError(400, str(exc), param=exc.role, code="unsupported_language")
    if isinstance(exc, LanguageDetectionUnavailable):
        return ApiError(400, str(exc), param=exc.role, code="language_detection_unavailable")
    if isinstance(exc, AudioDecodeError | InvalidAudio):
        return ApiError(400, str(exc), param="file", code="invalid_audio")
    if isinstance(exc, AudioTooLong):
        return ApiError(400, str(exc), param="file", code="audio_too_long")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="prompt", code="prompt_too_long")
    if isinstance(exc, InvalidKeywords):
        return ApiError(400, str(exc), param=exc.param, code="invalid_keywords")
    if isinstance(exc, UnspellablePhrase):  # a detected language whose tokenizer cannot spell a keyword
        return ApiError(400, str(exc), param="keywords[]", code="invalid_keywords")
    if isinstance(exc, CanaryError):
        return ApiError(400, str(exc))
    if isinstance(exc, EngineNotReady):
        return ApiError(503, without_paths(str(exc)), code="model_not_ready", headers={"Retry-After": "5"})
    if isinstance(exc, ClientDisconnected):
        return ApiError(499, "the client closed the connection", code="client_disconnected")
    if isinstance(exc, EngineBusy):
        return ApiError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": "1"})
    log.error("unexpected error", exc_info=exc)
    return ApiError(500, f"internal server error: {type(exc).__name__}")


def error_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


class ErrorRoute(APIRoute):
    """Renders every exception a route raises through `error_response`, unexpected ones included, so a
    500 is an ordinary response (Starlette's last-resort handler would also drop the connection)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return await error_response(request, exc)

        return route


def install_error_handler(app: FastAPI) -> None:
    for cls in (
        ApiError,
        RequestValidationError,
        StarletteHTTPException,
        CanaryError,
        EngineNotReady,
        EngineBusy,
        ClientDisconnected,
    ):
        app.add_exception_handler(cls, error_response)
    app.add_exception_handler(Exception, error_response)  # 500; Starlette still logs the traceback
