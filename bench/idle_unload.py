"""idle_unload_seconds: the process's memory with the model loaded, after the idle unload, and what the first
request after it costs (the reload).

In-process (`canary_server.load(..., idle_unload_seconds=...)`, the same engine the server runs); RSS from
/proc/self/status (Linux) or ru_maxrss-free `ps` (macOS). Models: random-weight models with canary-180m-flash /
1b-flash dimensions (bench/random_model.py; decode length forced to round(4 * seconds) tokens as
bench/serve_capped.py does, since random weights never stop) and the espeak-trained tiny English model.

    .venv/bin/python bench/idle_unload.py [--models 180m-flash,1b-flash] [--repeats 3]

Prints a Markdown table. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared" / "models"
CACHE = Path.home() / ".cache" / "canary-bench"

import canary_server  # noqa: E402, I001  (first: preloads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from canary_server.pipeline.engine import EngineState  # noqa: E402
from serve_capped import force_decode_length  # noqa: E402
from synth import speech_like  # noqa: E402


def rss_mb() -> float:
    if sys.platform.startswith("linux"):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, check=True)
    return int(out.stdout) / 1024


def model_dir(name: str, tmp: Path, cache: Path) -> Path:
    if name == "espeak":
        from canary_server.convert import convert_nemo

        return convert_nemo(SHARED / "espeak-tiny-en.nemo", tmp / "espeak-tiny-en")
    path = cache / name
    subprocess.run([sys.executable, str(BENCH / "random_model.py"), name, "--out", str(path)], check=True)
    return path


def wait_for(engine, state: EngineState) -> None:
    while engine.state is not state:
        time.sleep(0.01)


def row(name: str, tmp: Path, repeats: int, idle: float, cache: Path) -> str:
    path = model_dir(name, tmp, cache)
    audio = speech_like(5.0, seed=5)
    base = rss_mb()
    loaded, unloaded, warm, cold, loads = [], [], [], [], []
    with canary_server.load(path, dtype="float32", idle_unload_seconds=idle) as m:
        engine = m.pipeline.engine
        first_load = engine.load_seconds
        for _ in range(repeats):
            m.transcribe(audio)  # (re)loads if needed
            t = time.perf_counter()
            m.transcribe(audio)
            warm.append(time.perf_counter() - t)
            loaded.append(rss_mb())
            wait_for(engine, EngineState.UNLOADED)
            unloaded.append(rss_mb())
            t = time.perf_counter()
            m.transcribe(audio)  # waits for the reload
            cold.append(time.perf_counter() - t)
            loads.append(engine.load_seconds)
            wait_for(engine, EngineState.UNLOADED)
    med = statistics.median
    return (
        f"| {name} | {base:.0f} | {med(loaded):.0f} | {med(unloaded):.0f} | {med(loaded) - med(unloaded):.0f} | "
        f"{first_load:.2f} | {med(loads):.2f} | {med(warm) * 1e3:.0f} | {med(cold) * 1e3:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="180m-flash,1b-flash")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle", type=float, default=1.0, help="idle_unload_seconds used here")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=CACHE,
        help="where the random-weight models are written (default: ~/.cache/canary-bench)",
    )
    args = ap.parse_args()
    force_decode_length()  # the bench's forced decode length
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(name, Path(tmp), args.repeats, args.idle, args.cache_dir) for name in args.models.split(",")]
    print(
        f"\nmachine: {platform.machine()} {platform.system()}, MLX {mx.__version__} ({mx.default_device()}), float32;"
    )
    print(f"a 5 s request; medians of {args.repeats} unload/reload cycles; RSS in MB, times in s or ms\n")
    print(
        "| model | RSS before loading | RSS loaded | RSS after idle unload | freed | first load (s) | reload (s) "
        "| warm request (ms) | first request after unload (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
