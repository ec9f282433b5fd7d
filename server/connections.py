"""Every HTTP connection has a deadline, and there are never more of them than the process has descriptors for.

uvicorn's h11 protocol closes idle keep-alive connections but has no deadline for a request's headers or body:
a client that connects and sends nothing, or sends half a request, held its socket (and its spooled upload)
forever, and 1100 of them took the server down at the 1024-descriptor limit. `deadline_protocol` makes an h11
protocol class (passed to uvicorn as `http=`) whose connections are in one of three phases:

- headers: from the connection (or the previous response) until a request's headers are in; `header_timeout`;
- body: until the request body is in; `body_timeout` plus 1 s per `body_min_rate` bytes received;
- app: the request is in and the app answers it; no deadline here (the pipeline has its own).

Past the cap a new connection closes the oldest one waiting for its first request's headers (a client that sends
its request at once is never the oldest; one kept alive between requests only when no other waits), or is refused
with a 503 when every connection is busy. Descriptors are counted before `accept()` could fail: the cap is kept
below half the soft RLIMIT_NOFILE (each upload may also hold a spool file), less the listen backlog that one
accept burst can take.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("canary.server")

# Connections waiting in the kernel's queue; one accept burst takes up to this many descriptors at once.
LISTEN_BACKLOG = 128
# Descriptors kept for everything else: the model's files, logs, the Wyoming port, decoder threads.
RESERVED_DESCRIPTORS = 64
# At most one summary line per this many seconds about connections closed or refused (the log stays bounded).
LOG_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    body_min_rate: float  # bytes per second
    max_connections: int


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where the OS allows; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    target = hard if hard != resource.RLIM_INFINITY else 65536
    # macOS refuses more than OPEN_MAX (10240) even under an unlimited hard limit: then try that
    for wanted in (target, min(target, 10240)):
        if soft >= wanted:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return wanted
        except (ValueError, OSError):
            continue
    return soft


def connection_cap(wanted: int, descriptors: int) -> int:
    """`wanted`, kept where two descriptors per connection plus one accept burst fit under `descriptors`."""
    return max(1, min(wanted, (descriptors - RESERVED_DESCRIPTORS) // 2 - LISTEN_BACKLOG))


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


_TIMED_OUT = _raw_response(408, "Request Timeout", "the request headers did not arrive in time", "request_timeout")
_FULL = _raw_response(503, "Service Unavailable", "too many open connections; retry", "too_many_connections")


class _Registry:
    """The open connections of one server, those waiting for headers in the order they began to wait, and
    counts for the summary log line."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open: set[DeadlineH11Protocol] = set()
        self.waiting: dict[DeadlineH11Protocol, None] = {}  # insertion-ordered: the oldest first
        self.counts = {"closed waiting for headers": 0, "closed mid-body": 0, "evicted": 0, "refused": 0}
        self._logged_at = -LOG_EVERY_SECONDS
        self._pending = False  # a summary line is due

    def admit(self, conn: DeadlineH11Protocol) -> bool:
        if len(self.open) >= self.cap:
            if not self.waiting:
                self.count("refused")
                return False
            oldest = self._eviction_candidate()
            self.count("evicted")
            oldest.close_now()
        self.open.add(conn)
        return True

    def _eviction_candidate(self) -> DeadlineH11Protocol:
        """The oldest connection still waiting for its first request; only when there is none, the oldest kept
        alive between requests (its client may be sending the next one this instant: closing it loses that)."""
        return next((c for c in self.waiting if not c.served), next(iter(self.waiting)))

    def forget(self, conn: DeadlineH11Protocol) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)

    def count(self, what: str) -> None:
        """Count a connection closed or refused; log the counts now, or once LOG_EVERY_SECONDS have passed since the
        last line (called on the event loop)."""
        self.counts[what] += 1
        wait = self._logged_at + LOG_EVERY_SECONDS - time.monotonic()
        if wait <= 0:
            self._log()
        elif not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_later(wait, self._log)

    def _log(self) -> None:
        self._logged_at, self._pending = time.monotonic(), False
        summary = ", ".join(f"{k}: {v}" for k, v in self.counts.items() if v)
        log.warning("HTTP connections (cap %d, open %d) since start: %s", self.cap, len(self.open), summary)


