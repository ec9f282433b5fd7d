"""What keywords (NeMo's phrase boosting) are worth on the espeak model, and what they cost.

Held-out sentences of the espeak model's own recipe (../shared/models/training/make_data.py: its 200 test sentences,
never trained on, synthesised with espeak-ng), transcribed through the pipeline (`canary_server.load`) without
keywords (greedy, the model's default) and with them at several `boosting_tree_alpha` values (beam 1, NeMo's greedy
with boosting). The keywords are the words the model gets wrong most often on these clips (what a user lists: the
names it misses). Columns: recall of the keywords' occurrences, WER on the clips that contain a keyword, WER on the
clips that do not (must not get worse), keywords inserted where the reference has none, and the time per request.
Then the cost: building a tree (10 / 100 / 1000 phrases) and a decoder step with and without boosting.

The espeak model is a tiny test model trained on synthetic speech, NOT a real Canary: the numbers say what the
mechanism does, not what it does for canary-1b-flash. Needs espeak-ng. Timings are wall time on a shared machine.

    .venv/bin/python bench/keywords.py [--clips 120] [--keywords 8] [--alphas 0.5,1,2,3]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
sys.path.insert(0, str(REPO / "bench"))
from wer import word_errors  # noqa: E402


def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", SHARED / "training" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def held_out(n: int) -> tuple[list[str], list[np.ndarray]]:
    """The recipe's first `n` test sentences (seeded exactly as make_data.py draws them), synthesised."""
    md = _make_data()
    rng, train_rng = random.Random(98765), random.Random(1234)  # as make_data.main draws them
    train = {md.random_sentence(train_rng) for _ in range(7000)}
    texts: list[str] = []
    while len(texts) < n:
        s = md.random_sentence(rng)
        if s not in train and s not in texts:
            texts.append(s)
    items = md.make_split(texts, random.Random(2), 2)
    audios = [it["audio"].astype(np.float32) / (32768.0 if it["audio"].dtype == np.int16 else 1.0) for it in items]
    return texts, audios


def missed_words(refs: list[str], hyps: list[str], k: int) -> list[str]:
    """The k reference words most often absent from their clip's transcript, among those missed at least half the
    time (the words a user would list: the ones the model gets wrong, not common words it sometimes drops)."""
    miss: collections.Counter[str] = collections.Counter()
    seen: collections.Counter[str] = collections.Counter()
    for ref, hyp in zip(refs, hyps, strict=True):
        have = collections.Counter(hyp.split())
        for w, c in collections.Counter(ref.split()).items():
            miss[w] += max(0, c - have[w])
            seen[w] += c
    return [w for w, n in miss.most_common() if n >= 2 and n * 2 >= seen[w]][:k]


def scores(refs: list[str], hyps: list[str], keywords: list[str]) -> dict[str, float]:
    kw = set(keywords)
    hit = total = inserted = 0
    err = {True: 0, False: 0}
    words = {True: 0, False: 0}
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = collections.Counter(ref.split()), collections.Counter(hyp.split())
        has = any(w in kw for w in r)
        err[has] += word_errors(ref, hyp)
        words[has] += len(ref.split())
        for w in kw:
            total += r[w]
            hit += min(r[w], h[w])
            inserted += max(0, h[w] - r[w])
    return {
        "recall": hit / max(total, 1),
        "wer_with": err[True] / max(words[True], 1),
        "wer_without": err[False] / max(words[False], 1),
        "inserted": inserted,
        "n_with": sum(1 for ref in refs if any(w in kw for w in ref.split())),
    }


def transcribe(m, audios, keywords) -> tuple[list[str], float]:
    t = time.perf_counter()
    out = m.transcribe(audios, source_lang="en", batch_size=8, keywords=keywords)
    return [r.text.lower().strip(" .?!,") for r in out], time.perf_counter() - t


