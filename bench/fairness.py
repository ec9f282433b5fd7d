"""Both sides of the scheduler's fairness bound (`long_request_share`, pipeline/fairness.py), over HTTP.

For each share: 5 s requests sent one after another while a 5-minute file is transcribed. Short requests go first,
so their latency stays near idle; the share bounds what that costs the long file. Prints, per share, the short
requests' p50 / p95 (and p95 against the idle p95 of the same server) and the long file's latency (and against the
same file alone). Same server and random-weight real-dims model as bench/run.py (forced decode length).

    .venv/bin/python bench/fairness.py --model 180m-flash --shares 0 0.25 0.5 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

from run import (
    Client,
    Server,
    concurrent,
    during_long,
    log,
    single_stream,
    transcribe,
)

from synth import speech_like, wav_bytes


def measure(model_dir: Path, dtype: str, share: float, long_seconds: float) -> dict:
    server = Server(model_dir, dtype, extra_env={"CANARY_LONG_REQUEST_SHARE": str(share)})
    try:
        server.wait_ready()
        clips = [wav_bytes(speech_like(5.0, seed=100 + i)) for i in range(16)]
        with Client(server.url) as c:  # warm-up
            for data in (clips[0], wav_bytes(speech_like(30.0, seed=1))):
                transcribe(c, data)
        idle = concurrent(server.url, clips, 1, 16)
        alone = single_stream(server.url, long_seconds, 1)
        beside = during_long(server.url, wav_bytes(speech_like(long_seconds, seed=300)), clips)
    finally:
        server.stop()
    out = {"share": share, "idle_p50_s": idle["p50_s"], "idle_p95_s": idle["p95_s"],
           "long_alone_s": alone["latency_s"], **{k: v for k, v in beside.items() if k != "sent_at_s"}}  # fmt: skip
    log(f"share {share}: {json.dumps({k: v for k, v in out.items() if not isinstance(v, list)})}")
    return out


def table(res: dict) -> str:
    lines = [
        f"**{res['model']}** (random weights, real dims), {res['dtype']}, {res['machine']}, {res['date']}: 5 s "
        f"requests one after another during a {res['long_seconds']:g} s file",
        "",
        "| long_request_share | short requests | short p50 | short p95 (x idle) | long file (x alone) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['share']:g} | {r['requests']} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s "
            f"({r['p95_s'] / r['idle_p95_s']:.1f}x) | {r['long_latency_s']:.1f} s "
            f"({r['long_latency_s'] / r['long_alone_s']:.1f}x) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("180m-flash", "1b-flash", "tiny"), default="180m-flash")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    ap.add_argument("--long-seconds", type=float, default=300.0, help="length of the long file (default 300)")
    ap.add_argument("--model-dir", type=Path, help="where the random model is written (default: ~/.cache/...)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import random_model

    model_dir = random_model.build(args.model, args.model_dir or random_model.DEFAULT_ROOT / args.model)
    res = {"model": f"canary-{args.model}", "dtype": args.dtype, "date": date.today().isoformat(),
           "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
           "long_seconds": args.long_seconds,
           "runs": [measure(model_dir, args.dtype, s, args.long_seconds) for s in args.shares]}  # fmt: skip
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
