"""Who may use the server: the Host allow-list, the Origin rule (browser pages) and the API key, all checked
before a request body is read, and warnings about an exposed bind.

The checks are plain ASGI middleware rather than FastAPI dependencies: FastAPI parses a form body before it
resolves a route's dependencies, so a dependency would read a whole unauthenticated upload first.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from canary_server.server.errors import ApiError, error_body
from canary_server.server.settings import Settings

# RFC 6761: *.localhost names resolve to loopback; Debian's /etc/hosts names ::1 ip6-localhost / ip6-loopback.
LOOPBACK_NAMES = ["localhost", "*.localhost", "ip6-localhost", "ip6-loopback"]


def allowed_hosts(settings: Settings) -> list[str] | None:
    """The Host values accepted; None: any. Loopback names and IP addresses always (a DNS-rebinding page sends its
    own domain name as Host), plus the `allowed_hosts` setting; unset with an API key: any (the key protects)."""
    listed = settings.allowed_hosts
    if (listed is None and settings.api_key) or (listed is not None and "*" in listed):
        return None
    return [*LOOPBACK_NAMES, "<ip>", *(h.lower() for h in listed or [])]


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`host`: the Host header (port and IPv6 brackets allowed). An empty Host (HTTP/1.0 tools) is accepted:
    browsers always send one."""
    name = _host_name(host)
    if not name:
        return True
    for pattern in allowed:
        if pattern == "<ip>":
            if _is_ip(name):
                return True
        elif pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheckMiddleware:
    """400 for a Host header not on the allow-list, before anything else runs."""

    def __init__(self, app: ASGIApp, allowed: list[str] | None) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.allowed is not None:
            host = Headers(scope=scope).get("host", "")
            if not host_allowed(host, self.allowed):
                if scope["type"] == "websocket":  # closing before accepting answers the handshake with 403
                    await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed"})
                    return
                err = ApiError(
                    400,
                    f"Host {_host_name(host)!r} is not allowed; add it to the allowed_hosts setting",
                    code="invalid_host",
                )
                await JSONResponse(error_body(err), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def origin_allowed(origin: str, host: str, allowed: list[str]) -> bool:
    """A browser page's `Origin` may use the server when it is one of the server's own pages (same scheme-less
    host and port as the request's Host) or listed in `allowed` ("*": any)."""
    origin = origin.strip().lower().rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:  # "null" (sandboxed pages, file://), ...
        return False
    default_port = ":443" if parts.scheme == "https" else ":80"
    return parts.netloc.removesuffix(default_port) == host.strip().lower().removesuffix(default_port)


class OriginCheckMiddleware:
    """403 for a request, or a refused WebSocket handshake, whose `Origin` is a page not served here and not in
    `allowed_origins`. Browsers send Origin with cross-origin requests, and a page may POST a form to any server
    (no CORS preflight); clients that are not browsers send none and are not affected."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app, self.allowed = app, [o.strip().lower().rstrip("/") for o in allowed]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not origin_allowed(origin, headers.get("host", ""), self.allowed):
                if scope["type"] == "websocket":  # closing before accepting answers the handshake with 403
                    await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
                    return
                err = ApiError(
                    403,
                    f"requests from web pages at {origin[:200]!r} are not allowed; add the origin to the "
                    "allowed_origins setting",
                    code="invalid_origin",
                )
                await JSONResponse(error_body(err), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def add_origin_rules(app: FastAPI, settings: Settings) -> None:
    """The Origin check, and CORS headers (preflight answers included) for the allowed origins so their pages
    can read the answers. Added after the API key check, so both run before it (a preflight has no key)."""
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(OriginCheckMiddleware, allowed=settings.allowed_origins)


WS_KEY_PREFIX = "openai-insecure-api-key."


class ApiKeyMiddleware:
    """401 for requests under `prefix` without `Authorization: Bearer <api_key>`, before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str | None, prefix: str = "/v1") -> None:
        self.app, self.key, self.prefix = app, api_key, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.key is not None and _under(scope["path"], self.prefix):
            err = check_api_key(_authorization(scope), self.key)
            if err is not None:
                if scope["type"] == "websocket":  # closing before accepting answers the handshake with 403
                    await send({"type": "websocket.close", "code": 1008, "reason": "invalid API key"})
                    return
                headers = {"WWW-Authenticate": "Bearer"}
                await JSONResponse(error_body(err), status_code=401, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorization(scope: Scope) -> str:
    """The Authorization header; on a WebSocket, browsers (which cannot set headers) may send the key as the
    subprotocol `openai-insecure-api-key.<key>`, as OpenAI's Realtime API accepts it."""
    headers = Headers(scope=scope)
    auth = headers.get("authorization", "")
    if auth or scope["type"] != "websocket":
        return auth
    for proto in scope.get("subprotocols") or []:
        if proto.startswith(WS_KEY_PREFIX):
            return "Bearer " + proto[len(WS_KEY_PREFIX) :]
    return ""


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def check_api_key(authorization: str, key: str) -> ApiError | None:
    """None when `authorization` carries the key; else the 401 to send."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        return ApiError(401, "incorrect API key provided", code="invalid_api_key")
    return None


def exposure_warnings(settings: Settings) -> list[str]:
    """Warnings for front doors that others can reach without a key."""
    warnings = []
    if settings.api_key is None and not _is_loopback(settings.host):
        warnings.append(
            f"serving HTTP on {settings.host}:{settings.port} without an api_key: anyone who can reach this machine "
            "can use the server (set api_key, or bind to 127.0.0.1). Browsers are kept out: only loopback names, IP "
            "addresses and allowed_hosts are accepted as Host."
        )
    if settings.wyoming_port and not _is_loopback(settings.wyoming_host):
        warnings.append(
            f"serving Wyoming on {settings.wyoming_host}:{settings.wyoming_port}: the Wyoming protocol has no "
            "authentication, so anyone who can reach that port can use the model (bind it to 127.0.0.1, or keep "
            "the port to a trusted network)"
        )
    return warnings


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "ip6-localhost", "ip6-loopback") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
