"""Latency of one 3 s utterance over Wyoming (Home Assistant's protocol) vs the same audio over HTTP, same server.

`canary-server serve` runs as a subprocess with both front doors (HTTP and Wyoming on one pipeline). Requests are
sent one at a time, alternating the ways, after a warm-up:

* HTTP json: POST /v1/audio/transcriptions with the WAV (upload inside the timer) -> the JSON body;
* HTTP stream: the same with stream=true -> first `transcript.text.delta`, and `transcript.text.done`;
* Wyoming: as Home Assistant sends it (transcribe, audio-start, 1024-sample chunks, audio-stop) with
  wyoming's AsyncTcpClient; timed from audio-stop (Home Assistant streams the audio while the user speaks, so
  that is the wait it sees) to the first `transcript-chunk` and to `transcript`; and from connecting (all audio
  inside the timer, like the HTTP upload) to `transcript`.

Models: the espeak-trained tiny English model (../shared/models, NOT a real Canary; a real 3.15 s clip) and
random-weight models with canary-180m-flash / 1b-flash dimensions (bench/random_model.py; decode length forced to
round(4 * seconds) tokens by bench/serve_capped.py, synthetic speech-like audio).

    .venv/bin/python bench/wyoming_latency.py [--models espeak,180m-flash] [--repeats 20]

`--live` instead: live partials (issue 20). Four espeak clips (1.5-5.5 s) sent as a microphone sends them (1024
samples every 64 ms, paced in real time), to three `serve` processes: `wyoming_partials` off (main's behaviour:
all text after audio-stop), preview (partials while speaking, the final transcript decoded whole at audio-stop)
and final (the streaming decoder's text is the transcript). Reported: first transcript-chunk after audio-start,
audio-stop -> transcript, and how many final transcripts equal the HTTP (offline, NeMo-exact) text.

    .venv/bin/python bench/wyoming_latency.py --live [--repeats 5]

Prints a Markdown table (ms: median and p90). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

from serving import wait_healthy
from synth import SR, speech_like, wav_bytes

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared" / "models"
CACHE = Path.home() / ".cache" / "canary-bench"
CLIP = SHARED / "espeak-tiny-en-clips" / "clip11.wav"  # 3.15 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(name: str, tmp: Path, cache: Path) -> Path:
    if name == "espeak":
        out = tmp / "espeak-tiny-en"
        subprocess.run(
            [sys.executable, "-m", "canary_server", "convert", str(SHARED / "espeak-tiny-en.nemo"), str(out)],
            check=True,
            capture_output=True,
        )
        return out
    path = cache / name
    subprocess.run([sys.executable, str(BENCH / "random_model.py"), name, "--out", str(path)], check=True)
    return path


def start_server(path: Path, http_port: int, wyoming_port: int, capped: bool) -> subprocess.Popen:
    script = [str(BENCH / "serve_capped.py")] if capped else ["-m", "canary_server", "serve"]
    env = dict(os.environ, CANARY_LOG_LEVEL="warning")
    cmd = [sys.executable, *script, "--model", str(path), "--port", str(http_port), "--wyoming-port", str(wyoming_port)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    wait_healthy(proc, f"http://127.0.0.1:{http_port}", 600)
    return proc


def http_json(client: httpx.Client, wav: bytes) -> tuple[float, str]:
    t = time.perf_counter()
    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": ("a.wav", wav)})
    return time.perf_counter() - t, r.json()["text"]


def http_stream(client: httpx.Client, wav: bytes) -> tuple[float, float, str]:
    t, first, text = time.perf_counter(), None, ""
    data = {"model": "whisper-1", "stream": "true"}
    with client.stream("POST", "/v1/audio/transcriptions", data=data, files={"file": ("a.wav", wav)}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "transcript.text.delta" and first is None:
                first = time.perf_counter() - t
            if event["type"] == "transcript.text.done":
                text = event["text"]
    done = time.perf_counter() - t
    return first if first is not None else done, done, text


async def wyoming(port: int, pcm: np.ndarray, language: str) -> tuple[float, float, float, str]:
    """(connect -> transcript, audio-stop -> first chunk, audio-stop -> transcript, text)."""
    raw, fmt = pcm.tobytes(), {"rate": SR, "width": 2, "channels": 1}
    t0 = time.perf_counter()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language=language).event())
        await client.write_event(AudioStart(**fmt).event())
        for i in range(0, len(raw), 2048):  # 1024 samples, as Home Assistant sends them
            await client.write_event(AudioChunk(audio=raw[i : i + 2048], **fmt).event())
        await client.write_event(AudioStop().event())
        t1, first = time.perf_counter(), None
        while True:
            event = await client.read_event()
            if event.type == "transcript-chunk" and first is None:
                first = time.perf_counter() - t1
            if event.type == "transcript":
                end = time.perf_counter()
                return end - t0, first if first is not None else end - t1, end - t1, event.data["text"]
            if event.type == "error":
                raise RuntimeError(event.data)


async def wyoming_live(port: int, pcm: np.ndarray, language: str) -> tuple[float | None, float, str]:
    """Paced in real time: (audio-start -> first transcript-chunk or None, audio-stop -> transcript, text)."""
    raw, fmt = pcm.tobytes(), {"rate": SR, "width": 2, "channels": 1}
    first: float | None = None
    stop: float | None = None

    async with AsyncTcpClient("127.0.0.1", port) as client:

        async def read() -> tuple[float, str]:
            nonlocal first
            while True:
                event = await client.read_event()
                if event.type == "transcript-chunk" and first is None:
                    first = time.perf_counter() - t0
                if event.type == "transcript":
                    return time.perf_counter(), event.data["text"]
                if event.type == "error":
                    raise RuntimeError(event.data)

        await client.write_event(Transcribe(language=language).event())
        t0 = time.perf_counter()
        await client.write_event(AudioStart(**fmt).event())
        reader = asyncio.create_task(read())
        for k, i in enumerate(range(0, len(raw), 2048)):
            due = t0 + k * 1024 / SR
            await asyncio.sleep(max(0.0, due - time.perf_counter()))  # a microphone's clock
            await client.write_event(AudioChunk(audio=raw[i : i + 2048], **fmt).event())
        await asyncio.sleep(max(0.0, t0 + len(pcm) / SR - time.perf_counter()))  # the last chunk's end
        await client.write_event(AudioStop().event())
        stop = time.perf_counter()
        end, text = await reader
    return first, end - stop, text


LIVE_CLIPS = ["clip00.wav", "clip01.wav", "clip06.wav", "clip08.wav"]


def live_bench(repeats: int, tmp: Path) -> None:
    path = model_dir("espeak", tmp, CACHE)
    clips = {name: sf.read(CLIP.parent / name, dtype="int16")[0] for name in LIVE_CLIPS}
    rows = []
    for mode in ("off", "preview", "final"):
        http_port, wy_port = free_port(), free_port()
        os.environ["CANARY_WYOMING_PARTIALS"] = mode
        proc = start_server(path, http_port, wy_port, capped=False)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as client:
                offline = {n: http_json(client, wav_bytes(pcm))[1] for n, pcm in clips.items()}
            asyncio.run(wyoming_live(wy_port, clips[LIVE_CLIPS[0]], "en"))  # warm-up
            firsts, stops, same, n = [], [], 0, 0
            for _ in range(repeats):
                for name, pcm in clips.items():
                    first, stop, text = asyncio.run(wyoming_live(wy_port, pcm, "en"))
                    firsts += [first] if first is not None else []
                    stops.append(stop)
                    same += text == offline[name]
                    n += 1
        finally:
            proc.terminate()
            proc.wait(60)
        first_col = f"{stats(firsts)} ({len(firsts)}/{n} with partials)" if firsts else f"none (0/{n})"
        rows.append(f"| {mode} | {first_col} | {stats(stops)} | {same}/{n} |")
    os.environ.pop("CANARY_WYOMING_PARTIALS", None)
    lengths = ", ".join(f"{len(p) / SR:.1f}" for p in clips.values())
    print(f"\nespeak-tiny-en (toy), clips of {lengths} s paced in real time, {repeats} rounds; ms median / p90\n")
    print("| wyoming_partials | audio-start -> first transcript-chunk | audio-stop -> transcript | final = HTTP text |")
    print("|---|---|---|---|")
    print("\n".join(rows))


def stats(xs: list[float]) -> str:
    ms = sorted(x * 1e3 for x in xs)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"{statistics.median(ms):.0f} / {p90:.0f}"


def bench(name: str, repeats: int, tmp: Path, cache: Path) -> list[str]:
    path = model_dir(name, tmp, cache)
    if name == "espeak":
        pcm, _ = sf.read(CLIP, dtype="int16")
        label = f"espeak-tiny-en (toy), {len(pcm) / SR:.2f} s clip"
    else:
        pcm = (speech_like(3.0, seed=3) * 32767).astype(np.int16)
        label = f"{name} dims (random weights), 3.0 s, 12 tokens"
    wav = wav_bytes(pcm)
    http_port, wy_port = free_port(), free_port()
    proc = start_server(path, http_port, wy_port, capped=name != "espeak")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as client:
            for _ in range(2):  # warm-up
                http_json(client, wav)
                asyncio.run(wyoming(wy_port, pcm, "en"))
            hj, hs_first, hs_done, wy_total, wy_first, wy_stop = [], [], [], [], [], []
            texts = set()
            for _ in range(repeats):
                t, text = http_json(client, wav)
                hj.append(t)
                texts.add(text)
                first, done, text = http_stream(client, wav)
                hs_first.append(first)
                hs_done.append(done)
                texts.add(text)
                total, first, stop, text = asyncio.run(wyoming(wy_port, pcm, "en"))
                wy_total.append(total)
                wy_first.append(first)
                wy_stop.append(stop)
                texts.add(text)
    finally:
        proc.terminate()
        proc.wait(60)
    same = "yes" if len(texts) == 1 else f"no ({len(texts)} texts)"
    return [
        f"| {label} | {stats(hj)} | {stats(hs_first)} | {stats(hs_done)} | {stats(wy_first)} | {stats(wy_stop)} "
        f"| {stats(wy_total)} | {same} |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="espeak,180m-flash")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=CACHE,
        help="where the random-weight models are written (default: ~/.cache/canary-bench)",
    )
    ap.add_argument("--live", action="store_true", help="live partials: off / preview / final, paced audio")
    args = ap.parse_args()
    if args.live:
        with tempfile.TemporaryDirectory() as tmp:
            live_bench(args.repeats, Path(tmp))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench(name, args.repeats, Path(tmp), args.cache_dir)
    machine = f"{platform.machine()} {platform.system()} ({os.cpu_count()} CPUs, shared)"
    print(f"\nmachine: {machine}, {args.repeats} requests of each kind, one at a time; ms median / p90\n")
    print(
        "| model, utterance | HTTP json | HTTP stream: first delta | HTTP stream: done | Wyoming: stop -> first "
        "chunk | Wyoming: stop -> transcript | Wyoming: connect -> transcript | same text everywhere |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
