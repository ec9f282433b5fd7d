"""Soak test: many mixed requests with faults injected at random against one `canary-server serve` process.

The server runs the espeak-trained multilingual test model (`../shared/models/espeak-tiny-multi.nemo`, en/de/es/fr:
a tiny Canary-architecture network trained with NeMo on espeak-ng speech, NOT a real Canary). Requests mix every
upload format (wav, flac, mp3, ogg, m4a, webm), every response format, streaming, both endpoints, the four
languages, short prompts and long files (1 and 5 minutes). Faults, drawn at random: clients that disconnect
mid-upload, mid-decode and mid-stream; corrupt and hostile files (lying headers, absurd rates, huge samples, a 100 KB
prompt, a 0-bit WAV, decode bombs at 384 kHz x 8 channels) and attacks on FFmpeg (an ffconcat script naming a
file in the server's working directory, an SDP that binds UDP, an HLS playlist, `concat:`/`file:`/`subfile:` URLs as
the upload), each of which must be refused; oversize bodies; bursts of concurrent requests past
`max_queued_requests`; and a SIGTERM at the end with requests in flight.

Every distinct request is first sent alone (one at a time, same server); every answer in the soak is checked
against that answer: same status, same body (streams: the deltas add up to the final text, and that text and its
usage are the ones sent alone). A request is lost if the client sent it whole and got no HTTP answer. The server's
open descriptors are counted fresh and after the soak. Prints a Markdown table (and `--json`).

    .venv/bin/python bench/soak.py --requests 10000 [--concurrency 8] [--seed 0] [--json soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from hostile_files import (  # noqa: E402  (the limit tests' files)
    ffconcat,
    flac_bomb,
    flac_silence,
    float_wav,
    hls_playlist,
    sdp,
    url_upload,
    wav_claiming_rate,
    zero_bit_wav,
)

SHARED = REPO.parent / "shared" / "models"
SR = 16000
LANGS = ("en", "de", "es", "fr")
MAX_QUEUED = 32
MAX_UPLOAD_MB = 16
MAX_AUDIO_SECONDS = 600
GRACE = 10.0
# The decode budget (samples x channels at the file's own rate): 60 s of 384 kHz x 8 channels would pass it, so the
# unknown-length bomb is stopped while decoding; every normal and long file here is far under it.
MAX_DECODE_SAMPLES = 60_000_000
MEMO = "Recordings/memo.wav"  # a speech clip in the server's working directory; no upload may reach it
FORMATS = ("wav", "flac", "mp3", "ogg", "m4a", "webm")
# Share of drawn requests of each kind; the rest are normal requests. A burst is MAX_QUEUED + 24 requests at once.
FAULTS = [
    ("long", 0.03),
    ("hostile", 0.05),
    ("oversize", 0.01),
    ("disconnect upload", 0.03),
    ("disconnect decode", 0.03),
    ("disconnect stream", 0.03),
    ("burst", 0.004),
]


# ---- audio ----------------------------------------------------------------------------------------------------
def _sf_bytes(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _av_bytes(x: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(x[None, :].astype(np.float32), format="flt", layout="mono")
        frame.rate = rate
        for chunk in (frame, None):
            for packet in stream.encode(chunk):
                out.mux(packet)
    return buf.getvalue()


def encode(x: np.ndarray, fmt: str) -> bytes:
    if fmt == "wav":
        return _sf_bytes(x, SR, "WAV", "PCM_16")
    if fmt in ("flac", "mp3", "ogg"):
        return _sf_bytes(x, SR, fmt.upper())
    if fmt == "m4a":
        return _av_bytes(x, SR, "mp4", "aac")
    import soxr

    return _av_bytes(soxr.resample(x, SR, 48000).astype(np.float32), 48000, "webm", "libopus")


def attack_files(udp_port: int) -> dict[str, bytes]:
    """Uploads that made FFmpeg open files or sockets (issue 19): each must be refused (400), never transcribed."""
    return {
        "ffconcat naming a server file": ffconcat(MEMO),
        "sdp binding UDP": sdp(udp_port),
        "hls playlist": hls_playlist(MEMO),
        "concat: url": url_upload(f"concat:{MEMO}|{MEMO}"),
        "file: url": url_upload(f"file:{MEMO}"),
        "subfile: url": url_upload(f"subfile,,start,0,end,0,,:{MEMO}"),
    }


def hostile_files(clip: np.ndarray) -> dict[str, bytes]:
    """Corrupt and hostile uploads (all small); the server must answer each quickly, the same way every time."""
    rng = np.random.default_rng(7)
    wav = encode(clip, "wav")
    return {
        "wav of 0 bits per sample": zero_bit_wav(),
        "flac 384 kHz x 8 ch claiming 500 s": flac_bomb(500.0),  # refused from the header (1.5 G samples)
        "flac 384 kHz x 8 ch of unknown length, 30 s": flac_bomb(real_seconds=30.0, claimed=False),  # stopped at 60 M
        "wav claiming 1 Hz": wav_claiming_rate(1),
        "flac claiming 3 h": flac_silence(1.0, 48000, 2, claimed_frames=3 * 3600 * 48000),  # 1 s of 48 kHz stereo
        "flac of unknown length, 700 s": flac_silence(700, 8000, 1, claimed_frames=0),
        "float samples of 1e20": float_wav(clip * np.float32(1e20), SR),
        "random bytes": rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "wav header only": wav[:44],
        "wav cut in half": wav[: len(wav) // 2],
        "mp3 cut short": encode(clip, "mp3")[:700],
        "empty": b"",
    }


def long_audio(clips: list[np.ndarray], seconds: float) -> np.ndarray:
    one = np.concatenate([np.concatenate([c, np.zeros(SR // 3, np.float32)]) for c in clips])
    return np.tile(one, -(-int(seconds * SR) // one.size))[: int(seconds * SR)]


# ---- requests -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """One distinct request: sent alone it always gets the same answer."""

    endpoint: str  # transcriptions | translations
    file: str  # key into the corpus
    fields: tuple[tuple[str, str], ...]
    stream: bool = False
    long: bool = False

    def data(self) -> list[tuple[str, str]]:
        return [("model", "whisper-1"), *self.fields] + ([("stream", "true")] if self.stream else [])


VARIANTS = [  # (endpoint, fields, stream)
    ("transcriptions", (("response_format", "json"),), False),
    ("transcriptions", (("response_format", "text"),), False),
    ("transcriptions", (("response_format", "srt"),), False),
    ("transcriptions", (("response_format", "vtt"),), False),
    ("transcriptions", (("response_format", "verbose_json"), ("timestamp_granularities[]", "segment")), False),
    ("transcriptions", (("response_format", "json"), ("include[]", "logprobs")), False),
    ("transcriptions", (("response_format", "json"),), True),
    ("transcriptions", (("response_format", "text"),), True),
    ("transcriptions", (("response_format", "json"), ("prompt", "hello")), False),
    ("transcriptions", (("response_format", "json"), ("pnc", "false")), False),
    ("translations", (("response_format", "json"),), False),
    ("translations", (("response_format", "text"),), False),
]


@dataclass
class Outcome:
    kind: str
    template: Template | None
    status: int | str  # HTTP status, or "disconnected" (a fault we injected), or "lost: <error>"
    latency: float = 0.0
    correct: bool | None = None  # 200 answers: equal to the answer alone
    retry_after: str | None = None
    note: str = ""


@dataclass
class Plan:
    corpus: dict[str, bytes]
    langs: dict[str, str]  # file key -> its language
    normal: list[Template] = field(default_factory=list)
    long: list[Template] = field(default_factory=list)
    hostile: list[Template] = field(default_factory=list)
    attacks: set[str] = field(default_factory=set)  # file keys that must be refused


def build_plan(long_seconds: tuple[float, ...] = (60, 300), udp_port: int = 9) -> Plan:
    clip_dir = SHARED / "espeak-tiny-multi-clips"
    names = sorted(p.name for p in clip_dir.glob("*.wav"))
    audio = {n: sf.read(clip_dir / n, dtype="float32")[0] for n in names}
    plan = Plan({}, {})
    for n in names:
        for fmt in FORMATS:
            key = f"{n[:-4]}.{fmt}"
            plan.corpus[key], plan.langs[key] = encode(audio[n], fmt), n[:2]
            for endpoint, fields, stream in VARIANTS:
                lang = (("language", n[:2]),)
                plan.normal.append(Template(endpoint, key, lang + fields, stream))
    for lang in LANGS:
        clips = [audio[n] for n in names if n.startswith(lang)]
        for seconds in long_seconds:
            key = f"{lang}-{seconds:g}s.flac"
            plan.corpus[key], plan.langs[key] = encode(long_audio(clips, seconds), "flac"), lang
            for fields, stream in [((("response_format", "json"),), False), ((("response_format", "text"),), True),
                                   ((("response_format", "srt"),), False)]:  # fmt: skip
                plan.long.append(Template("transcriptions", key, (("language", lang),) + fields, stream, long=True))
    for name, data in hostile_files(audio[names[0]]).items():
        plan.corpus[name], plan.langs[name] = data, "en"
        plan.hostile.append(Template("transcriptions", name, (("language", "en"),)))
    for name, data in attack_files(udp_port).items():
        plan.corpus[name], plan.langs[name] = data, "en"
        plan.attacks.add(name)
        plan.hostile.append(Template("transcriptions", name, (("language", "en"),)))
    big_prompt = " ".join(["hello world"] * 10_000)  # 120 KB: it crashed the server before the prompt cap
    plan.hostile.append(Template("transcriptions", "en_00.wav", (("language", "en"), ("prompt", big_prompt))))
    return plan


# ---- the server -----------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model: Path, cwd: Path, memo: bytes) -> None:
        (cwd / MEMO).parent.mkdir(parents=True, exist_ok=True)
        (cwd / MEMO).write_bytes(memo)
        env = {
            **os.environ,
            "CANARY_LOG_LEVEL": "warning",
            "CANARY_WYOMING_PORT": "0",  # HTTP only
            "CANARY_MAX_QUEUED_REQUESTS": str(MAX_QUEUED),
            "CANARY_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
            "CANARY_MAX_AUDIO_SECONDS": str(MAX_AUDIO_SECONDS),
            "CANARY_SHUTDOWN_GRACE_SECONDS": str(GRACE),
            "CANARY_MAX_DECODE_SAMPLES": str(MAX_DECODE_SAMPLES),
        }
        with socket_port() as port:
            self.url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "canary_server", "serve", "--model", str(model), "--port", str(port)]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd)
        self.rss_peak, self._sampling = 0, True
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.tail()}")
            time.sleep(0.1)
        threading.Thread(target=self._sample, daemon=True).start()

    def rss(self) -> int:
        """Resident set size in bytes (0 once the process is gone)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"VmRSS:\s+(\d+) kB", status)  # absent once the process is a zombie
        return int(m.group(1)) * 1024 if m else 0

    def descriptors(self) -> int:
        """Open file descriptors of the server process (0 once it is gone)."""
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0

    def _sample(self) -> None:
        while self._sampling and self.proc.poll() is None:
            self.rss_peak = max(self.rss_peak, self.rss())
            time.sleep(0.2)

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        self._sampling = False
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class socket_port:
    """A free loopback port (bound, then released for the server to take)."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# ---- one request ----------------------------------------------------------------------------------------------
def _encoded(server: Server, plan: Plan, t: Template) -> tuple[bytes, bytes]:
    """(head, body) of the multipart request `t`, for raw-socket faults."""
    req = httpx.Request(
        "POST", f"{server.url}/v1/audio/{t.endpoint}", data=dict(t.data()), files={"file": plan.corpus[t.file]}
    )
    body = req.read()
    head = f"POST /v1/audio/{t.endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += f"Content-Type: {req.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode(), body


async def answer(client: httpx.AsyncClient, plan: Plan, t: Template) -> tuple[int, object, str | None]:
    """(status, comparable answer, Retry-After). Streams: (deltas joined, final text, usage) or an error event."""
    url = f"/v1/audio/{t.endpoint}"
    data, files = dict(t.data()), {"file": (t.file, plan.corpus[t.file])}
    if not t.stream:
        r = await client.post(url, data=data, files=files)
        return r.status_code, r.text, r.headers.get("retry-after")
    async with client.stream("POST", url, data=data, files=files) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode(), r.headers.get("retry-after")
        deltas, done = [], None
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("type") == "transcript.text.delta":
                    deltas.append(event["delta"])
                else:
                    done = event
        if done is None or "error" in done:
            return 200, ("error", done), None
        return 200, ("".join(deltas), done["text"], json.dumps(done.get("usage"))), None


def same_answer(got: object, alone: object) -> bool:
    """Equal answers: text, tokens, times exactly; log-probabilities within 1e-3 (a batch's float sums can differ
    from the request's alone in the last digits; the project's parity tolerance)."""
    if isinstance(got, str) and isinstance(alone, str):
        try:
            got, alone = json.loads(got), json.loads(alone)
        except ValueError:
            return got == alone
    if isinstance(got, dict) and isinstance(alone, dict):
        return got.keys() == alone.keys() and all(same_answer(got[k], alone[k]) for k in got)
    if isinstance(got, list | tuple) and isinstance(alone, list | tuple):
        return len(got) == len(alone) and all(same_answer(a, b) for a, b in zip(got, alone, strict=True))
    if isinstance(got, float) and isinstance(alone, float):
        return abs(got - alone) <= 1e-3
    return got == alone


async def disconnect(server: Server, plan: Plan, t: Template, when: str, rng: random.Random) -> None:
    """Send `t` over a raw socket and leave: mid-upload, mid-decode (after the upload) or mid-stream."""
    head, body = _encoded(server, plan, t)
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if when == "upload":
            writer.write(head + body[: rng.randrange(1, max(2, len(body) // 2))])
            await writer.drain()
        else:
            writer.write(head + body)
            await writer.drain()
            if when == "decode":
                await asyncio.sleep(rng.uniform(0.05, 1.5))
            else:  # stream: leave after the first event
                await asyncio.wait_for(reader.readuntil(b"data: "), 120)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()


# ---- the soak -------------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, server: Server, plan: Plan, seed: int, concurrency: int, pool: int = 50) -> None:
        self.server, self.plan, self.rng = server, plan, random.Random(seed)
        self.concurrency = concurrency
        self.pool = plan.normal[:pool]  # the requests bursts and the shutdown batch draw from
        self.alone: dict[Template, tuple[int, object]] = {}
        self.outcomes: list[Outcome] = []
        self.fds_fresh = self.fds_after = 0  # the server's open descriptors

    def draw(self) -> tuple[str, Template | None]:
        r, p = self.rng.random(), self.plan
        kind = "normal"
        for name, weight in FAULTS:
            if r < weight:
                kind = name
                break
            r -= weight
        if kind == "long":
            return kind, self.rng.choice(p.long)
        if kind == "hostile":
            return kind, self.rng.choice(p.hostile)
        if kind == "disconnect stream":
            return kind, self.rng.choice([t for t in p.long if t.stream])
        if kind == "disconnect decode":
            return kind, self.rng.choice(p.long)
        if kind in ("oversize", "burst"):
            return kind, None
        return kind, self.rng.choice(p.normal)

    async def reference(self, client: httpx.AsyncClient, templates: set[Template]) -> None:
        """Each distinct request alone, one at a time."""
        for t in sorted(templates, key=lambda t: (t.file, t.endpoint, t.fields, t.stream)):
            status, body, _ = await answer(client, self.plan, t)
            self.alone[t] = (status, body)

    async def one(self, client: httpx.AsyncClient, kind: str, t: Template | None) -> None:
        began = time.monotonic()
        if kind.startswith("disconnect"):
            await disconnect(self.server, self.plan, t, kind.split()[1], self.rng)
            self.outcomes.append(Outcome(kind, t, "disconnected", time.monotonic() - began))
            return
        if kind == "oversize":
            data = os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1024)
            try:
                r = await client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": data})
                status: int | str = r.status_code
            except httpx.HTTPError as exc:
                status = f"lost: {type(exc).__name__}"
            self.outcomes.append(Outcome(kind, None, status, time.monotonic() - began))
            return
        try:
            status, body, retry = await answer(client, self.plan, t)
        except httpx.HTTPError as exc:
            self.outcomes.append(Outcome(kind, t, f"lost: {type(exc).__name__}", time.monotonic() - began))
            return
        out = Outcome(kind, t, status, time.monotonic() - began, retry_after=retry)
        if t.file in self.plan.attacks and status not in (400, 429, 503):
            out.correct = False  # an attack that got anything but a refusal is a wrong answer, whatever alone said
            out.note = f"{t.file}: status {status}: {str(body)[:200]}"
        elif status == 200:
            out.correct = self.alone[t][0] == 200 and same_answer(body, self.alone[t][1])
            if not out.correct:
                out.note = f"{t.file} {t.fields}: got {str(body)[:200]!r}, alone {str(self.alone[t][1])[:200]!r}"
        elif status != self.alone[t][0] and status not in (429, 503):
            out.note = f"{t.file} {t.fields}: status {status}, alone {self.alone[t][0]}: {str(body)[:200]}"
        self.outcomes.append(out)

    async def run(self, n: int, progress: bool) -> None:
        draws = [self.draw() for _ in range(n)]
        needed = {t for _, t in draws if t is not None} | set(self.pool) | set(self.plan.long)
        limits = httpx.Limits(max_connections=self.concurrency + 100, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.server.url, timeout=600, limits=limits) as client:
            began = time.monotonic()
            await self.reference(client, needed)
            self.reference_seconds = time.monotonic() - began
            self.rss_after_reference = self.server.rss()
            queue: asyncio.Queue = asyncio.Queue()
            for d in draws:
                queue.put_nowait(d)
            done = 0
            began = time.monotonic()

            async def worker() -> None:
                nonlocal done
                while not queue.empty():
                    kind, t = queue.get_nowait()
                    if kind == "burst":  # many at once, past max_queued_requests
                        burst = [self.rng.choice(self.pool) for _ in range(MAX_QUEUED + 24)]
                        await asyncio.gather(*(self.one(client, "burst", b) for b in burst))
                    else:
                        await self.one(client, kind, t)
                    done += 1
                    if progress and done % 250 == 0:
                        rate = done / (time.monotonic() - began)
                        print(f"  {done}/{n} drawn requests, {rate:.1f}/s, RSS {self.server.rss() / 2**20:.0f} MiB",
                              file=sys.stderr, flush=True)  # fmt: skip

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
            self.soak_seconds = time.monotonic() - began
            while (await client.get("/health")).json().get("requests", 0):
                await asyncio.sleep(0.1)
            await asyncio.sleep(4.0)  # the engine hands memory back 2 s after its work runs out
            self.rss_idle = self.server.rss()
            self.fds_after = self.server.descriptors()
            await self.shutdown(client)

    async def shutdown(self, client: httpx.AsyncClient) -> None:
        """SIGTERM with requests in flight: every one is answered (200, checked, or 503) and the process exits."""
        batch = [("long", self.rng.choice([t for t in self.plan.long if not t.stream])) for _ in range(4)]
        batch += [("normal", self.rng.choice(self.pool)) for _ in range(12)]
        tasks = [asyncio.ensure_future(self.one(client, f"shutdown {k}", t)) for k, t in batch]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # signal once some are answered and others are in the engine
            in_engine = (await client.get("/health")).json().get("requests", 0)
            if any(task.done() for task in tasks) and in_engine >= 4:
                break
            await asyncio.sleep(0.02)
        sent = time.monotonic()
        self.server.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        while self.server.proc.poll() is None and time.monotonic() - sent < GRACE + 30:
            await asyncio.sleep(0.05)
        self.exit_seconds = time.monotonic() - sent
        self.exit_status = self.server.proc.poll()


# ---- report ---------------------------------------------------------------------------------------------------
def report(soak: Soak, wall: float, rss_fresh: int) -> dict:
    outs = soak.outcomes
    by_status = Counter(str(o.status) if not str(o.status).startswith("lost") else "lost" for o in outs)
    wrong = [o for o in outs if o.correct is False]
    unexpected = [o for o in outs if o.correct is None and o.note]
    lost = [o for o in outs if str(o.status).startswith("lost")]
    no_retry = [o for o in outs if o.status in (429, 503) and not o.retry_after]
    short = [o.latency for o in outs if o.status == 200 and o.kind in ("normal", "burst")]
    longs = [o.latency for o in outs if o.status == 200 and o.kind == "long"]
    shutdown = [o for o in outs if o.kind.startswith("shutdown")]
    attacks = [o for o in outs if o.template is not None and o.template.file in soak.plan.attacks]
    refused = sum(o.status == 400 for o in attacks)
    busy = sum(o.status in (429, 503) for o in attacks)

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    mib = 2**20
    result = {
        "requests": len(outs),
        "kinds": dict(Counter(o.kind for o in outs)),
        "answers_by_status": dict(sorted(by_status.items())),
        "wrong_answers": len(wrong),
        "unexpected_statuses": len(unexpected),
        "lost_requests": len(lost),
        "429_503_without_retry_after": len(no_retry),
        "attacks": {"400": refused, "429/503": busy, "other": len(attacks) - refused - busy},
        "descriptors_fresh": soak.fds_fresh,
        "descriptors_after_soak": soak.fds_after,
        "rss_fresh_mib": rss_fresh / mib,
        "rss_after_reference_mib": soak.rss_after_reference / mib,
        "rss_peak_mib": soak.server.rss_peak / mib,
        "rss_idle_after_soak_mib": soak.rss_idle / mib,
        "latency_short_p50_s": pct(short, 50),
        "latency_short_p95_s": pct(short, 95),
        "latency_long_p50_s": pct(longs, 50),
        "latency_long_p95_s": pct(longs, 95),
        "shutdown_answers": dict(Counter(str(o.status) for o in shutdown)),
        "shutdown_exit_seconds": soak.exit_seconds,
        "shutdown_exit_status": soak.exit_status,
        "reference_requests": len(soak.alone),
        "reference_seconds": soak.reference_seconds,
        "soak_seconds": soak.soak_seconds,
        "wall_seconds": wall,
        "examples": [o.note for o in (wrong + unexpected)[:10]] + [str(o.status) for o in lost[:10]],
    }
    rows = [
        ("requests (incl. bursts and the shutdown batch)", f"{result['requests']}"),
        ("answers by status", ", ".join(f"{k}: {v}" for k, v in result["answers_by_status"].items())),
        ("wrong answers (200 differing from the same request alone)", f"{len(wrong)}"),
        ("unexpected statuses (not the status alone, 429 or 503)", f"{len(unexpected)}"),
        ("lost requests (sent whole, no HTTP answer)", f"{len(lost)}"),
        ("429/503 without Retry-After", f"{len(no_retry)}"),
        (
            "attacks on FFmpeg (ffconcat, sdp, hls, URLs as uploads)",
            f"400: {refused}, 429/503: {busy}, other: {len(attacks) - refused - busy}",
        ),
        (
            "server descriptors fresh / after the soak (+ the client's open connections)",
            f"{soak.fds_fresh} / {soak.fds_after}",
        ),
        ("RSS fresh / after the reference pass", f"{rss_fresh / mib:.0f} / {soak.rss_after_reference / mib:.0f} MiB"),
        ("RSS peak / idle after the soak", f"{soak.server.rss_peak / mib:.0f} / {soak.rss_idle / mib:.0f} MiB"),
        ("latency p50 / p95, short clips (200s)", f"{pct(short, 50):.2f} / {pct(short, 95):.2f} s"),
        ("latency p50 / p95, 1 and 5 min files (200s)", f"{pct(longs, 50):.2f} / {pct(longs, 95):.2f} s"),
        ("SIGTERM with 16 in flight: answers", ", ".join(f"{k}: {v}" for k, v in result["shutdown_answers"].items())),
        ("SIGTERM: exit after", f"{soak.exit_seconds:.1f} s (status {soak.exit_status})"),
        ("wall time (reference pass + soak + shutdown)", f"{wall:.0f} s"),
    ]
    print("\n| soak | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\nby kind: " + ", ".join(f"{k} {v}" for k, v in sorted(result["kinds"].items())))
    for note in result["examples"]:
        print("  example:", note)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=SHARED / "espeak-tiny-multi.nemo")
    ap.add_argument("--long-seconds", type=float, nargs="+", default=[60, 300], help="lengths of the long files")
    ap.add_argument("--pool", type=int, default=50, help="distinct requests that bursts and the shutdown batch use")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model.suffix == ".nemo":
            from canary_server.convert import convert_nemo

            model = convert_nemo(model, Path(tmp) / "model")
        # The SDP names a port whose next one is taken: FFmpeg used to leak its socket then.
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind(("127.0.0.1", 0))
        plan = build_plan(tuple(args.long_seconds), udp_port=taken.getsockname()[1] - 1)
        memo = plan.corpus["en_00.wav"]
        server = Server(model, Path(tmp), memo)
        try:
            rss_fresh = server.rss()
            soak = Soak(server, plan, args.seed, args.concurrency, args.pool)
            soak.fds_fresh = server.descriptors()
            asyncio.run(soak.run(args.requests, progress=not args.quiet))
            result = report(soak, time.monotonic() - began, rss_fresh)
        except BaseException:
            print(server.tail(), file=sys.stderr)
            raise
        finally:
            server.stop()
            taken.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = not (result["wrong_answers"] or result["lost_requests"] or result["unexpected_statuses"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
