"""Peak memory and time of `canary-server convert` on a big `.nemo` (not CI).

The checkpoint to use: a random-weight canary-1b-v2-size archive built by NeMo itself with
`bench/make_big_v2_nemo.py` (6.36 GB: the main model's 3.85 GB of weights plus the bundled 2.50 GB timestamps model,
as the real release). The converter runs in a child process; its peak RSS comes from the kernel's own accounting
(`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, so it also works on macOS).

    .venv/bin/python bench/convert_memory.py ../bigfixtures/canary-1b-v2-random.nemo [--dtype float32] [--keep]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert(nemo: Path, out: Path, dtype: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "canary_server", "convert", str(nemo), str(out), "--dtype", dtype, "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"convert failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # of the largest child so far
    peak_bytes = peak if platform.system() == "Darwin" else peak * 1024
    return {"wall_s": wall, "peak_rss_bytes": peak_bytes, "out_bytes": _dir_bytes(out), "stdout": proc.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("nemo", type=Path)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--quantize", type=int, choices=(4, 8), help="also pass --quantize (builds the whole model)")
    ap.add_argument("--out", type=Path, help="output directory (default: a temporary one beside the .nemo)")
    ap.add_argument("--keep", action="store_true", help="keep the converted directory")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.nemo.parent)) / "model"
    extra = ["--quantize", str(args.quantize)] if args.quantize else []
    try:
        r = convert(args.nemo, out, args.dtype, extra)
    finally:
        if not args.keep:
            shutil.rmtree(out.parent if args.out is None else out, ignore_errors=True)
    gb = 1e9
    size = args.nemo.stat().st_size
    print(f"`canary-server convert` of {args.nemo.name}, {platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} cores, {date.today().isoformat()}\n")  # fmt: skip
    print("| archive | dtype | wall time | peak RSS | peak RSS / archive | converted size |")
    print("|---|---|---:|---:|---:|---:|")
    label = args.dtype + (f", {args.quantize}-bit" if args.quantize else "")
    print(f"| {size / gb:.2f} GB | {label} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / gb:.2f} GB | "
          f"{r['peak_rss_bytes'] / size:.2f} | {r['out_bytes'] / gb:.2f} GB |")  # fmt: skip


if __name__ == "__main__":
    main()
