# isort: skip_file
"""Language detection (language=auto): accuracy per language and the latency it adds.

The detector is the model's own language-ID slot (`Canary.language_log_probs`: the next-token distribution at the
prompt's source-language slot, one batched decoder pass over the encoder output the request computes anyway).

* Accuracy on the espeak-trained multilingual model in ../shared/models (NOT a real Canary: tiny, en/de/es/fr,
  trained with NeMo on espeak-ng speech): its 12 shipped clips (against NeMo's lid.json), and its held-out set
  regenerated with the training recipe (../shared/models/training-multi/make_data_multi.py, the first 50 test
  utterances per language as in its README; needs espeak-ng 1.51 and `pip install num2words`). `--nemo PYTHON`
  also runs NeMo's own slot on that audio (in NeMo's venv) for per-utterance agreement.
* Latency: the 12 clips through the pipeline one at a time, language named vs language=auto (the real cost a
  request sees); and the slot pass alone next to the encoder on random-weight models with the dimensions of
  canary-180m-flash / canary-1b-flash (bench/random_model.py), where the encoder dominates.

    .venv/bin/python bench/language_id.py [--nemo ../nemo-venv/bin/python] [--repeats 5] [--skip-heldout]

Prints Markdown tables. Timings on a shared machine are noisy: medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
MULTI = SHARED / "espeak-tiny-multi.nemo"
CLIPS = SHARED / "espeak-tiny-multi-clips"
RECIPE = SHARED / "training-multi"
LANGS = ["en", "de", "es", "fr"]
CACHE = Path.home() / ".cache" / "canary-bench"

import canary_server  # noqa: E402, I001  (first: preloads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import soundfile as sf  # noqa: E402
from canary_server import model  # noqa: E402
from canary_server.convert import convert_nemo  # noqa: E402
from canary_server.model.audio import pad_batch  # noqa: E402


def heldout(n_per_lang: int = 50) -> list[dict]:
    """The recipe's held-out utterances (same texts, voices, speeds and pitches: its seeded RNGs)."""
    sys.path.insert(0, str(RECIPE))
    import make_data_multi as recipe  # noqa: PLC0415

    seen = set()
    for li, lang in enumerate(recipe.LANGS):  # the training texts, only to exclude them as the recipe does
        rng = random.Random(1234 + li)
        for _ in range(4000):
            seen.add(recipe.random_sentence(rng, lang)[0])
    items = []
    for li, lang in enumerate(recipe.LANGS):
        rng, k = random.Random(98765 + li), 0
        while k < 60:
            text, de = recipe.random_sentence(rng, lang)
            if text not in seen:
                items.append((lang, text, de))
                seen.add(text)
                k += 1
    test = recipe.make_split(items, random.Random(2), 2)
    return [x for lang in LANGS for x in [t for t in test if t["lang"] == lang][:n_per_lang]]


def slot_probs(m, waves: list[np.ndarray], batch: int = 8) -> np.ndarray:
    """Probabilities over the four languages (renormalised), as lid.json's probs_renormalized_over_4."""
    out = []
    for i in range(0, len(waves), batch):
        audio, lengths = pad_batch(waves[i : i + batch])
        enc, enc_lens = m.encode(audio, lengths)
        lp = m.language_log_probs(enc, enc_lens)
        out.append(np.array(mx.softmax(lp, axis=-1)))
    return np.concatenate(out)


NEMO_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[3])
from train_multi import lid_probs
from nemo.collections.asr.models import EncDecMultiTaskModel
torch.set_num_threads(2)
m = EncDecMultiTaskModel.restore_from(sys.argv[1], map_location="cpu"); m.eval()
d = np.load(sys.argv[2]); audios = [d[k] for k in sorted(d.files, key=int)]
with torch.no_grad():
    p4, _ = lid_probs(m, audios, bs=8)
np.save(sys.argv[2] + ".nemo.npy", np.array(p4))
"""


def nemo_probs(python: str, waves: list[np.ndarray]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "audio.npz"
        np.savez(npz, **{str(i): w for i, w in enumerate(waves)})
        subprocess.run([python, "-c", NEMO_SCRIPT, str(MULTI), str(npz), str(RECIPE)], check=True)
        return np.load(str(npz) + ".nemo.npy")


def accuracy_rows(name: str, langs: list[str], probs: np.ndarray, nemo: np.ndarray | None) -> list[str]:
    rows = []
    pred = [LANGS[i] for i in probs.argmax(1)]
    for lang in LANGS:
        idx = [i for i, x in enumerate(langs) if x == lang]
        right = sum(pred[i] == lang for i in idx)
        conf = "/".join(str(sum(pred[i] == c for i in idx)) for c in LANGS)
        low = min(probs[i, LANGS.index(lang)] for i in idx)
        agree = ""
        if nemo is not None:
            same = sum(LANGS[int(nemo[i].argmax())] == pred[i] for i in idx)
            agree = f" | {same}/{len(idx)} | {np.abs(probs[idx] - nemo[idx]).max():.1e}"
        rows.append(
            f"| {name} | {lang} | {right}/{len(idx)} ({100 * right / len(idx):.0f}%) | {conf} | {low:.3f}{agree} |"
        )
    return rows


def pipeline_latency(multi_dir: Path, repeats: int) -> list[str]:
    """Each clip as one request with its language named, then with language=auto, alternating (pairs)."""
    names = sorted(p.name for p in CLIPS.glob("*.wav"))
    waves = [sf.read(CLIPS / n, dtype="float32")[0] for n in names]
    named, auto = [], []
    with canary_server.load(multi_dir, dtype="float32") as m:
        for w, n in zip(waves, names, strict=True):  # warm-up
            m.transcribe(w, source_lang=n[:2])
            m.transcribe(w, source_lang="auto")
        for _ in range(repeats):
            for w, n in zip(waves, names, strict=True):
                for lang, into in ((n[:2], named), ("auto", auto)):
                    t = time.perf_counter()
                    m.transcribe(w, source_lang=lang)
                    into.append((time.perf_counter() - t) * 1e3)
    return [
        f"| espeak-tiny-multi: 12 clips (1.2-4.0 s) x {repeats}, one request at a time | {min(named):.1f} / "
        f"{statistics.median(named):.1f} | {min(auto):.1f} / {statistics.median(auto):.1f} | "
        f"{statistics.median(b - a for a, b in zip(named, auto, strict=True)):+.1f} |"
    ]


def paired(fa, fb, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times (ms) of fa() and fb() evaluated, alternating, after one warm-up each."""
    mx.eval(fa())
    mx.eval(fb())
    ta, tb = [], []
    for _ in range(repeats):
        for fn, into in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            mx.eval(fn())
            into.append((time.perf_counter() - t) * 1e3)
    return ta, tb


