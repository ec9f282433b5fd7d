"""`canary-server serve` with the bench's forced decode length. Bench only: the product never caps like this.

The random-weight models never emit <|endoftext|> (bench/random_model.py), so every sequence runs to its length
limit. This wrapper lowers that limit to round(CANARY_BENCH_TOKENS_PER_SECOND * seconds) tokens (default 4, a
realistic rate for speech) by replacing `single_item_max_new_tokens` in pipeline/encoding.py, the one place the
continuous batcher takes a sequence's limit from; NeMo's own limit still applies when it is lower. Nothing in the
package is changed. It keeps `mx.get_peak_memory()`, its peak RSS, MLX's version and device and the backend paths in
$CANARY_BENCH_STATS (JSON) if set.

    .venv/bin/python bench/serve_capped.py --model DIR --port 8123      # same flags as `canary-server serve`
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import canary_server  # noqa: F401  (preloads OpenBLAS before anything imports MLX)
from canary_server.cli import main
from canary_server.pipeline import encoding, salm_batcher

RATE = float(os.environ.get("CANARY_BENCH_TOKENS_PER_SECOND", "4"))
_nemo_limit = encoding.single_item_max_new_tokens
_salm_limit = salm_batcher.max_new_tokens


def capped_max_new_tokens(m, num_samples: int, prompt_len: int) -> int:
    forced = max(1, round(RATE * num_samples / m.sample_rate))
    return min(_nemo_limit(m, num_samples, prompt_len), forced)


def force_decode_length() -> None:
    """Cap every sequence the continuous batcher starts from now on (in this process) as above."""
    assert encoding.single_item_max_new_tokens is _nemo_limit, "the limit moved: patch where the batcher reads it"
    encoding.single_item_max_new_tokens = capped_max_new_tokens
    # canary-qwen (pipeline/salm_batcher.py): the same forced length, within the server's own limit
    assert salm_batcher.max_new_tokens is _salm_limit, "the SALM limit moved: patch where its batcher reads it"
    salm_batcher.max_new_tokens = lambda m, n, frames: min(_salm_limit(m, n, frames), max(1, round(RATE * n / 16000)))


def _write_stats(path: str) -> None:
    """Every half second (the server may be stopped by a signal, so no atexit hook)."""
    import mlx.core as mx  # after canary_server: its import preloads OpenBLAS

    from canary_server import _blas
    from canary_server.model import backend, cpu_kernels
    from machine_info import peak_rss_bytes

    paths = f"{backend.paths()} paths"
    if backend.cpu_paths() and sys.platform.startswith("linux"):  # what computes the matmuls (README, Linux note)
        core = _blas.openblas_core()
        paths += f", OpenBLAS {core} kernels" if core else ", no OpenBLAS"
        paths += f", CPU kernels {cpu_kernels.status()}"
        if cpu_kernels.packed_isa():
            paths += f" (packed matmul: {cpu_kernels.packed_isa()})"
    while True:
        stats = {"mlx_peak_memory_bytes": mx.get_peak_memory(), "peak_rss_bytes": peak_rss_bytes()}
        stats.update(mlx=f"MLX {mx.__version__}", device=str(mx.default_device()), paths=paths)
        Path(path).write_text(json.dumps(stats))
        time.sleep(0.5)


if __name__ == "__main__":
    force_decode_length()
    if os.environ.get("CANARY_BENCH_STATS"):
        threading.Thread(target=_write_stats, args=(os.environ["CANARY_BENCH_STATS"],), daemon=True).start()
    sys.exit(main(["serve", *sys.argv[1:]]))
