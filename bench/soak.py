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

The server also runs Wyoming (on a free port), with short connection deadlines, and while the mix runs, rounds of
attacks on the connections go on beside it (`Attacks`), each of which must be answered as designed: 120 idle,
header-dribbling and body-stalling HTTP connections (slowloris) against a cap of 160 (each closed by its deadline,
or evicted for a newer connection), stalled uploads holding spool files (closed at the body deadline, the files
gone), a foreign `Origin` (403), a spoofed `X-Forwarded-For` from an untrusted peer (never in the access log), and
on the Wyoming port malformed frames, a 2 GiB `payload_length`, a flood of one-sample chunks, idle connections, one
dripping a chunk a second past the utterance's wall-clock end, and a normal utterance (the same transcript each
round).

Every distinct request is first sent alone (one at a time, same server); every answer in the soak is checked
against that answer: same status, same body (streams: the deltas add up to the final text, and that text and its
usage are the ones sent alone). A request is lost if the client sent it whole and got no HTTP answer. The server's
open descriptors are counted fresh and after the soak. Prints a Markdown table (and `--json`).

    .venv/bin/python bench/soak.py --requests 10000 [--concurrency 8] [--seed 0] [--json soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from serving import wait_healthy  # noqa: E402  (bench/, the script's own folder)

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
    clip_pcm: bytes = b""  # en_00 as 16 kHz 16-bit PCM: the Wyoming utterance and the foreign-Origin upload


def build_plan(long_seconds: tuple[float, ...] = (60, 300), udp_port: int = 9) -> Plan:
    clip_dir = SHARED / "espeak-tiny-multi-clips"
    names = sorted(p.name for p in clip_dir.glob("*.wav"))
    audio = {n: sf.read(clip_dir / n, dtype="float32")[0] for n in names}
    plan = Plan({}, {}, clip_pcm=sf.read(clip_dir / "en_00.wav", dtype="int16")[0].tobytes())
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
        self.spool = cwd / "spool"  # the server's TMPDIR: its spooled uploads
        self.spool.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "TMPDIR": str(self.spool),
            "CANARY_LOG_LEVEL": "info",  # the access log: a spoofed X-Forwarded-For must not show there
            "CANARY_MAX_QUEUED_REQUESTS": str(MAX_QUEUED),
            "CANARY_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
            "CANARY_MAX_AUDIO_SECONDS": str(MAX_AUDIO_SECONDS),
            "CANARY_SHUTDOWN_GRACE_SECONDS": str(GRACE),
            "CANARY_MAX_DECODE_SAMPLES": str(MAX_DECODE_SAMPLES),
            "CANARY_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
            "CANARY_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
            "CANARY_BODY_MIN_RATE": str(BODY_MIN_RATE),
            "CANARY_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "CANARY_WYOMING_IDLE_SECONDS": str(WY_IDLE),
            "CANARY_WYOMING_CHUNK_SECONDS": str(WY_CHUNK),
            "CANARY_WYOMING_MAX_UTTERANCE_SECONDS": str(WY_UTTERANCE),
            "CANARY_WYOMING_MAX_CHUNKS": str(WY_MAX_CHUNKS),
        }
        with socket_port() as port, socket_port() as wyoming_port:
            self.url = f"http://127.0.0.1:{port}"
            self.wyoming_port = wyoming_port
            env["CANARY_WYOMING_PORT"] = str(wyoming_port)
            cmd = [sys.executable, "-m", "canary_server", "serve", "--model", str(model), "--port", str(port)]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd)
        self.rss_peak, self._sampling = 0, True
        wait_healthy(self.proc, self.url, 300, lambda: f":\n{self.tail()}")
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

    def spool_files(self) -> int:
        """Spooled upload files the server holds open (its descriptors into its TMPDIR)."""
        held = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    held += os.readlink(f"/proc/{self.proc.pid}/fd/{fd}").startswith(str(self.spool))
        return held

    def log_text(self) -> str:
        """The whole log so far, read through a second open file (its offset is not the one the server writes at)."""
        with open(f"/proc/self/fd/{self.log.fileno()}") as log:
            return log.read()

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


