"""Throughput of one `canary-server serve` instance against two behind HAProxy (bench/router/haproxy.cfg).

Two instances run the espeak-trained test model (`../shared/models/espeak-tiny-en.nemo`: a tiny Canary-architecture
network trained with NeMo on espeak-ng speech, NOT a real Canary) on this machine. The same requests (the model's
shipped clips, round robin, plain JSON) are sent with the same concurrency straight to one instance, then through
the router to both; rounds alternate so machine noise hits both alike. Prints a Markdown table.

Both instances share this machine's cores: on a machine whose cores one instance already keeps busy, a second one
cannot add throughput (it measures the router's overhead and the instances' contention); the gain of a second
instance is what a second machine adds.

    .venv/bin/python bench/router_throughput.py [--requests 60] [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from router_process import haproxy_binary, missing_haproxy_reason, start_router, stop_router  # noqa: E402
from server_process import start_server, stop_server  # noqa: E402

SHARED = REPO.parent / "shared" / "models"


def run_load(url: str, clips: list[bytes], requests: int, concurrency: int) -> float:
    """Seconds to answer `requests` requests, `concurrency` at a time; every one must be a 200."""

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            r = client.post("/v1/audio/transcriptions", files={"file": ("c.wav", clips[i % len(clips)])},
                            data={"model": "whisper-1"})  # fmt: skip
            r.raise_for_status()

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return time.monotonic() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if haproxy_binary() is None:
        sys.exit(missing_haproxy_reason())
    from canary_server.convert import convert_nemo

    paths = sorted((SHARED / "espeak-tiny-en-clips").glob("*.wav"))
    clips = [path.read_bytes() for path in paths]
    seconds = sum(sf.info(str(paths[i % len(paths)])).duration for i in range(args.requests))
    with tempfile.TemporaryDirectory() as tmp:
        model = convert_nemo(SHARED / "espeak-tiny-en.nemo", Path(tmp) / "model")
        a, b = start_server(model), start_server(model)
        router = None
        try:
            router = start_router(a.url, b.url)
            run_load(a.url, clips, len(clips), args.concurrency)  # warm both before timing
            run_load(router.url, clips, 2 * len(clips), args.concurrency)
            times: dict[str, list[float]] = {"one instance (direct)": [], "two instances behind HAProxy": []}
            load = os.getloadavg()[0]
            for _ in range(args.rounds):
                times["one instance (direct)"].append(run_load(a.url, clips, args.requests, args.concurrency))
                times["two instances behind HAProxy"].append(
                    run_load(router.url, clips, args.requests, args.concurrency)
                )
        finally:
            if router is not None:
                stop_router(router)
            stop_server(a)
            stop_server(b)
    print(f"{args.requests} requests ({seconds:.0f} s of audio), {args.concurrency} at a time, {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the start\n")  # fmt: skip
    print("| setup | wall s per round | requests/s (median) | audio s per s (median) |")
    print("|---|---|---|---|")
    for name, walls in times.items():
        wall = statistics.median(walls)
        rounds = " / ".join(f"{w:.1f}" for w in walls)
        print(f"| {name} | {rounds} | {args.requests / wall:.2f} | {seconds / wall:.1f} |")


if __name__ == "__main__":
    main()
