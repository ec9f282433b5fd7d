"""GET /metrics: Prometheus' text format, behind the same Host rules and API key as the API (a scraper sends
`Authorization: Bearer <api_key>`), and with `metrics_loopback_only` only to clients on this machine."""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from canary_server.server.errors import ApiError, ErrorRoute
from canary_server.server.security import check_api_key

router = APIRouter(route_class=ErrorRoute)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    settings = request.app.state.settings
    if settings.metrics_loopback_only and not _from_loopback(request):
        raise ApiError(403, "/metrics is served to this machine only (metrics_loopback_only)", code="forbidden")
    if settings.api_key is not None:
        err = check_api_key(request.headers.get("authorization", ""), settings.api_key)
        if err is not None:
            err.headers = {"WWW-Authenticate": "Bearer"}
            raise err
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _from_loopback(request: Request) -> bool:
    """The client address uvicorn reports: the TCP peer, or what a proxy the server trusts forwarded (issue 19's
    trusted_proxies); never a header this route reads itself. A router on this machine that is not trusted makes
    every client loopback: bench/router/haproxy.cfg refuses /metrics for that reason."""
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