# ---- attacks on the connections (issue 19): HTTP deadlines, cap, spool, Origin, proxies; the Wyoming port -----
# The soak's server runs with short deadlines (below) so each attack ends within a few seconds, and a connection cap
# that the slowloris wave nearly fills: the normal mix must go on through it (a new connection evicts the oldest one
# still waiting for headers).
# (header_timeout above keep_alive_seconds, 5, as the defaults are: an idle kept-alive connection is closed by the
# keep-alive timeout)
HEADER_TIMEOUT, BODY_TIMEOUT, BODY_MIN_RATE = 6.0, 6.0, 256 * 1024
MAX_CONNECTIONS, SLOWLORIS = 160, 120  # slowloris: a third silent, a third dribbling headers, a third stalled bodies
STALLED_UPLOADS, STALLED_BYTES = 4, 2 * 2**20  # each past the 1 MiB kept in memory: a spool file
WY_IDLE, WY_CHUNK, WY_UTTERANCE, WY_MAX_CHUNKS = 4.0, 3.0, 8.0, 20_000
SLACK = 20.0  # seconds past a deadline still counted as on time (a loaded 2-core machine)
SPOOFED = "203.0.113.77"  # X-Forwarded-For from an untrusted peer: must never be logged as the client
WY_FMT = {"rate": 16000, "width": 2, "channels": 1}
WY_HEADER = b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, '
WY_MALFORMED = {
    "bad json": b"{this is not json\n",
    "payload_length 2.5": WY_HEADER + b'"payload_length": 2.5}\n' + b"\0" * 3,
    "payload_length -1": WY_HEADER + b'"payload_length": -1}\n',
    "binary junk": bytes(range(256)).replace(b"\n", b"") * 40 + b"\n",
    "header not an object": b'["audio-chunk"]\n',
}


def wy_frame(event_type: str, data: dict | None = None, payload: bytes = b"") -> bytes:
    from wyoming.event import Event, write_event

    buf = io.BytesIO()
    write_event(Event(event_type, data or {}, payload or None), buf)
    return buf.getvalue()


