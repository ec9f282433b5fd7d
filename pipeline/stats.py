"""What the engine has done and is doing, for monitoring (`/metrics`, `/health`): a small object the pipeline owns.

The engine thread records into it (requests ended, audio seconds and tokens, queue wait and decode times, active
decoder rows, MLX memory); front doors count their sessions; a reader takes a consistent `snapshot()` from any
thread. Nothing here knows of Prometheus or HTTP: the server turns snapshots into metrics at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field

# The id of the request the current task serves (a front door sets it: HTTP's X-Request-ID). The engine keeps it
# with each job, so its own log lines about one request carry it too.
request_id: ContextVar[str | None] = ContextVar("canary_request_id", default=None)

# Seconds: from a short clip's queue wait on an idle engine to a long file's decode.
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass
class Histogram:
    """Counts of observations at or below each bound (not cumulative), the +Inf bucket last, and their sum."""

    bounds: tuple[float, ...] = TIME_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass(frozen=True)
class StatsSnapshot:
    """One consistent reading of `PipelineStats` plus the engine's queue (see the fields' comments)."""

    state: str  # EngineState value
    queued_requests: int  # accepted and not answered (waiting or decoding)
    queued_audio_seconds: float  # their audio
    max_queued_requests: int
    max_queued_audio_seconds: float | None
    active_rows: int  # decoder rows stepping now (a beam sequence has beam_size rows)
    requests: dict[str, int]  # completed / failed / cancelled / refused
    audio_seconds: float  # of requests completed
    tokens: int  # generated for requests completed
    queue_wait: Histogram  # accepted -> its first piece left the waiting list
    decode: Histogram  # that moment -> the request ended (completed)
    mlx_active_bytes: int | None
    mlx_peak_bytes: int | None
    sessions: dict[str, int]  # open front-door sessions by kind ("wyoming")

    @property
    def busy(self) -> bool:
        """The next request would be refused (429): the queue is at its bound of requests or audio."""
        full_seconds = self.max_queued_audio_seconds is not None and self.queued_audio_seconds >= (
            self.max_queued_audio_seconds
        )
        return self.queued_requests >= self.max_queued_requests or (self.queued_requests > 0 and full_seconds)


class PipelineStats:
    """Counters and gauges written by the engine thread and front doors, read by monitoring (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Requests ended by outcome: the engine's `stats` dict itself (its JobBook counts into it).
        self.requests = {"completed": 0, "failed": 0, "cancelled": 0, "refused": 0}
        self.audio_seconds = 0.0
        self.tokens = 0
        self.queue_wait = Histogram()
        self.decode = Histogram()
        self.active_rows = 0
        self.mlx_memory: tuple[int, int] | None = None  # (active, peak) bytes, sampled by the engine thread
        self.sessions: dict[str, int] = {}

    def started(self, waited: float) -> None:
        with self._lock:
            self.queue_wait.observe(waited)

    def completed(self, seconds: float, tokens: int, decoding: float) -> None:
        """A request was answered (the engine's `requests` dict counts it; this adds what it held and took)."""
        with self._lock:
            self.audio_seconds += seconds
            self.tokens += tokens
            self.decode.observe(decoding)

    def session(self, kind: str, delta: int) -> None:
        """A front door opened (+1) or closed (-1) a session of `kind`."""
        with self._lock:
            self.sessions[kind] = self.sessions.get(kind, 0) + delta

    def snapshot(self, *, state: str, queue: tuple[int, float], limits: tuple[int, float | None]) -> StatsSnapshot:
        with self._lock:
            memory = self.mlx_memory
            return StatsSnapshot(
                state=state,
                queued_requests=queue[0],
                queued_audio_seconds=max(0.0, queue[1]),
                max_queued_requests=limits[0],
                max_queued_audio_seconds=limits[1],
                active_rows=self.active_rows,
                requests=dict(self.requests),
                audio_seconds=self.audio_seconds,
                tokens=self.tokens,
                queue_wait=self.queue_wait.copy(),
                decode=self.decode.copy(),
                mlx_active_bytes=memory[0] if memory else None,
                mlx_peak_bytes=memory[1] if memory else None,
                sessions=dict(self.sessions),
            )