def tree_build_ms(model, words: list[str]) -> list[tuple[int, float]]:
    from canary_server.model.boosting import build_tree

    rng, rows = random.Random(7), []
    for n in (10, 100, 1000):
        phrases = [" ".join(rng.sample(words, rng.randint(1, 3))) for _ in range(n)]
        t = time.perf_counter()
        tree = build_tree(model.tokenizer, phrases, "en", model.config.decoder.vocab_size)
        rows.append((n, (time.perf_counter() - t) * 1000, tree.num_states, tree.labels.shape[1]))
    return rows


def step_ms(model, audios, keywords: list[str], repeats: int = 3) -> list[tuple[str, float]]:
    """Decoder time per step for 8 clips decoded together (encoder excluded): NeMo's greedy, its beam(1) strategy
    without fusion, and beam 1 with the keywords' tree (what a greedy request with keywords runs)."""
    import mlx.core as mx

    from canary_server.model.audio import pad_batch
    from canary_server.model.decoding import beam_decode, greedy_decode
    from canary_server.model.prompt import PromptSpec

    audio, lengths = pad_batch(audios[:8])
    enc, enc_len = model.encode(audio, lengths)
    mx.eval(enc, enc_len)
    prompt = model.prompt_ids(PromptSpec("en", "en"))
    tok = model.tokenizer
    tree = model.keyword_tree(keywords, "en")
    runs = {
        "greedy": lambda: greedy_decode(model, enc, enc_len, mx.array([prompt] * enc.shape[0]), tok.eos_id, tok.pad_id),
        "beam 1, no keywords": lambda: beam_decode(model, enc, enc_len, prompt, 1),
        "beam 1 + keywords": lambda: beam_decode(model, enc, enc_len, prompt, 1, 0.0, tree, 1.0),
    }
    out = []
    for name, run in runs.items():
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            res = run()
            steps = max(len(r) for r in res.tokens) + 1
            best = min(best, (time.perf_counter() - t) * 1000 / steps)
        out.append((name, best))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=120)
    ap.add_argument("--keywords", type=int, default=8)
    ap.add_argument("--alphas", default="0.5,1,2,3")
    args = ap.parse_args()
    import canary_server
    from canary_server import model as cmodel
    from canary_server.convert import convert_nemo

    refs, audios = held_out(args.clips)
    with tempfile.TemporaryDirectory() as tmp:
        path = convert_nemo(SHARED / "espeak-tiny-en.nemo", Path(tmp) / "m")
        with canary_server.load(path) as m:
            transcribe(m, audios[:8], [])  # warm-up
            base, base_s = transcribe(m, audios, [])
            keywords = missed_words(refs, base, args.keywords)
            print(f"clips {len(refs)}; keywords (most missed words without them): {', '.join(keywords)}\n")
            print("| alpha | keyword recall | WER, clips with keywords | WER, other clips | keywords inserted | s |")
            print("|---|---|---|---|---|---|")
            s = scores(refs, base, keywords)
            print(
                f"| none | {s['recall']:.0%} | {s['wer_with']:.1%} | {s['wer_without']:.1%} | {s['inserted']} | "
                f"{base_s:.1f} |"
            )
        for alpha in [float(a) for a in args.alphas.split(",")]:
            with canary_server.load(path, boosting_tree_alpha=alpha) as m:
                transcribe(m, audios[:8], keywords)  # warm-up
                hyps, secs = transcribe(m, audios, keywords)
                s = scores(refs, hyps, keywords)
                print(
                    f"| {alpha:g} | {s['recall']:.0%} | {s['wer_with']:.1%} | {s['wer_without']:.1%} | "
                    f"{s['inserted']} | {secs:.1f} |"
                )
        print(f"\n({s['n_with']} clips contain a keyword, {len(refs) - s['n_with']} do not)\n")
        raw = cmodel.load(path)
        print("| phrases | tree build ms | states | K (labels per state) |\n|---|---|---|---|")
        for n, ms, states, k in tree_build_ms(raw, sorted({w for r in refs for w in r.split()})):
            print(f"| {n} | {ms:.1f} | {states} | {k} |")
        print("\n| decoder, 8 clips | ms per step |\n|---|---|")
        for name, ms in step_ms(raw, audios, keywords):
            print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