async def wy_events(reader: asyncio.StreamReader, timeout: float, until: str = "") -> list[dict]:
    """The events the server sends until it closes (or sends an `until` event), within `timeout` seconds; each
    event as its type and data."""
    events: list[dict] = []

    async def read() -> None:
        while line := await reader.readline():
            header = json.loads(line)
            data = json.loads(await reader.readexactly(header["data_length"])) if header.get("data_length") else {}
            if header.get("payload_length"):
                await reader.readexactly(header["payload_length"])
            events.append({"type": header["type"], **header.get("data", {}), **data})
            if header["type"] == until:
                return

    with contextlib.suppress(OSError, asyncio.IncompleteReadError):  # a reset after the last event
        await asyncio.wait_for(read(), timeout)
    return events


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """What the server sent before closing the connection; None if it was still open after `timeout`."""
    got = bytearray()

    async def read() -> None:
        while chunk := await reader.read(65536):
            got.extend(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except (OSError, asyncio.IncompleteReadError):
        pass
    except asyncio.TimeoutError:
        return None
    return bytes(got)


class Attacks:
    """Rounds of attacks while the mix runs; every outcome is "as designed" or a note saying what happened."""

    def __init__(self, server: Server, clip_pcm: bytes) -> None:
        self.server, self.clip_pcm = server, clip_pcm
        self.host, port = server.url.removeprefix("http://").split(":")
        self.port = int(port)
        self.results: dict[str, Counter] = {}
        self.notes: list[str] = []
        self.wyoming_text: str | None = None  # the first normal utterance's transcript; later ones must equal it
        self.spool_held: list[int] = []  # spool files open while the stalled uploads held them, per round

    def record(self, name: str, ok: bool, note: str = "") -> None:
        self.results.setdefault(name, Counter())[ok] += 1
        if not ok and len(self.notes) < 20:
            self.notes.append(f"{name}: {note}")

    async def run(self, mix_done: asyncio.Event) -> None:
        while True:
            await self.round()
            if mix_done.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(mix_done.wait(), 5.0)

    async def round(self) -> None:
        await asyncio.gather(
            self.slowloris(),
            self.stalled_uploads(),
            self.foreign_origin(),
            self.spoofed_forwarded_for(),
            *(self.wy_malformed(name) for name in WY_MALFORMED),
            self.wy_oversize_payload(),
            self.wy_tiny_chunks(),
            *(self.wy_idle() for _ in range(4)),
            self.wy_drip(),
            self.wy_normal(),
        )

    # ---- HTTP ----
    async def slowloris(self) -> None:
        async def one(i: int) -> None:
            kind = ("http idle connection", "http headers dribbled", "http body stalled")[i % 3]
            reader, writer = await asyncio.open_connection(self.host, self.port)
            began = time.monotonic()
            bound = HEADER_TIMEOUT + SLACK
            try:
                if kind == "http headers dribbled":
                    head = f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: x\r\n"
                    sent = 0
                    while not writer.is_closing() and sent < len(head) and time.monotonic() - began < bound:
                        writer.write(head[sent : sent + 2].encode())  # 2 bytes a second
                        await writer.drain()  # raises once the server has closed it
                        sent += 2
                        await asyncio.sleep(1.0)  # the attacker's pace
                elif kind == "http body stalled":
                    head = multipart_head(self.host, self.port, 2**20)
                    writer.write(head + b"\0" * 4096)  # then 1 byte a second: far below body_min_rate
                    bound = BODY_TIMEOUT + 4096 / BODY_MIN_RATE + SLACK
                    for _ in range(int(bound)):
                        if writer.is_closing():
                            break
                        writer.write(b"\0")
                        await writer.drain()
                        await asyncio.sleep(1.0)
                await writer.drain()
            except OSError:
                pass  # the server closed it while we were sending: what we wait for below
            got = await closed_by_server(reader, max(0.1, bound - (time.monotonic() - began)))
            writer.close()
            ok = got is not None and (not got or got.startswith(b"HTTP/1.1 408") or got.startswith(b"HTTP/1.1 503"))
            self.record(kind, ok, "still open past its deadline" if got is None else repr(got[:80]))

        await asyncio.gather(*(one(i) for i in range(SLOWLORIS)))

    async def stalled_uploads(self) -> None:
        """Uploads that send 2 MiB of a 4 MiB body and stop: each holds a spool file until its body deadline, then
        the server closes it and the file is gone."""
        conns = []
        for _ in range(STALLED_UPLOADS):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(multipart_head(self.host, self.port, 2 * STALLED_BYTES) + b"\0" * STALLED_BYTES)
            conns.append((reader, writer))
        await asyncio.gather(*(w.drain() for _, w in conns), return_exceptions=True)
        await asyncio.sleep(1.0)  # the server has read them (a sample of what it holds, not a synchronisation)
        self.spool_held.append(self.server.spool_files())
        bound = BODY_TIMEOUT + STALLED_BYTES / BODY_MIN_RATE + SLACK
        for reader, writer in conns:
            got = await closed_by_server(reader, bound)
            writer.close()
            ok = got is not None and (not got or got.startswith(b"HTTP/1.1 408"))
            self.record("http upload stalled (spool)", ok, "held past its deadline" if got is None else repr(got[:80]))

    async def foreign_origin(self) -> None:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=120) as client:
            headers = {"Origin": "https://evil.example"}
            files = {"file": ("a.wav", wav_bytes(self.clip_pcm))}
            r = await client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files, headers=headers)
            ok = r.status_code == 403 and r.json()["error"]["code"] == "invalid_origin"
            self.record("http foreign Origin (403)", ok, f"{r.status_code} {r.text[:100]}")

    async def spoofed_forwarded_for(self) -> None:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=120) as client:
            r = await client.get("/health", headers={"X-Forwarded-For": SPOOFED, "X-Forwarded-Proto": "https"})
            self.record("http X-Forwarded-For spoofed (answered 200)", r.status_code == 200, f"{r.status_code}")

    # ---- Wyoming ----
    async def _wy(self, data: bytes, timeout: float, until: str = "") -> list[dict]:
        reader, writer = await asyncio.open_connection(self.host, self.server.wyoming_port)
        try:
            writer.write(data)
            await writer.drain()
        except OSError:
            pass
        events = await wy_events(reader, timeout, until)
        writer.close()
        return events

    def _error_closed(self, name: str, events: list[dict], code: str, text: str = "") -> None:
        ok = [e["type"] for e in events] == ["error"] and events[0].get("code") == code and text in events[0]["text"]
        self.record(name, ok, str(events)[:160])

    async def wy_malformed(self, name: str) -> None:
        events = await self._wy(WY_MALFORMED[name], 30 + SLACK)
        self._error_closed(f"wyoming malformed frame ({name})", events, "invalid_request")

    async def wy_oversize_payload(self) -> None:
        events = await self._wy(WY_HEADER + b'"payload_length": 2147483648}\n', 30 + SLACK)
        self._error_closed("wyoming payload_length 2 GiB", events, "invalid_request", "payload_length")

    async def wy_tiny_chunks(self) -> None:
        one = wy_frame("audio-chunk", WY_FMT, b"\1\0")
        data = wy_frame("audio-start", WY_FMT) + one * (WY_MAX_CHUNKS + 5000) + wy_frame("audio-stop")
        events = await self._wy(data, 120 + SLACK)
        self._error_closed("wyoming flood of one-sample chunks", events, "audio_too_long", "audio chunks")

    async def wy_idle(self) -> None:
        began = time.monotonic()
        events = await self._wy(b"", WY_IDLE + SLACK)
        self._error_closed("wyoming idle connection", events, "timeout")
        if time.monotonic() - began < WY_IDLE - 0.5:
            self.record("wyoming idle connection", False, f"closed after {time.monotonic() - began:.1f} s")

    async def wy_drip(self) -> None:
        """One chunk a second, inside the chunk deadline: closed at the utterance's wall-clock end."""
        reader, writer = await asyncio.open_connection(self.host, self.server.wyoming_port)
        writer.write(wy_frame("audio-start", WY_FMT))
        began, answer = time.monotonic(), b""
        with contextlib.suppress(OSError):
            while not answer and time.monotonic() - began < WY_UTTERANCE + SLACK:
                with contextlib.suppress(asyncio.TimeoutError):  # the attacker's pace: a chunk a second
                    answer = await asyncio.wait_for(reader.read(65536), 1.0)
                    break
                writer.write(wy_frame("audio-chunk", WY_FMT, b"\0\0" * 160))
        took = time.monotonic() - began
        answer += await closed_by_server(reader, 5.0) or b""
        writer.close()
        parsed = asyncio.StreamReader()
        parsed.feed_data(answer)
        parsed.feed_eof()
        events = await wy_events(parsed, 1.0)
        if took < WY_UTTERANCE - 0.5:
            events.append({"type": f"closed after {took:.1f} s"})
        self._error_closed("wyoming chunks dripped past the utterance's end", events, "timeout", "longer than")

    async def wy_normal(self) -> None:
        pcm = self.clip_pcm
        chunks = [wy_frame("audio-chunk", WY_FMT, pcm[i : i + 2048]) for i in range(0, len(pcm), 2048)]
        data = wy_frame("transcribe", {"language": "en"}) + wy_frame("audio-start", WY_FMT)
        events = await self._wy(data + b"".join(chunks) + wy_frame("audio-stop"), 300, until="transcript-stop")
        text = next((e.get("text") for e in events if e["type"] == "transcript"), None)
        if self.wyoming_text is None:
            self.wyoming_text = text
        ok = text is not None and text == self.wyoming_text and events[-1]["type"] == "transcript-stop"
        ok = ok or [(e["type"], e.get("code")) for e in events] == [("error", "rate_limit_exceeded")]  # a full queue
        self.record("wyoming normal utterance (same transcript)", ok, str(events)[-160:])


