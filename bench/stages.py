# isort: skip_file
"""Where the time of one short request goes: ours and NeMo's stages side by side, in one run.

Ours, in this process, on a random-weight model with real dims (bench/random_model.py), the way the engine runs
one request alone: upload decode (`load_audio` of the WAV bytes), features, encoder (+ projection), prompt and
prefill (`BatchDecoder.add`: cross K/V, the prompt through the decoder, first token), every further decoder step
(`BatchDecoder.step`, pipelined as the engine runs it), result and response (`Canary.result` + JSON). NeMo's, in
NeMo's venv (bench/nemo_stages.py, torch threads 2, no LD_PRELOAD): `transcribe()` with forward hooks on its
preprocessor, encoder, projection and transformer decoder. Both decode exactly round(4 * seconds) tokens (the head
never picks <|endoftext|>). The two sides run alternately, `--repeats` times each; medians per stage.

    .venv/bin/python bench/stages.py --model 180m-flash [--seconds 5] [--repeats 5] [--no-nemo]

Prints a Markdown table. Timings depend on the machine's load: compare the two columns of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from canary_server import model as model_pkg  # noqa: E402, F401  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from canary_server.model import load  # noqa: E402
from canary_server.model.audio import MIN_AUDIO_SECONDS, load_audio, pad_batch, pad_to_min_duration  # noqa: E402
from canary_server.model.batch_decoder import BatchDecoder, Sequence  # noqa: E402
from canary_server.model.prompt import PromptSpec  # noqa: E402
from synth import speech_like, wav_bytes  # noqa: E402

TOKENS_PER_SECOND = 4.0
NEMO_PY = Path(os.environ.get("NEMO_PYTHON", REPO.parent / "nemo-venv" / "bin" / "python"))
STAGES = ("upload decode", "features", "encoder", "prompt + prefill", "decoder steps", "result + response")


def model_dir(name: str, given: Path | None = None) -> Path:
    d = given or Path.home() / ".cache" / "canary-bench" / name
    if not (d / "config.json").exists():
        subprocess.run([sys.executable, str(BENCH / "random_model.py"), name, "--out", str(d)], check=True)
    return d


def ours_once(model, data: bytes, tokens: int) -> dict:
    """One request's stages (seconds), each evaluated before the next starts."""
    t = {}
    t0 = time.perf_counter()
    audio = load_audio(data, model.sample_rate)
    t["upload decode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wave = pad_to_min_duration(audio, int(MIN_AUDIO_SECONDS * model.sample_rate))
    batch, lengths = pad_batch([wave])
    feats, valid = model.preprocessor(batch, lengths)
    mx.eval(feats, valid)
    t["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    enc, enc_len = model.encoder(feats.astype(model.dtype), valid)
    if model.config.enc_dec_proj:
        enc = model.encoder_decoder_proj(enc)
    mx.eval(enc, enc_len)
    t["encoder"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    spec = PromptSpec("en", "en")
    prompt = model.prompt_ids(spec)
    n = int(enc_len[0].item())
    bd = BatchDecoder(model)
    seq = Sequence(enc[0, :n], n, prompt, tokens)
    bd.add([seq])
    t["prompt + prefill"] = time.perf_counter() - t0

    steps = []
    while len(bd):
        t0 = time.perf_counter()
        bd.step()
        steps.append(time.perf_counter() - t0)
    t["decoder steps"] = sum(steps)
    t["step median"] = statistics.median(steps)
    t["steps"] = len(steps)

    t0 = time.perf_counter()
    res = model.result(seq.tokens, spec, audio.shape[0], seq.finished, seq.logprobs)
    json.dumps({"text": res.text, "tokens": res.tokens})
    t["result + response"] = time.perf_counter() - t0
    t["total"] = sum(t[s] for s in STAGES)
    t["tokens"] = len(seq.tokens)
    return t


class Nemo:
    """bench/nemo_stages.py as a subprocess holding its model: one request per `run()`."""

    def __init__(self, name: str, tokenizers: Path, seconds: float, threads: int = 2) -> None:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        cmd = [str(NEMO_PY), str(BENCH / "nemo_stages.py"), "--model", name, "--tokenizers", str(tokenizers),
               "--seconds", str(seconds), "--threads", str(threads)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        while self.proc.stdout.readline().strip() != "ready":
            if self.proc.poll() is not None:
                raise RuntimeError("NeMo's stage bench exited")

    def run(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="180m-flash", choices=("180m-flash", "1b-flash", "tiny"))
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model-dir", type=Path, help="default: ~/.cache/canary-bench/MODEL (written if missing)")
    ap.add_argument("--no-nemo", action="store_true")
    ap.add_argument("--nemo-threads", type=int, default=2, help="torch threads of NeMo's process")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--decoder-bits", type=int, choices=(0, 8), default=0,
                    help="ours with the decoder quantized to 8 bits at load (model.load's decoder_bits)")  # fmt: skip
    args = ap.parse_args()
    directory = model_dir(args.model, args.model_dir)
    model = load(directory, decoder_bits=args.decoder_bits)
    data = wav_bytes(speech_like(args.seconds, seed=int(args.seconds)))
    tokens = round(TOKENS_PER_SECOND * args.seconds)
    ours_once(model, data, tokens)  # warm-up
    nemo_side = None if args.no_nemo else Nemo(args.model, directory, args.seconds, args.nemo_threads)
    ours, nemo = [], []
    for _ in range(args.repeats):  # alternate, so that a change of the machine's load hits both sides
        ours.append(ours_once(model, data, tokens))
        if nemo_side:
            nemo.append(nemo_side.run())
    if nemo_side:
        nemo_side.close()
    o = medians(ours)
    n = medians(nemo) if nemo else None
    weights = "float32" + (f", ours with an {args.decoder_bits}-bit decoder" if args.decoder_bits else "")
    print(f"{args.model} dims, {args.seconds:g} s clip, {tokens} tokens forced, {weights}, median of {args.repeats}, "
          f"NeMo with {args.nemo_threads} torch threads")  # fmt: skip
    print("| stage | ours (ms) | NeMo (ms) | NeMo / ours |\n|---|---:|---:|---:|")
    for s in (*STAGES, "total"):
        nv = f"{n[s] * 1e3:.0f} | {n[s] / o[s]:.2f}x" if n else "- | -"
        print(f"| {s} | {o[s] * 1e3:.0f} | {nv} |")
    nv = f"{n['step median'] * 1e3:.1f} | {n['step median'] / o['step median']:.2f}x" if n else "- | -"
    print(f"| one decoder step (median) | {o['step median'] * 1e3:.1f} | {nv} |")
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "nemo": nemo}, indent=2))


if __name__ == "__main__":
    main()
