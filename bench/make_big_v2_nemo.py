#!/usr/bin/env python
"""Build a random-weight canary-1b-v2-size `.nemo` with NeMo's own `save_to`, for benchmarking the converter's peak
memory on a full-size archive. The output lives OUTSIDE the repo and is never committed.

Run BY HAND in the NeMo 3.0.0 venv (NeMo and torch are not project dependencies), from the repo root:

    nice -n 5 ../nemo-venv/bin/python bench/make_big_v2_nemo.py      # writes ../bigfixtures/canary-1b-v2-random.nemo
    nice -n 5 ../nemo-venv/bin/python bench/make_big_v2_nemo.py --out /somewhere/else.nemo

Needs ~16 GB free disk on the output's filesystem and on $TMPDIR (NeMo's save_to writes the weights to a temporary
folder and then tars them) and ~8 GB RAM. Result: a ~6.4 GB plain tar with the main EncDecMultiTaskModel (FastConformer
32 x 1024, 8 heads, 256 subsampling channels, 128 mels; Transformer decoder 8 x 1024, max_sequence_length 1024; one
unified 16384-piece SentencePiece with CanaryBPETokenizer; prompt format canary2; no encoder_decoder_proj) and, as
canary-1b-v2 carries it, `timestamps_asr_model_config.yaml` + `timestamps_asr_model_weights.ckpt` + its own
tokenizer members: an EncDecCTCModelBPE (24 x 1024, `use_bias: false`, 16384 + 1 classes). Both models are built from
NeMo's recipe YAML exactly as tests/fixtures/release/make_release_fixtures.py builds its full-size manifests
(1510 + 712 state-dict keys); the weights are NeMo's own random initialisation after torch.manual_seed(0).
"""

import argparse
import gc
import os
import resource
import shutil
import sys
import tarfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "fixtures", "release"))
import make_release_fixtures as rf  # noqa: E402  (recipe config, tokenizers, CTC bundling)

GB = 1e9


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def check_disk(path: str, need_gb: float) -> None:
    for where in (path, os.environ.get("TMPDIR", "/tmp")):
        free = shutil.disk_usage(where).free / GB
        log(f"free disk at {where}: {free:.1f} GB")
        if free < need_gb:
            raise SystemExit(f"need ~{need_gb:.0f} GB free at {where}, have {free:.1f} GB")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(__file__).resolve().parents[2] / "bigfixtures" / "canary-1b-v2-random.nemo"  # beside checkout
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--need-gb", type=float, default=16.0, help="refuse to start with less free disk than this")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    check_disk(os.path.dirname(out), args.need_gb)
    work = out + ".work"
    partial = out + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()

    model, tok_dir = rf.full_model("canary-1b-v2", work, device="cpu")
    n_main = len(model.state_dict())
    log(f"main model built: {n_main} keys, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    model.save_to(partial)
    del model
    gc.collect()
    log(f"main saved: {os.path.getsize(partial) / GB:.2f} GB, peak RSS {peak_rss_gb():.1f} GB")

    ctc = rf.full_ctc(tok_dir, work, device="cpu")
    n_ctc = len(ctc.state_dict())
    ctc_nemo = os.path.join(work, "ctc.nemo")
    ctc.save_to(ctc_nemo)
    del ctc
    gc.collect()
    log(f"timestamps model saved: {n_ctc} keys, {os.path.getsize(ctc_nemo) / GB:.2f} GB")

    added = rf.bundle_ctc(partial, ctc_nemo)
    os.replace(partial, out)
    shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - t0
    with tarfile.open(out, "r:") as tar:
        members = [(m.name, m.size) for m in tar.getmembers() if m.isfile()]
    for name, size in members:
        log(f"  {size:>14,d}  {name}")
    log(f"appended: {added}")
    log(f"wrote {out}: {os.path.getsize(out):,d} bytes ({os.path.getsize(out) / GB:.2f} GB) in {elapsed:.0f} s; "
        f"keys {n_main} + {n_ctc}; peak RSS {peak_rss_gb():.1f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
