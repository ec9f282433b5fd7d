"""HAProxy with the repository's `bench/router/haproxy.cfg` in front of two instances, as a child process (tests
and bench/router.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from server_process import ServerProcess, stop_server

CONFIG = Path(__file__).resolve().parents[1] / "bench" / "router" / "haproxy.cfg"
# Homebrew's prefixes on Apple silicon and Intel Macs; Debian's /usr/sbin may be off a user's PATH.
_PLACES = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy", "/opt/homebrew/bin/haproxy", "/usr/local/bin/haproxy")


def haproxy_binary() -> str | None:
    found = shutil.which("haproxy")
    return found or next((p for p in _PLACES if os.access(p, os.X_OK)), None)


def missing_haproxy_reason() -> str:
    if sys.platform == "darwin":
        return "haproxy is not installed (brew install haproxy)"
    return "haproxy is not installed: scripts/setup.sh --dev installs it (apt-get install haproxy)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Router = ServerProcess  # the same handle: process, URL, its log lines (one per request, health changes), reader


def start_router(a: str, b: str, timeout: float = 30, wait_for_both: bool = True) -> Router:
    """HAProxy on a free loopback port routing to instances `a` and `b` (base URLs); returns once a request has
    been answered by each (both health checks passed; `wait_for_both=False`: once it listens). Stop it with
    `stop_router`."""
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError(missing_haproxy_reason())
    port = free_port()
    env = {**os.environ, "CANARY_ROUTER_BIND": f"127.0.0.1:{port}", "CANARY_A": _address(a), "CANARY_B": _address(b)}
    cmd = [binary, "-db", "-f", str(CONFIG)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    router = Router(proc, f"http://127.0.0.1:{port}")
    router.reader = threading.Thread(target=lambda: router.lines.extend(proc.stdout), daemon=True)
    router.reader.start()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=router.url, timeout=5) as client:
        while seen != {"a", "b"} if wait_for_both else not seen:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_router(router)
                raise RuntimeError(f"haproxy did not route to both instances (saw {seen}):\n{router.log()}")
            try:
                r = client.get("/health/ready")
                if r.status_code == 200 or not wait_for_both:
                    seen.add(r.headers.get("X-Canary-Instance", ""))
            except httpx.TransportError:
                time.sleep(0.05)  # not listening yet
    return router


def stop_router(router: Router) -> None:
    stop_server(router, terminate=True)


def _address(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")
