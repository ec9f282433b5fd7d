"""Upload limits, enforced while the body streams in rather than after buffering it: the size of one request's
body, and the bytes held by all requests in progress together (their spooled uploads, in memory or on disk)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class UploadTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit; FastAPI re-raises HTTPExceptions untouched."""

    def __init__(self, limit: int) -> None:
        mib = limit / (1024 * 1024)
        super().__init__(413, f"request body exceeds the upload limit of {mib:g} MiB ({limit} bytes)")


class UploadLimitMiddleware:
    """413 when Content-Length says too much, or as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, UploadTooLarge(self.max_bytes))  # the server discards the unread body
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class SpoolFull(HTTPException):
    """The bodies held by all requests in progress would pass the budget: retry when some have finished."""

    def __init__(self, limit: int) -> None:
        mib = limit / (1024 * 1024)
        message = f"the server holds {mib:g} MiB of uploads in progress (max_spooled_uploads_mb); retry shortly"
        super().__init__(429, message, headers={"Retry-After": "5"})


class SpoolBudgetMiddleware:
    """429 once the request bodies held by all requests in progress would pass `max_bytes`: checked against
    Content-Length before reading and counted as bytes arrive. A request's bytes are released when it ends, for
    any reason; its spooled upload file is closed by then (FastAPI closes it with the request, Starlette's form
    parser when the body stops arriving)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes, self.held = app, max_bytes, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and self.held + int(declared) > self.max_bytes:
            await _send_error(send, SpoolFull(self.max_bytes))
            return
        mine = 0

        async def counted_receive() -> Message:
            nonlocal mine
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                mine += size
                self.held += size
                if self.held > self.max_bytes:
                    raise SpoolFull(self.max_bytes)
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            self.held -= mine


async def _send_error(send: Send, exc: HTTPException) -> None:
    error_type = "rate_limit_error" if exc.status_code == 429 else "invalid_request_error"
    body = json.dumps({"error": {"message": exc.detail, "type": error_type, "param": None, "code": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
