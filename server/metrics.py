"""Prometheus metrics of one app: HTTP requests counted as they end, the pipeline's state read at scrape time.

Each app has its own `CollectorRegistry` (tests build several apps in one process). HTTP counts and total latency
come from `MetricsMiddleware`; everything the engine knows (queue, rows, queue wait and decode times, audio and
tokens, memory, sessions) is read from the pipeline's `snapshot()` by `PipelineCollector` when /metrics is read,
so nothing is copied on the request path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from canary_server.pipeline.stats import Histogram as TimeHistogram
from canary_server.pipeline.stats import StatsSnapshot

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
ENGINE_STATES = ("loading", "ready", "unloaded", "reloading", "failed", "closing", "closed")


class PipelineCollector(Collector):
    """The pipeline's gauges and counters, from one `snapshot()` per scrape."""

    def __init__(self, snapshot: Callable[[], StatsSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield _gauge("canary_queue_requests", "Requests accepted, not answered yet.", s.queued_requests)
        yield _gauge("canary_queue_audio_seconds", "Seconds of audio held by those requests.", s.queued_audio_seconds)
        yield _gauge("canary_queue_limit_requests", "max_queued_requests: more get 429.", s.max_queued_requests)
        yield _gauge("canary_decoder_active_rows", "Decoder rows stepping now (beam: beam_size per sequence).",
                     s.active_rows)  # fmt: skip
        state = GaugeMetricFamily("canary_engine_state", "The engine's state (1: current).", labels=["state"])
        for name in ENGINE_STATES:
            state.add_metric([name], 1.0 if s.state == name else 0.0)
        yield state
        outcomes = CounterMetricFamily("canary_engine_requests", "Requests the engine ended, by outcome.",
                                       labels=["outcome"])  # fmt: skip
        for outcome, n in sorted(s.requests.items()):
            outcomes.add_metric([outcome], n)
        yield outcomes
        yield CounterMetricFamily("canary_audio_seconds", "Seconds of audio of completed requests.", s.audio_seconds)
        yield CounterMetricFamily("canary_tokens", "Tokens generated for completed requests.", s.tokens)
        yield _histogram("canary_queue_wait_seconds", "From accepted to its first piece taken up.", s.queue_wait)
        yield _histogram("canary_decode_seconds", "From taken up to answered (completed requests).", s.decode)
        if s.mlx_active_bytes is not None:
            yield _gauge("canary_mlx_active_memory_bytes", "MLX arrays in use.", s.mlx_active_bytes)
            yield _gauge("canary_mlx_peak_memory_bytes", "MLX's peak of arrays in use.", s.mlx_peak_bytes)
        sessions = GaugeMetricFamily("canary_sessions", "Open front-door sessions, by kind.", labels=["kind"])
        for kind, n in sorted({"wyoming": 0, "realtime": 0, **s.sessions}.items()):
            sessions.add_metric([kind], n)
        yield sessions


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, h: TimeHistogram) -> HistogramMetricFamily:
    buckets, running = [], 0
    for bound, n in zip([*map(str, h.bounds), "+Inf"], h.counts, strict=True):
        running += n
        buckets.append((bound, running))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class Metrics:
    """One app's registry: HTTP metrics written by the middleware, the pipeline's read at scrape time."""

    def __init__(self, snapshot: Callable[[], StatsSnapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "canary_http_requests",
            "HTTP requests answered, by route, status and model.",
            ["route", "status", "model"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "canary_http_request_duration_seconds",
            "From the request's arrival to its last response byte (streams: the end of the stream).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(PipelineCollector(snapshot))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, fds (Linux)


def _route_label(scope: Scope) -> str:
    """The path of a request the router matched; a route with parameters by its template (its own path, without
    an include prefix); anything unmatched is "other", so hostile paths cannot grow the label set."""
    route = scope.get("route")
    if route is None:
        return "other"
    template = getattr(route, "path", "")
    return template if "{" in template else scope["path"]


class MetricsMiddleware:
    """Counts each HTTP request when its response ends, by `_route_label`; `model` is what the route put on
    `request.state.model` (a served model name, checked) or ""."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # the app raised before answering

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = _route_label(scope)
            model = str(scope.get("state", {}).get("model", ""))
            self.metrics.requests.labels(route, str(status), model).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)