def multipart_head(host: str, port: int, length: int) -> bytes:
    """The request line and headers of an upload whose body is `length` bytes (never all sent)."""
    return (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {length}\r\n\r\n"
        '--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    ).encode()


def wav_bytes(pcm: bytes) -> bytes:
    return _sf_bytes(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, SR, "WAV", "PCM_16")


# ---- the soak -------------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, server: Server, plan: Plan, seed: int, concurrency: int, pool: int = 50) -> None:
        self.server, self.plan, self.rng = server, plan, random.Random(seed)
        self.attacks = Attacks(server, plan.clip_pcm)
        self.concurrency = concurrency
        self.pool = plan.normal[:pool]  # the requests bursts and the shutdown batch draw from
        self.alone: dict[Template, tuple[int, object]] = {}
        self.outcomes: list[Outcome] = []
        self.fds_fresh = self.fds_after = 0  # the server's open descriptors
        self.spool_after = 0  # spooled upload files the server still holds after the soak

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

            mix_done = asyncio.Event()
            attacks = asyncio.ensure_future(self.attacks.run(mix_done))  # rounds of them while the mix runs
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
            mix_done.set()
            await attacks
            self.soak_seconds = time.monotonic() - began
            while (await client.get("/health")).json().get("requests", 0):
                await asyncio.sleep(0.1)
            await asyncio.sleep(4.0)  # the engine hands memory back 2 s after its work runs out
            self.rss_idle = self.server.rss()
            self.fds_after = self.server.descriptors()
            self.spool_after = self.server.spool_files()
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

    log = soak.server.log_text()
    xff_logged = log.count(SPOOFED)
    health_lines = len(re.findall(r'"GET /health HTTP/1.1" 200', log))
    soak.attacks.record("access log: spoofed X-Forwarded-For never the client", xff_logged == 0 and health_lines > 0,
                        f"{xff_logged} lines name it, {health_lines} /health lines")  # fmt: skip
    connection_attacks = {name: {"as designed": c[True], "not": c[False]} for name, c in soak.attacks.results.items()}
    attacks_failed = sum(c[False] for c in soak.attacks.results.values())
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
        "connection_attacks": connection_attacks,
        "connection_attacks_not_as_designed": attacks_failed,
        "spool_files_held_by_stalled_uploads": soak.attacks.spool_held,
        "spool_files_after_soak": soak.spool_after,
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
        "examples": [o.note for o in (wrong + unexpected)[:10]]
        + [str(o.status) for o in lost[:10]]
        + soak.attacks.notes,
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
        *(
            (f"{name}: as designed / not", f"{c[True]} / {c[False]}")
            for name, c in sorted(soak.attacks.results.items())
        ),
        (
            "spool files held by the stalled uploads (per round, max) / after the soak",
            f"{max(soak.attacks.spool_held, default=0)} / {soak.spool_after}",
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
    ok = ok and not result["connection_attacks_not_as_designed"] and not result["spool_files_after_soak"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
