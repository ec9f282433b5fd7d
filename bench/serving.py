"""Wait for a `canary-server serve` started by a bench script (shared by the bench scripts; not a bench itself)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, detail: Callable[[], str] = lambda: "") -> None:
    """Return once `url`/health answers 200; raise if the process exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start{detail()}")
        time.sleep(0.2)
