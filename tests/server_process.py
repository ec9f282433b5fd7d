"""`canary-server serve` as a real child process, for tests of signals, memory caps and raw HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# Sets the child's address-space and descriptor limits before anything is imported, then runs
# `python -m canary_server`.
_BOOT = (
    "import resource, runpy, sys; cap = int(sys.argv.pop(1)); files = int(sys.argv.pop(1)); "
    "cap > 0 and resource.setrlimit(resource.RLIMIT_AS, (cap, cap)); "
    "files > 0 and resource.setrlimit(resource.RLIMIT_NOFILE, (files, files)); "
    "sys.argv[0] = 'canary-server'; runpy.run_module('canary_server', run_name='__main__')"
)
_LISTENING = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)  # its stderr and stdout so far
    reader: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.lines)

    def signal(self, sig: int = signal.SIGTERM) -> float:
        """Send `sig`; returns the monotonic time it was sent."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        return sent

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """(exit status, monotonic time it was seen)."""
        status = self.proc.wait(timeout)
        return status, time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(
    model: Path,
    *,
    memory_cap: int = 0,
    descriptor_limit: int = 0,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start `canary-server serve --model MODEL --port 0` (settings through CANARY_* `env`; `memory_cap` bytes of
    address space, `descriptor_limit` open files, soft and hard, as `ulimit -n` sets them; 0: none; working
    directory `cwd`), wait until /health is 200. Stop it with `stop_server`."""
    child_env = {**os.environ, "CANARY_LOG_LEVEL": "info", "CANARY_WYOMING_PORT": "0", **(env or {})}
    cmd = [
        sys.executable,
        "-c",
        _BOOT,
        str(memory_cap),
        str(descriptor_limit),
        "serve",
        "--model",
        str(model),
        "--port",
        "0",
    ]
    # stderr and stdout (uvicorn's access log) in one pipe, in order
    proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    server = ServerProcess(proc)
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            server.lines.append(line)
            m = _LISTENING.search(line)
            if m and not found.is_set():
                server.url = f"http://{m.group(1)}:{m.group(2)}"
                found.set()

    server.reader = threading.Thread(target=read, name="server-stderr", daemon=True)
    server.reader.start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"the server did not start:\n{server.log()}")
    with httpx.Client(base_url=server.url) as client:
        while client.get("/health").status_code != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(server)
                raise RuntimeError(f"the server did not get ready:\n{server.log()}")
            time.sleep(0.02)
    return server


def stop_server(server: ServerProcess, terminate: bool = False) -> None:
    """Kill it (or SIGTERM it: `terminate`), wait, and collect its log reader."""
    if server.proc.poll() is None:
        if terminate:
            server.proc.terminate()
        else:
            server.proc.kill()
    server.proc.wait(30)
    if server.reader is not None:
        server.reader.join(10)  # EOF once the process is gone
    server.proc.stdout.close()
