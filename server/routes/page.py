"""GET /: the browser page (microphone -> live transcript over the Realtime WebSocket; a dropped file -> its
transcript with times), and its script, worklet and style under /static/. Plain files shipped in the package
(server/static/), read once; nothing is fetched from elsewhere, and the Content-Security-Policy says so to the
browser: scripts, styles, workers and connections from this server only, no inline code, no framing."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from canary_server.server.errors import ApiError, ErrorRoute

router = APIRouter(route_class=ErrorRoute)

# 'self' covers this server's ws:// and wss:// URLs too (CSP 3), which the live transcript connects to.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "media-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded server serves its new page at once
}
# The files under /static/, by name (an allow-list: a request names a file, never a path).
STATIC = {
    "page.js": "text/javascript; charset=utf-8",
    "pcm-worklet.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("canary_server.server") / "static" / name).read_bytes()


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    media_type = STATIC.get(name)
    if media_type is None:
        raise ApiError(404, f"no file {name[:100]!r} here", code="not_found")
    return Response(_read(name), media_type=media_type, headers=HEADERS)
