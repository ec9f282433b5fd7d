"""NeMo's side of bench/stages.py: one short request's stages in NeMo 3.0.0's `transcribe()` (run in NeMo's venv).

Builds the model as bench/nemo_baseline.py does (random weights, real dims, forced decode length), then for each
line on stdin transcribes the clip once and prints one JSON line of stage times (seconds), from forward hooks:
upload decode (soundfile reading the WAV bytes, then `transcribe()` up to its preprocessor: NeMo's dataloader),
features (preprocessor), encoder (+ encoder_decoder_proj), prompt + prefill (up to the end of the generator's first
`_one_step_forward`), decoder steps (from there to the end of its last one), result + response (the
rest of `transcribe()` and a JSON dump). `--repeats N` without stdin: N runs, the per-stage medians as one line.

    ../nemo-venv/bin/python bench/nemo_stages.py --model 180m-flash --tokenizers ~/.cache/canary-bench/180m-flash
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from nemo_baseline import ENCODERS, TOKENS_PER_SECOND, build  # noqa: E402

from synth import speech_like, wav_bytes  # noqa: E402


class Clock:
    """Timestamps of the hooked modules' calls within one transcribe()."""

    def __init__(self, model) -> None:
        self.events: list[tuple[str, str, float]] = []
        mods = {"pre": model.preprocessor, "enc": model.encoder}
        if hasattr(model, "encoder_decoder_proj"):
            mods["proj"] = model.encoder_decoder_proj
        for name, mod in mods.items():
            mod.register_forward_pre_hook(self._mark(name, "start"))
            mod.register_forward_hook(self._mark(name, "end"))
        # NeMo's generator calls its embedding, decoder and head with `.forward()` (no hooks): time each of its
        # one-step calls (the prompt's, then one per token) by wrapping the method itself.
        gen = model.decoding.decoding.beam_search
        one_step = gen._one_step_forward

        def timed(*a, **kw):
            self.events.append(("head", "start", time.perf_counter()))
            out = one_step(*a, **kw)
            self.events.append(("head", "end", time.perf_counter()))
            return out

        gen._one_step_forward = timed

    def _mark(self, name: str, what: str):
        def hook(*_):
            self.events.append((name, what, time.perf_counter()))

        return hook

    def first(self, name: str, what: str, nth: int = 0) -> float:
        return [t for n, w, t in self.events if n == name and w == what][nth]

    def last(self, name: str, what: str) -> float:
        return [t for n, w, t in self.events if n == name and w == what][-1]


def once(model, clock: Clock, data: bytes, seconds: float) -> dict:
    model.decoding.decoding.beam_search.forced = max(1, round(TOKENS_PER_SECOND * seconds))
    clock.events.clear()
    t0 = time.perf_counter()
    audio, _ = sf.read(io.BytesIO(data), dtype="float32")
    hyps = model.transcribe([audio], source_lang="en", target_lang="en", pnc="yes", batch_size=16, verbose=False)
    json.dumps({"text": hyps[0].text})
    t_end = time.perf_counter()
    starts = {n: tt for n, w, tt in reversed(clock.events) if w == "start"}  # each module's first call
    enc_end = starts.get("proj") or clock.last("enc", "end")  # NeMo's preprocessor and encoder may not report "end"
    heads = [tt for n, w, tt in clock.events if n == "head" and w == "end"]  # one per decoder call
    t = {
        "upload decode": starts["pre"] - t0,
        "features": starts["enc"] - starts["pre"],
        "encoder": enc_end - starts["enc"],
        "prompt + prefill": heads[0] - enc_end,
        "decoder steps": heads[-1] - heads[0],
        "result + response": t_end - heads[-1],
        "steps": len(heads) - 1,
        "tokens": len(hyps[0].y_sequence),
    }
    t["step median"] = statistics.median(b - a for a, b in zip(heads, heads[1:], strict=False))
    t["total"] = t_end - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(ENCODERS), default="180m-flash")
    ap.add_argument("--tokenizers", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=0, help="run N times and print the medians (else: read stdin)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    data = wav_bytes(speech_like(args.seconds, seed=int(args.seconds)))
    with tempfile.TemporaryDirectory() as work, torch.inference_mode():
        model = build(args.model, args.tokenizers, Path(work))
        clock = Clock(model)
        once(model, clock, data, args.seconds)  # warm-up
        print("ready", flush=True)
        if args.repeats:
            runs = [once(model, clock, data, args.seconds) for _ in range(args.repeats)]
            print(json.dumps({k: statistics.median(r[k] for r in runs) for k in runs[0]}), flush=True)
            return
        for _ in sys.stdin:
            print(json.dumps(once(model, clock, data, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