def component_rows(repeats: int, dims: tuple[str, ...], cache: Path) -> list[str]:
    rows = []
    for name in dims:
        path = cache / name
        subprocess.run([sys.executable, str(REPO / "bench" / "random_model.py"), name, "--out", str(path)], check=True,
                       capture_output=True)  # fmt: skip
        m = model.load(path, dtype="float32")
        for seconds, batch in ((3.0, 1), (5.0, 8)):
            rng = np.random.default_rng(0)
            waves = [rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1 for _ in range(batch)]
            audio, lengths = pad_batch(waves)
            enc, enc_lens = m.encode(audio, lengths)
            mx.eval(enc, enc_lens)
            t_enc, t_lid = paired(
                lambda m=m, audio=audio, lengths=lengths: m.encode(audio, lengths)[0],
                lambda m=m, enc=enc, enc_lens=enc_lens: m.language_log_probs(enc, enc_lens),
                repeats,
            )
            enc_ms = f"{min(t_enc):.1f} / {statistics.median(t_enc):.1f}"
            lid_ms = f"{min(t_lid):.1f} / {statistics.median(t_lid):.1f}"
            share = 100 * min(t_lid) / min(t_enc)
            rows.append(f"| {name} (random weights) | {batch} x {seconds:g} s | {enc_ms} | {lid_ms} | {share:.1f}% |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nemo", help="NeMo venv python: also run NeMo's slot on the same audio")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-heldout", action="store_true")
    ap.add_argument(
        "--cache-dir", type=Path, default=CACHE, help="where models are written (default: ~/.cache/canary-bench)"
    )
    ap.add_argument("--only-latency", action="store_true", help="skip the accuracy tables")
    ap.add_argument(
        "--dims", default="180m-flash,1b-flash", help="random-weight models for the slot-vs-encoder table (or tiny)"
    )
    args = ap.parse_args()
    dims = tuple(args.dims.split(","))
    multi_dir = convert_nemo(MULTI, args.cache_dir / "espeak-tiny-multi", overwrite=True)
    m = model.load(multi_dir, dtype="float32")
    print(f"machine: {platform.machine()} {platform.system()}, MLX {mx.__version__} ({mx.default_device()})\n")

    if args.only_latency:
        return latency(multi_dir, args.repeats, dims, args.cache_dir)
    lid = json.loads((CLIPS / "lid.json").read_text())["clips"]
    names = sorted(lid)
    waves = [sf.read(CLIPS / n, dtype="float32")[0] for n in names]
    probs = slot_probs(m, waves)
    nemo = np.array([[lid[n]["probs_renormalized_over_4"][lang] for lang in LANGS] for n in names])
    rows = accuracy_rows("12 shipped clips", [n[:2] for n in names], probs, nemo)
    if not args.skip_heldout:
        t = time.perf_counter()
        data = heldout()
        same_as_shipped = np.array_equal(data[0]["audio"], sf.read(CLIPS / "en_00.wav", dtype="int16")[0])
        print(f"held-out set regenerated in {time.perf_counter() - t:.0f} s; en_00.wav identical: {same_as_shipped}")
        hw = [x["audio"].astype(np.float32) / 32767.0 for x in data]  # as the recipe's evaluation reads them
        hp = slot_probs(m, hw)
        hn = nemo_probs(args.nemo, hw) if args.nemo else None
        rows += accuracy_rows("held-out (recipe, 50/lang)", [x["lang"] for x in data], hp, hn)
    head = "| set | language | accuracy | predicted en/de/es/fr | lowest p(true) |"
    sep = "|---|---|---|---|---|"
    head += " same argmax as NeMo | max abs diff of p vs NeMo |"
    sep += "---|---|"
    print("\n".join(["\n### Accuracy (espeak-tiny-multi, the slot of the prompt)\n", head, sep, *[
        r if r.count("|") == head.count("|") else r[:-1] + " | – | – |" for r in rows]]))  # fmt: skip

    latency(multi_dir, args.repeats, dims, args.cache_dir)


def latency(multi_dir: Path, repeats: int, dims: tuple[str, ...], cache: Path) -> None:
    print("\n### Latency of a request: language named vs language=auto (ms per request, min / median)\n")
    print("| model, requests | language named | language=auto | median of the pairs' differences |")
    print("|---|---|---|---|")
    print("\n".join(pipeline_latency(multi_dir, repeats)))
    print("\n### The slot pass next to the encoder it reuses (ms, min / median, float32)\n")
    print("| model | batch | encoder | slot pass | slot / encoder (min) |\n|---|---|---|---|---|")
    print("\n".join(component_rows(repeats, dims, cache)))


if __name__ == "__main__":
    main()
