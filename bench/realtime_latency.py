"""Latency of live transcription over OpenAI's Realtime API (`/v1/realtime?intent=transcription`), streams paced in
real time, at 1 / 4 / 16 concurrent streams, beside file requests on the same server.

`canary-server serve` runs as a subprocess. Every stream is the official `openai` SDK's realtime client
(`client.realtime.connect(..., extra_query={"intent": "transcription"})`) sending a clip as 16 kHz `audio/pcm` in
100 ms appends at real-time pace, then `input_audio_buffer.commit` (manual turns: the time speech ends is the last
append, without server VAD's silence wait). Measured per utterance:

* first partial: from the first append (speech starts with the clip) to the first `...transcription.delta`;
* final: from the commit (speech ended) to `...transcription.completed`.

Beside them, `--files` clients POST the same clip to /v1/audio/transcriptions one after another for the whole run
(their latency is reported too). A level is "sustained" when every stream's final arrives within
`--sustain-seconds` of the end of its speech (the engine keeps up with real time; an engine falling behind makes
the final wait grow with every chunk).

Model: the espeak-trained tiny English model (../shared/models, NOT a real Canary) or a converted model directory.

    .venv/bin/python bench/realtime_latency.py [--streams 1 4 16] [--utterances 3] [--files 1] [--model DIR]

Prints a Markdown table (ms: p50 / p95). Timings on a shared, loaded machine are noisy: read them with its load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from serving import wait_healthy

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared" / "models"
CLIP = SHARED / "espeak-tiny-en-clips" / "clip00.wav"  # 4.79 s
PIECE = 0.1  # seconds per append


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(model: str | None, tmp: Path) -> Path:
    if model:
        return Path(model)
    out = tmp / "espeak-tiny-en"
    cmd = [sys.executable, "-m", "canary_server", "convert", str(SHARED / "espeak-tiny-en.nemo"), str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def start_server(path: Path, port: int, sessions: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        CANARY_LOG_LEVEL="warning",
        CANARY_WYOMING_PORT="0",
        CANARY_DEFAULT_LANGUAGE="en",
        CANARY_REALTIME_MAX_SESSIONS=str(sessions),
    )
    cmd = [sys.executable, "-m", "canary_server", "serve", "--model", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    wait_healthy(proc, f"http://127.0.0.1:{port}", 600)
    return proc


async def stream(url: str, pcm: bytes, utterances: int) -> list[tuple[float, float, str]]:
    """One Realtime session sending `utterances` turns paced in real time: (first partial, final, text) each."""
    import openai

    client = openai.AsyncOpenAI(api_key="unused", base_url=url + "/v1")
    session = {
        "type": "transcription",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}},
    }
    step = int(16000 * PIECE) * 2
    pieces = [base64.b64encode(pcm[i : i + step]).decode() for i in range(0, len(pcm), step)]
    out = []
    async with client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        await conn.send({"type": "session.update", "session": session})
        for _ in range(utterances):
            first: list[float] = []
            done: asyncio.Future = asyncio.get_running_loop().create_future()

            async def read(start: float, first=first, done=done) -> None:
                async for event in conn:
                    if event.type == "error":
                        raise RuntimeError(event.error.message)
                    if event.type.endswith("transcription.delta") and not first:
                        first.append(time.perf_counter() - start)
                    if event.type.endswith("transcription.completed"):
                        done.set_result((time.perf_counter(), event.transcript))
                        return

            start = time.perf_counter()
            reader = asyncio.create_task(read(start))
            for k, piece in enumerate(pieces):  # real time: append k leaves at k * PIECE seconds
                await asyncio.sleep(max(0.0, start + k * PIECE - time.perf_counter()))
                await conn.send({"type": "input_audio_buffer.append", "audio": piece})
            await asyncio.sleep(max(0.0, start + len(pcm) / 32000 - time.perf_counter()))  # the last piece's audio
            ended = time.perf_counter()
            await conn.send({"type": "input_audio_buffer.commit"})
            finished, text = await done
            await reader
            out.append((first[0] if first else finished - start, finished - ended, text))
    return out


async def files(url: str, wav: bytes, stop: asyncio.Event) -> list[float]:
    took = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        while not stop.is_set():
            t = time.perf_counter()
            r = await client.post(
                "/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": ("a.wav", wav)}
            )
            r.raise_for_status()
            took.append(time.perf_counter() - t)
    return took


async def level(url: str, pcm: bytes, wav: bytes, n: int, utterances: int, n_files: int) -> tuple[list, list]:
    stop = asyncio.Event()
    file_tasks = [asyncio.create_task(files(url, wav, stop)) for _ in range(n_files)]
    results = await asyncio.gather(*(stream(url, pcm, utterances) for _ in range(n)))
    stop.set()
    file_times = [t for ts in await asyncio.gather(*file_tasks) for t in ts]
    return [r for rs in results for r in rs], file_times


def pct(xs: list[float], q: float) -> float:
    ms = sorted(x * 1e3 for x in xs)
    return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--utterances", type=int, default=3, help="turns per stream at each level")
    ap.add_argument("--files", type=int, default=1, help="file-request clients running beside the streams")
    ap.add_argument("--model", help="a converted model directory (default: the espeak test model)")
    ap.add_argument("--sustain-seconds", type=float, default=3.0)
    args = ap.parse_args()
    pcm16, _ = sf.read(CLIP, dtype="int16")
    pcm = np.ascontiguousarray(pcm16).tobytes()
    with open(CLIP, "rb") as f:
        wav = f.read()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args.model, Path(tmp))
        port = free_port()
        proc = start_server(path, port, max(args.streams) + 1)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(level(url, pcm, wav, 1, 1, 0))  # warm-up
            for n in args.streams:
                load = os.getloadavg()[0]
                got, file_times = asyncio.run(level(url, pcm, wav, n, args.utterances, args.files))
                first, final = [g[0] for g in got], [g[1] for g in got]
                kept_up = "yes" if max(final) <= args.sustain_seconds else "no"
                files_col = f"{pct(file_times, 0.5):.0f} / {pct(file_times, 0.95):.0f}" if file_times else "-"
                rows.append(
                    f"| {n} | {len(got)} | {pct(first, 0.5):.0f} / {pct(first, 0.95):.0f} "
                    f"| {pct(final, 0.5):.0f} / {pct(final, 0.95):.0f} | {files_col} ({len(file_times)}) "
                    f"| {kept_up} | {load:.1f} |"
                )
                print(f"{n} streams: texts {sorted({g[2] for g in got})}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    machine = f"{platform.machine()} {platform.system()} ({os.cpu_count()} CPUs, shared)"
    print(f"\nmachine: {machine}; clip {len(pcm16) / 16000:.2f} s, paced in real time; ms p50 / p95\n")
    print(
        "| streams | utterances | first partial after speech start | final after speech end "
        f"| file requests beside (n) | all finals within {args.sustain_seconds:g} s | load average |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
