"""Speed of the server on random-weight models with the real dimensions of canary-180m-flash / canary-1b-flash /
canary-qwen-2.5b (`--model qwen-2.5b`: bench/random_salm.py; about 10 GB of memory in float32).

Everything goes through the HTTP server (`bench/serve_capped.py`, i.e. `canary-server serve` with the decode length
forced to round(4 * seconds) tokens, because random weights never stop by themselves) on 127.0.0.1, so it measures
whatever engine is on the branch: upload, decoding, long-audio chunking (pipeline/chunking.py), batching.

* single stream: RTFx (audio seconds / wall seconds) and generated tokens/s for 5 s, 30 s and 5 min clips;
* concurrency 1, 4, 16 (5 s clips, each client sends its next request when its last one returns; each repetition
  runs them back to back, and the last / first one's throughput ratio is given per repetition): throughput in
  audio seconds per wall second, p50 / p95 latency;
* 5 s requests sent one after another while a 5-minute file is being transcribed: their p95 vs the idle p95;
* peak memory: the server's peak RSS (getrusage) and MLX's `get_peak_memory()`, as the server reports them;
* `--dtype float32,float16,...`: one server per compute dtype, a table each and one comparing them;
* the server's VAD gate is off (`CANARY_VAD=false`) unless `--vad`: Silero hears no speech in some of these synthetic
  clips (the 30 s one, seed 30, peaks at 0.35 < 0.5) and the server then returns empty text without decoding them,
  which would time nothing; NeMo has no such gate, and without it long audio is cut as NeMo's side cuts it;
* `--with-nemo`: bench/nemo_baseline.py (NeMo PyTorch, same dims, same forced length) in NeMo's venv, beside ours;
  for canary-qwen (`qwen-2.5b`, `tiny-salm`) bench/nemo_salm.py (NeMo's SALM), single stream and concurrency both.

Audio is synthetic and seeded (voiced harmonics with a syllable-rate envelope and pauses). Prints Markdown tables
headed by the machine, MLX version, device and commit, ready to paste into an issue, and writes JSON. Runs the same
on macOS (Metal) and Linux (CPU): nothing platform-specific is needed.

    .venv/bin/python bench/run.py --model 180m-flash [--dtype float32,float16] [--with-nemo] [--repeats 3]
        [--json out.json]

`--model tiny` with `--single-seconds`, `--concurrency`, `--clips-per-client` and `--long-seconds` set small is the
smoke test's run (tests/test_bench_smoke.py): every measurement once, in seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
import numpy as np

from machine_info import describe
from synth import speech_like, wav_bytes

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TOKENS_PER_SECOND = 4.0
SINGLE_SECONDS = (5.0, 30.0, 300.0)
CONCURRENCY = (1, 4, 16)
DTYPES = ("float32", "float16", "bfloat16")


# ---- server ---------------------------------------------------------------------------------------------------
class Server:
    """`bench/serve_capped.py` as a subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, dtype: str, extra_env: dict[str, str] | None = None, vad: bool = False) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_file = Path(tempfile.mkstemp(suffix=".json")[1])
        env = dict(os.environ, CANARY_DTYPE=dtype, CANARY_LOG_LEVEL="warning", CANARY_BENCH_STATS=str(self.stats_file))
        env["CANARY_BENCH_TOKENS_PER_SECOND"] = str(TOKENS_PER_SECOND)
        env["CANARY_WYOMING_PORT"] = "0"  # HTTP only: the default Wyoming port may be a running server's
        env["CANARY_VAD"] = "true" if vad else "false"  # see the module docstring: a gate would skip some clips
        env.update(extra_env or {})
        cmd = [sys.executable, str(BENCH / "serve_capped.py"), "--model", str(model_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO)

    def wait_ready(self, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not become ready")

    def stop(self) -> dict:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            return json.loads(self.stats_file.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        finally:
            self.stats_file.unlink(missing_ok=True)


class Client:
    """One keep-alive HTTP/1.1 connection (http.client) that posts multipart forms built by hand. The bench's clients
    run on the server's two cores: httpx took ~6 ms of CPU per 5 s upload there (its multipart encoder and transport),
    this takes ~0.6 ms (measured: `client_cpu_ms` in the results), so the server's numbers carry less of the client's
    cost. The server sees the same request either way."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def post_form(self, path: str, fields: dict[str, str], file: tuple[str, bytes, str]) -> tuple[int, bytes]:
        boundary = uuid.uuid4().hex
        body = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                for k, v in fields.items()]  # fmt: skip
        name, data, ctype = file
        body += [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 f"Content-Type: {ctype}\r\n\r\n".encode(), data, f"\r\n--{boundary}--\r\n".encode()]  # fmt: skip
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        self.conn.request("POST", path, body=b"".join(body), headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read()


def transcribe(client: Client, data: bytes) -> tuple[float, int]:
    """One request -> (latency seconds, generated tokens)."""
    t0 = time.perf_counter()
    status, body = client.post_form(
        "/v1/audio/transcriptions",
        {"model": "whisper-1", "response_format": "verbose_json", "language": "en"},
        ("clip.wav", data, "audio/wav"),
    )
    latency = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:500]!r}")
    return latency, sum(len(s.get("tokens", [])) for s in json.loads(body).get("segments", []))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


# ---- measurements ---------------------------------------------------------------------------------------------
def single_stream(url: str, seconds: float, repeats: int) -> dict:
    data = wav_bytes(speech_like(seconds, seed=int(seconds)))
    with Client(url) as c:
        runs = [transcribe(c, data) for _ in range(repeats)]
    lat = statistics.median(r[0] for r in runs)
    # random canary-qwen ids decode to no text, so no segments to count: the forced count (checked in-process)
    tokens = runs[0][1] or expected_tokens(seconds)
    return {"seconds": seconds, "latency_s": lat, "rtfx": seconds / lat, "tokens": tokens, "tokens_per_s": tokens / lat,
            "latencies_s": [r[0] for r in runs], "expected_tokens": expected_tokens(seconds)}  # fmt: skip


def expected_tokens(seconds: float) -> int:
    """round(4 * s) per chunk; long audio is cut into pieces of <= chunk_seconds (40 s): approximate for 5 min."""
    return round(TOKENS_PER_SECOND * seconds)


def concurrent(url: str, clips: list[bytes], concurrency: int, per_client: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with Client(url) as c:
            for j in range(per_client):
                lat, _ = transcribe(c, clips[(k * per_client + j) % len(clips)])
                with lock:
                    latencies.append(lat)

    t0, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = concurrency * per_client
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "throughput": n * 5.0 / wall,
            "p50_s": pct(latencies, 50), "p95_s": pct(latencies, 95), "client_cpu_ms": 1000 * cpu / n}  # fmt: skip


def during_long(url: str, long_clip: bytes, clips: list[bytes]) -> dict:
    """5 s requests, one at a time, while a long file (5 minutes) is in flight; only those that ended before it
    count."""
    done = threading.Event()
    long_result: dict = {}

    def run_long() -> None:
        with Client(url) as c:
            long_result["latency_s"], _ = transcribe(c, long_clip)
        done.set()

    th = threading.Thread(target=run_long)
    t0 = time.perf_counter()
    th.start()
    time.sleep(1.0)  # the long file is uploaded, chunked and being decoded
    lat, sent = [], []
    with Client(url) as c:
        i = 0
        while not done.is_set():
            start = time.perf_counter() - t0
            t, _ = transcribe(c, clips[i % len(clips)])
            if not done.is_set():
                lat.append(t)
                sent.append(start)
            i += 1
    th.join()
    return {"requests": len(lat), "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "latencies_s": lat,
            "sent_at_s": sent, "long_latency_s": long_result["latency_s"]}  # fmt: skip


def run_ours(model_dir: Path, dtype: str, repeats: int, single_only: bool, sizes: argparse.Namespace) -> dict:
    server = Server(model_dir, dtype, vad=sizes.vad)
    out: dict = {}
    try:
        t0 = time.perf_counter()
        server.wait_ready()
        out["load_s"] = time.perf_counter() - t0
        clips = [wav_bytes(speech_like(5.0, seed=100 + i)) for i in range(16)]
        with Client(server.url) as c:  # warm-up: compile, allocate
            for data in (clips[0], wav_bytes(speech_like(30.0, seed=1))):
                transcribe(c, data)
        out["single"] = []
        for s in sizes.single_seconds:
            out["single"].append(single_stream(server.url, s, repeats if s < 300 else max(1, repeats - 1)))
            log(f"single {s:g}s: {out['single'][-1]['rtfx']:.1f}x")
        if not single_only:
            # Repetition by repetition, every concurrency back to back: the VM's speed drifts by up to 30% within
            # minutes, and a ratio of runs minutes apart would carry that drift.
            runs: dict[int, list[dict]] = {c: [] for c in sizes.concurrency}
            for _ in range(repeats):
                for c in sizes.concurrency:
                    runs[c].append(concurrent(server.url, clips, c, sizes.clips_per_client or max(2, 16 // c)))
                    log(f"c={c}: {runs[c][-1]['throughput']:.1f} audio s/s")
            out["concurrency"] = [median_run(runs[c], "throughput") for c in sizes.concurrency]
            if len(runs) > 1:
                pairs = zip(runs[sizes.concurrency[0]], runs[sizes.concurrency[-1]], strict=True)
                out["concurrency_ratios"] = [b["throughput"] / a["throughput"] for a, b in pairs]
            if sizes.long_seconds > 0:
                long_clip = wav_bytes(speech_like(sizes.long_seconds, seed=300))
                out["during_long"] = [
                    {**during_long(server.url, long_clip, clips), "long_seconds": sizes.long_seconds}
                    for _ in range(max(1, repeats - 1))
                ]
                log(f"during long: {out['during_long']}")
    finally:
        out.update(server.stop())
    return out


def median_run(runs: list[dict], key: str) -> dict:
    """The run with the median `key`, plus every run's values of the main numbers."""
    ordered = sorted(runs, key=lambda r: r[key])
    med = dict(ordered[len(ordered) // 2])
    med["runs"] = [{k: r[k] for k in ("throughput", "p50_s", "p95_s")} for r in runs]
    return med


def run_nemo(name: str, model_dir: Path, repeats: int, sizes: argparse.Namespace, salm: bool) -> dict | None:
    python = os.environ.get("NEMO_PYTHON") or str(REPO.parent / "nemo-venv" / "bin" / "python")  # beside the checkout
    if not Path(python).exists():
        log(f"--with-nemo: {python} not found; skipping NeMo")
        return None
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [python, str(BENCH / "nemo_baseline.py"), "--model", name, "--tokenizers", str(model_dir),
               "--repeats", str(repeats), "--json", f.name, "--seconds", *map(str, sizes.single_seconds)]  # fmt: skip
        if salm:  # NeMo's SALM at the dims of our converted dir, the same clips and (batched) concurrency
            cmd = [python, str(BENCH / "nemo_salm.py"), "--model-dir", str(model_dir), "--repeats", str(repeats),
                   "--json", f.name, "--seconds", *map(str, sizes.single_seconds),
                   "--concurrency", *([] if sizes.single_only else map(str, sizes.concurrency))]  # fmt: skip
            if sizes.clips_per_client:
                cmd += ["--clips-per-client", str(sizes.clips_per_client)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)  # NeMo logs to stdout
        return json.loads(Path(f.name).read_text())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- report ---------------------------------------------------------------------------------------------------
def table(res: dict, dtype: str) -> str:
    ours, nemo = res["ours"][dtype], res.get("nemo")
    mib = 1024 * 1024
    server = ", ".join(str(ours[k]) for k in ("mlx", "device", "paths") if ours.get(k))
    title = f"**{res['model']}** (random weights, real dims), {dtype}, server: {server or '?'}"
    lines = [title, f"{res['machine']}, commit {res['commit']}, {res['date']}", ""]
    head = "| single stream | ours: latency | ours: RTFx | ours: tokens/s |"
    sep = "|---|---:|---:|---:|"
    if nemo:
        head += " NeMo: latency | NeMo: RTFx | NeMo: tokens/s | ours / NeMo |"
        sep += "---:|---:|---:|---:|"
    lines += [head, sep]
    nemo_by = {r["seconds"]: r for r in (nemo or {}).get("single", [])}
    for r in ours["single"]:
        row = f"| {fmt_dur(r['seconds'])} | {r['latency_s']:.2f} s | {r['rtfx']:.1f}x | {r['tokens_per_s']:.0f} |"
        if nemo:
            n = nemo_by.get(r["seconds"])
            ratio = r["rtfx"] / n["rtfx"] if n else 0.0
            row += (f" {n['latency_s']:.2f} s | {n['rtfx']:.1f}x | {n['tokens_per_s']:.0f} | {ratio:.2f}x |"
                    if n else " - | - | - | - |")  # fmt: skip
        lines.append(row)
    if "concurrency" in ours:
        lines += ["", "| 5 s clips, HTTP | requests | throughput (audio s / s) | p50 latency | p95 latency |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        nemo_conc = {r["concurrency"]: r for r in (nemo or {}).get("concurrency", [])}
        if nemo_conc:  # canary-qwen: NeMo's SALM, each round's requests batched in one generate() call
            lines[-2] += " NeMo (batched generate()): throughput | NeMo p50 | NeMo p95 | ours / NeMo |"
            lines[-1] += "---:|---:|---:|---:|"
        for r in ours["concurrency"]:
            row = (f"| concurrency {r['concurrency']} | {r['requests']} | {r['throughput']:.1f} | "
                   f"{r['p50_s']:.2f} s | {r['p95_s']:.2f} s |")  # fmt: skip
            if nemo_conc:
                n = nemo_conc.get(r["concurrency"])
                row += (f" {n['throughput']:.2f} | {n['p50_s']:.2f} s | {n['p95_s']:.2f} s | "
                        f"{r['throughput'] / n['throughput']:.2f}x |" if n else " - | - | - | - |")  # fmt: skip
            lines.append(row)
        idle = ours["concurrency"][0]
        for d in ours.get("during_long", []):
            long = fmt_dur(d.get("long_seconds", 300))
            lines.append(f"| one at a time during a {long} file | {d['requests']} | - | {d['p50_s']:.2f} s | "
                         f"{d['p95_s']:.2f} s ({d['p95_s'] / idle['p95_s']:.1f}x idle) |")  # fmt: skip
        alone = next((r["latency_s"] for r in ours["single"] if r["seconds"] == 300), None)
        took = ", ".join(f"{d['long_latency_s']:.1f} s" for d in ours.get("during_long", []))
        if took:
            lines += ["", f"The long file itself took {took} with those requests running beside it"
                          + (f" ({alone:.1f} s alone)." if alone else ".")]  # fmt: skip
        ratios = ours.get("concurrency_ratios")
        if ratios:
            lo, hi = ours["concurrency"][0]["concurrency"], ours["concurrency"][-1]["concurrency"]
            each = ", ".join(f"{r:.2f}" for r in ratios)
            lines += ["", f"Throughput at concurrency {hi} / concurrency {lo}: {statistics.median(ratios):.2f}x "
                          f"(median; each repetition's runs back to back: {each})."]  # fmt: skip
        cpu = [r["client_cpu_ms"] for r in ours["concurrency"] if "client_cpu_ms" in r]
        if cpu:
            lines += ["", f"The bench's clients ran on the server's machine: {min(cpu):.1f}-{max(cpu):.1f} ms of CPU "
                          "per request (bench/run.py's `Client`)."]  # fmt: skip
    mem = [f"server peak RSS {ours['peak_rss_bytes'] / mib:.0f} MiB"] if ours.get("peak_rss_bytes") else []
    if ours.get("mlx_peak_memory_bytes"):
        mem.append(f"MLX peak memory {ours['mlx_peak_memory_bytes'] / mib:.0f} MiB")
    if nemo and nemo.get("peak_rss_bytes"):
        mem.append(f"NeMo process peak RSS {nemo['peak_rss_bytes'] / mib:.0f} MiB")
    lines += ["", "Peak memory: " + ", ".join(mem) + "."]
    return "\n".join(lines)


def dtype_table(res: dict) -> str:
    """One row per compute dtype: single-stream latencies, concurrency throughput and its last / first ratio, memory."""
    runs = list(res["ours"].values())
    seconds = [r["seconds"] for r in runs[0]["single"]]
    clients = [r["concurrency"] for r in runs[0].get("concurrency", [])]
    head = "| dtype |" + "".join(f" {fmt_dur(s)} latency |" for s in seconds)
    head += "".join(f" c={c} audio s/s |" for c in clients)
    head += f" c={clients[-1]} / c={clients[0]} |" if len(clients) > 1 else ""
    lines = [f"**{res['model']}** per compute dtype, {res['machine']}, commit {res['commit']}, {res['date']}", "",
             head + " peak RSS |", "|---|" + "---:|" * (head.count("|") - 1)]  # fmt: skip
    for dtype, ours in res["ours"].items():
        by = {r["seconds"]: r for r in ours["single"]}
        row = f"| {dtype} |" + "".join(f" {by[s]['latency_s']:.2f} s |" if s in by else " - |" for s in seconds)
        conc = {r["concurrency"]: r["throughput"] for r in ours.get("concurrency", [])}
        row += "".join(f" {conc[c]:.1f} |" if c in conc else " - |" for c in clients)
        if len(clients) > 1:
            ok = clients[0] in conc and clients[-1] in conc
            row += f" {conc[clients[-1]] / conc[clients[0]]:.2f}x |" if ok else " - |"
        rss = ours.get("peak_rss_bytes")
        lines.append(row + (f" {rss / 2**20:.0f} MiB |" if rss else " - |"))
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    except OSError:
        return "?"
    return (out.stdout.strip() or "?") + ("+changes" if dirty.stdout.strip() else "")


def targets(res: dict, dtype: str) -> list[str]:
    ours, nemo, out = res["ours"][dtype], res.get("nemo"), []
    if ours.get("during_long"):
        c1, c16 = ours["concurrency"][0], ours["concurrency"][-1]
        ratio = c16["throughput"] / c1["throughput"]
        out.append(f"throughput c=16 / c=1 = {c16['throughput']:.1f} / {c1['throughput']:.1f} = {ratio:.2f}x "
                   f"(target >= 4x): {'met' if ratio >= 4 else 'NOT met'}")  # fmt: skip
        p95 = statistics.median(d["p95_s"] for d in ours["during_long"])
        ratio = p95 / c1["p95_s"]
        out.append(f"p95 of 5 s requests during a 5-min file / idle p95 = {p95:.2f} / {c1['p95_s']:.2f} s = "
                   f"{ratio:.1f}x (target <= 3x): {'met' if ratio <= 3 else 'NOT met'}")  # fmt: skip
    if nemo:
        by = {r["seconds"]: r for r in nemo["single"]}
        parts = [f"{fmt_dur(r['seconds'])} {r['rtfx'] / by[r['seconds']]['rtfx']:.2f}x"
                 for r in ours["single"] if r["seconds"] in by]  # fmt: skip
        ok = all(r["rtfx"] >= by[r["seconds"]]["rtfx"] for r in ours["single"] if r["seconds"] in by)
        out.append(f"single-stream speed vs NeMo (ours RTFx / NeMo RTFx): {', '.join(parts)} (target >= 1x): "
                   f"{'met' if ok else 'NOT met'}")  # fmt: skip
    return out


def fmt_dur(s: float) -> str:
    return f"{s / 60:g} min" if s >= 60 else f"{s:g} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", choices=("180m-flash", "1b-flash", "tiny", "qwen-2.5b", "tiny-salm"), default="180m-flash"
    )
    ap.add_argument("--dtype", default="float32", help=f"compute dtype(s), comma-separated, of {', '.join(DTYPES)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    ap.add_argument("--single-only", action="store_true", help="skip the concurrency and long-file runs")
    ap.add_argument(
        "--with-nemo", action="store_true", help="also run bench/nemo_baseline.py ($NEMO_PYTHON, default ../nemo-venv)"
    )
    ap.add_argument("--model-dir", type=Path, help="where the random model is written (default: ~/.cache/...)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--vad", action="store_true", help="keep the server's VAD gate on (off by default: see above)")
    ap.add_argument("--single-seconds", type=float, nargs="+", default=list(SINGLE_SECONDS), help="clip lengths")
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY), help="client counts")
    ap.add_argument("--clips-per-client", type=int, default=None, help="default: max(2, 16 // concurrency)")
    ap.add_argument("--long-seconds", type=float, default=300.0, help="the long file of the 'during' run (0: skip it)")
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtype: comma-separated values of {', '.join(DTYPES)}; got {args.dtype!r}")

    import random_model
    import random_salm

    builder = random_salm if args.model in random_salm.MODELS else random_model  # canary-qwen: bench/random_salm.py
    model_dir = builder.build(args.model, args.model_dir or builder.DEFAULT_ROOT / args.model)
    res = {"model": f"canary-{args.model}", "dtypes": dtypes, "date": date.today().isoformat(),
           "machine": describe(with_mlx=False), "commit": git_commit(),
           "tokens_per_second_forced": TOKENS_PER_SECOND, "ours": {}}  # fmt: skip
    for dtype in dtypes:
        log(f"-- {dtype}")
        res["ours"][dtype] = run_ours(model_dir, dtype, args.repeats, args.single_only, args)
        if args.json:  # kept even if a later run fails
            args.json.write_text(json.dumps(res, indent=2))
    if args.with_nemo:
        try:
            res["nemo"] = run_nemo(args.model, model_dir, args.repeats, args, builder is random_salm)
        except subprocess.CalledProcessError as exc:
            log(f"NeMo baseline failed ({exc}); reporting ours only")
    for dtype in dtypes:
        print(table(res, dtype))
        print()
        for line in targets(res, dtype):
            print("- " + line)
        print()
    if len(dtypes) > 1:
        print(dtype_table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
