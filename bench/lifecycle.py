"""A server's life around long files: idle RSS after bursts of them, and a SIGTERM with them in flight.

Runs `python -m canary_server serve` (the interpreter given by --python, so another checkout's venv can be measured
the same way) on the espeak-trained test model (`../shared/models/espeak-tiny-en.nemo`: a tiny Canary-architecture
network trained with NeMo on espeak-ng speech, NOT a real Canary) and prints a Markdown table:

* RSS of the fresh server, then after each burst of `--files` concurrent `--seconds`-long files, measured
  `--settle` seconds after the last answer, and the peak (VmHWM);
* a SIGTERM `--signal-after` seconds after sending `--files` more such files: when each is answered (status) and when
  the process exits (shutdown_grace_seconds = `--grace`).

    .venv/bin/python bench/lifecycle.py [--python OTHER/.venv/bin/python] [--bursts 3] [--files 4] [--seconds 300]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from serving import wait_healthy

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"


def long_flac(seconds: float) -> bytes:
    clips = [sf.read(p, dtype="float32")[0] for p in sorted((SHARED / "espeak-tiny-en-clips").glob("*.wav"))]
    one = np.concatenate([np.concatenate([c, np.zeros(8000, np.float32)]) for c in clips])
    buf = io.BytesIO()
    sf.write(buf, np.tile(one, -(-int(seconds * 16000) // one.size))[: int(seconds * 16000)], 16000, format="FLAC")
    return buf.getvalue()


class Server:
    def __init__(self, python: str, model: Path, port: int, grace: float) -> None:
        env = {**os.environ, "CANARY_LOG_LEVEL": "warning", "CANARY_SHUTDOWN_GRACE_SECONDS": str(grace)}
        env["CANARY_WYOMING_PORT"] = "0"  # HTTP only (where the server has Wyoming)
        cmd = [python, "-m", "canary_server", "serve", "--model", str(model), "--port", str(port)]
        # Not from this checkout's directory: `python -m` would import its canary_server, not the interpreter's.
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, cwd=model.parent)
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.proc, self.url, 300)

    def mib(self, field: str = "VmRSS") -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(field + r":\s+(\d+) kB", status).group(1)) / 1024

    def send(self, data: bytes, n: int) -> tuple[list[threading.Thread], list]:
        answers: list = []

        def post() -> None:
            url = f"{self.url}/v1/audio/transcriptions"
            try:
                r = httpx.post(url, data={"model": "whisper-1"}, files={"file": data}, timeout=900)
                answers.append((r.status_code, time.monotonic()))
            except httpx.HTTPError as exc:
                answers.append((type(exc).__name__, time.monotonic()))

        threads = [threading.Thread(target=post) for _ in range(n)]
        for t in threads:
            t.start()
        return threads, answers

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter whose canary_server is measured")
    ap.add_argument("--model", type=Path, default=SHARED / "espeak-tiny-en.nemo")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--signal-after", type=float, default=4.0)
    ap.add_argument("--grace", type=float, default=5.0)
    ap.add_argument("--port", type=int, default=0, help="default: a free one")
    args = ap.parse_args()
    data = long_flac(args.seconds)
    if not args.port:
        with socket.socket() as s:  # a free port, released for the server to take
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model.suffix == ".nemo":  # converted by the measured checkout's own converter
            model = Path(tmp) / "model"
            cmd = [args.python, "-m", "canary_server", "convert", str(args.model), str(model)]
            subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        server = Server(args.python, model, args.port, args.grace)
        try:
            rows.append(("RSS, fresh", f"{server.mib():.0f} MiB"))
            for burst in range(1, args.bursts + 1):
                began = time.monotonic()
                threads, answers = server.send(data, args.files)
                for t in threads:
                    t.join()
                took = time.monotonic() - began
                time.sleep(args.settle)
                codes = sorted({str(c) for c, _ in answers})
                rows.append(
                    (
                        f"RSS {args.settle:g} s after burst {burst} ({args.files} x {args.seconds:g} s, {took:.0f} s, "
                        f"{'/'.join(codes)})",
                        f"{server.mib():.0f} MiB",
                    )
                )
            rows.append(("RSS peak (VmHWM)", f"{server.mib('VmHWM'):.0f} MiB"))
            threads, answers = server.send(data, args.files)
            time.sleep(args.signal_after)
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(900)
            exited = time.monotonic() - sent
            for t in threads:
                t.join()
            after = sorted((round(at - sent, 1), code) for code, at in answers)
            rows.append(
                (f"SIGTERM {args.signal_after:g} s after {args.files} more: answers (s after, status)", f"{after}")
            )
            rows.append((f"SIGTERM: exit after (shutdown_grace_seconds {args.grace:g})", f"{exited:.1f} s"))
        finally:
            server.stop()
    print(f"\n| {args.python} | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
