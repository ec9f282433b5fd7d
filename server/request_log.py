"""X-Request-ID and the log lines about a request.

Every HTTP response carries `X-Request-ID`: the client's own when it sent a usable one (a router or a caller that
follows requests across machines), else a fresh one. The id lives in a context variable while the request runs,
so every log line written in its task (routes, the pipeline's decode thread, uvicorn's access line) carries it,
and so do the engine thread's lines about that request (its job keeps the id): appended to text lines, a field of
JSON lines (`log_format = "json"`). Lines the engine thread writes about many requests at once carry none.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from canary_server.pipeline.stats import request_id

HEADER = "X-Request-ID"
# A client's id is kept only if it is short and plain (it goes into logs and a response header as is).
_USABLE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# The loggers whose handlers get the request id: ours and the root's (propagated), and uvicorn's own handlers.
_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")


def new_request_id(sent: str | None) -> str:
    """The client's id when usable, else a fresh random one."""
    if sent and _USABLE.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Sets the request id for the request's task and puts it on the response (errors and streams alike).
    Also puts `Retry-After` on every 429 and 503 that lacks one, so a router or client always knows when to come
    back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(Headers(scope=scope).get(HEADER))
        token = request_id.set(rid)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = rid
                if message["status"] in (429, 503) and "retry-after" not in headers:
                    headers["Retry-After"] = "1"
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            request_id.reset(token)


class _WithRequestId(logging.Formatter):
    """Wraps a handler's formatter: its line, then the request id when the line is about a request."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _add_request_id(record: logging.LogRecord) -> bool:
    if getattr(record, "request_id", None) is None:  # the engine thread names its job's id itself
        record.request_id = request_id.get()
    return True


def install_request_logging(log_format: str) -> None:
    """Give every configured handler the request id (text: appended; json: one object per line). Call after
    logging is configured (the CLI's handler, uvicorn's own); idempotent."""
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _add_request_id not in handler.filters:
                handler.addFilter(_add_request_id)
            if log_format == "json":
                if not isinstance(handler.formatter, JsonFormatter):
                    handler.setFormatter(JsonFormatter())
            elif not isinstance(handler.formatter, _WithRequestId):
                handler.setFormatter(_WithRequestId(handler.formatter))