class RepeatFilter(logging.Filter):
    """Lets through one of each message uvicorn logs per bad connection ("Invalid HTTP request received.") every
    LOG_EVERY_SECONDS, saying how many were dropped: a flood of garbage cannot grow the log without bound."""

    NOISY = ("Invalid HTTP request received.", "Unsupported upgrade request.", "No supported WebSocket library")

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        key = next((k for k in self.NOISY if message.startswith(k)), None)
        if key is None:
            return True
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{message} ({dropped} more like it not logged)"
        return True


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines and a cap (see the module's docstring)."""

    limits: ConnectionLimits
    registry: _Registry

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = ""
        self._timer: asyncio.TimerHandle | None = None
        self._body_start = 0.0
        self._body_bytes = 0
        self._got_bytes = False
        self.served = False  # a response was sent: kept alive between requests
        if not self.registry.admit(self):
            transport.write(_FULL)
            transport.close()
            return
        self._enter("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.registry.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "body":
            self._body_bytes += len(data)
        elif self._phase == "headers":
            self._got_bytes = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._update_phase()

    def on_response_complete(self) -> None:
        self.served = True
        super().on_response_complete()
        self._update_phase()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._cancel_timer()  # the WebSocket protocol takes the transport over
        self.registry.forget(self)
        super().handle_websocket_upgrade(event)

    def shutdown(self) -> None:
        # A request whose headers or body have not arrived has nothing to wait for: close it now, so that a
        # client stuck mid-body cannot hold the shutdown (its app task sees a disconnect and ends).
        if self._phase in ("headers", "body"):
            self.close_now()
        else:
            super().shutdown()

    def close_now(self) -> None:
        self._cancel_timer()
        self.registry.forget(self)
        if not self.transport.is_closing():
            self.transport.close()

    # ---- phases and deadlines ----------------------------------------------------------------------------
    def _update_phase(self) -> None:
        if self.transport.is_closing() or self._phase == "":
            return
        cycle, theirs = self.cycle, self.conn.their_state
        if cycle is None or (cycle.response_complete and theirs is h11.IDLE):
            phase = "headers"
        elif theirs is h11.SEND_BODY:
            phase = "body"
        else:
            phase = "app"
        if phase != self._phase:
            self._enter(phase)

    def _enter(self, phase: str) -> None:
        self._cancel_timer()
        self._phase = phase
        self.registry.waiting.pop(self, None)
        if phase == "headers":
            self.registry.waiting[self] = None
            self._got_bytes = False
            self._timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)
        elif phase == "body":
            self._body_start, self._body_bytes = self.loop.time(), 0
            self._timer = self.loop.call_later(self.limits.body_timeout, self._check_body)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self._phase != "headers" or self.transport.is_closing():
            return
        self.registry.count("closed waiting for headers")
        if self._got_bytes:  # a half-sent request is told why; a silent idle connection is just closed
            self.transport.write(_TIMED_OUT)
        self.close_now()

    def _check_body(self) -> None:
        self._timer = None
        if self._phase != "body" or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the app is not reading (not the client's fault): start counting again
            self._body_start = now - self._body_bytes / self.limits.body_min_rate
            self._timer = self.loop.call_later(self.limits.body_timeout, self._check_body)
            return
        deadline = self._body_start + self.limits.body_timeout + self._body_bytes / self.limits.body_min_rate
        if now < deadline:
            self._timer = self.loop.call_later(deadline - now, self._check_body)
            return
        self.registry.count("closed mid-body")
        self.close_now()  # the app's receive() gets http.disconnect; its spooled upload is closed with it


def deadline_protocol(limits: ConnectionLimits) -> type[DeadlineH11Protocol]:
    """A protocol class for one server: its connections share `limits` and one registry. Also quiets uvicorn's
    per-connection warnings (`RepeatFilter`)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RepeatFilter) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(RepeatFilter())
    attrs = {"limits": limits, "registry": _Registry(limits.max_connections)}
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), attrs)
