# isort: skip_file
"""What each compute dtype costs in exactness: token agreement with NeMo and WER, per dtype.

Variants (`--variants`, comma-separated; default: all): `float32`, `float16`, `bfloat16` (weights and activations
in that dtype; features are float32 always), `q8` / `q4` (`convert --quantize 8|4`, group size `--group-size`,
computing in float32) and `q8-float16` / `q4-float16` (the same weights computing in float16), and the
mixed-precision experiment `float16+head32` / `bfloat16+head32` (hidden states cast to float32 before a float32 output
head: what decides the tokens; log-softmax and attention softmax are float32 in every variant already).

Measured on
* every NeMo fixture under tests/fixtures (any depth) whose golden.json this script understands: a `transcribe` list
  of cases, each with its audio (`audio` indices into a golden.npz, or `clips` by path), NeMo's tokens per item
  (`tokens` or `items[*].tokens`), its kwargs and beam size, and the model (`model.nemo` beside it, or `model` /
  `source` naming one). Folders it cannot use are listed with the reason, and so are the cases where the port
  differs from NeMo on purpose (tests/test_release_fixtures.py: NeMo's batched beam search, its beam(1) strategy
  after a first <|endoftext|>). Each case is run with `Canary.generate` (NeMo's transcribe() batches) and compared
  item by item with NeMo's tokens;
* the clips of the espeak-trained test models in ../shared/models (tiny Canary-architecture models trained with NeMo
  on espeak-ng speech, NOT real Canary checkpoints): WER against the reference transcripts, and exact matches with
  NeMo's own transcripts.

Prints Markdown tables to paste (machine, MLX version and device in the header); `--json` keeps every number.
fp16/bf16 matmuls are slow on Linux CPUs: run it under `nice` there.

    nice .venv/bin/python bench/dtype_eval.py [--variants float32,float16,bfloat16] [--json dtype.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

from canary_server import model  # first: preloads OpenBLAS before MLX
import mlx.core as mx
from canary_server.convert import convert_nemo
from canary_server.model import backend
from machine_info import describe
from quantize_eval import quantized_share
from wer import word_errors

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared" / "models"
ESPEAK_SETS = {"espeak-en": "espeak-tiny-en", "espeak-multi": "espeak-tiny-multi"}
# Fixture folders whose golden.npz holds no audio take it from the folder their generator read (tests/fixtures/README)
AUDIO_FROM = {"v2_ctc": "v2_unified", "timestamps": "flash_agg"}
VARIANTS = {  # name: (dtype, quantization bits, float32 head)
    "float32": ("float32", None, False),
    "float16": ("float16", None, False),
    "bfloat16": ("bfloat16", None, False),
    "float16+head32": ("float16", None, True),
    "bfloat16+head32": ("bfloat16", None, True),
    "q8": ("float32", 8, False),
    "q4": ("float32", 4, False),
    "q8-float16": ("float16", 8, False),
    "q4-float16": ("float16", 4, False),
}


@dataclass
class Case:
    name: str
    audio: list  # float32 arrays or paths
    kwargs: dict  # Canary.generate keyword arguments
    tokens: list[list[int]]  # NeMo's, per item
    head_bias: tuple[int, int, float] | None = None  # (first id, last id, added): a fixture's head bias change


@dataclass
class Suite:
    name: str
    nemo: Path
    cases: list[Case] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # cases where the port differs from NeMo on purpose


# ---- reading the fixtures --------------------------------------------------------------------------------------
def read_suite(golden_path: Path) -> Suite:
    """A fixture folder as a Suite; raises ValueError saying why it cannot be used."""
    folder = golden_path.parent
    g = json.loads(golden_path.read_text())
    if not isinstance(g.get("transcribe"), list) or not g["transcribe"]:
        raise ValueError("no `transcribe` cases")
    nemo = _model_path(folder, g)
    suite = Suite(str(folder.relative_to(FIXTURES)), nemo)
    arrays = _arrays(folder, nemo)
    for c in g["transcribe"]:
        reason = _deliberate_difference(c)
        if reason:
            suite.left_out.append(f"{suite.name}/{c['name']}: {reason}")
        else:
            suite.cases.append(_case(c, g, folder, nemo, arrays))
    return suite


def _deliberate_difference(c: dict) -> str | None:
    """Cases the parity tests document as NeMo behaviour the port does not copy (tests/test_release_fixtures.py)."""
    beam = (c.get("effective_decoding") or {}).get("beam_size") or 1
    if beam > 1 and c.get("batch_size", 1) > 1:
        return "NeMo 3.0.0's batched beam search mixes the items' prompt states"
    if beam == 1 and any(str(it.get("text", "")).startswith("<|endoftext|>") for it in c.get("items", [])):
        return "NeMo's beam(1) strategy goes on after a first <|endoftext|>; greedy decoding ends there"
    return None


def _model_path(folder: Path, g: dict) -> Path:
    candidates = [folder / "model.nemo"]
    for key in ("model", "source"):
        if isinstance(g.get(key), str):
            ref = g[key].split(" ")[0]
            candidates += [folder / ref, FIXTURES / ref, SHARED / Path(ref).name]
    for path in candidates:
        if path.is_file() and path.suffix == ".nemo":
            return path.resolve()
    raise ValueError("no model.nemo found")


def _arrays(folder: Path, nemo: Path) -> dict:
    for f in (folder, FIXTURES / AUDIO_FROM.get(folder.name, folder.name), nemo.parent):
        if (f / "golden.npz").is_file():
            npz = np.load(f / "golden.npz")
            if "audio_0" in npz:
                return {k: npz[k] for k in npz.files if k.startswith("audio_")}
    return {}


def _case(c: dict, g: dict, folder: Path, nemo: Path, arrays: dict) -> Case:
    kw = c.get("kwargs", {})
    if "audio" in c:
        audio = [arrays[f"audio_{i}"] for i in c["audio"]]
    elif "clips" in c:
        dirs = [folder, SHARED / f"{nemo.stem}-clips"]
        audio = [str(next(d / n for d in dirs if (d / n).is_file())) for n in c["clips"]]
    else:
        raise ValueError(f"case {c.get('name')}: no audio")
    tokens = c["tokens"] if "tokens" in c else [it["tokens"] for it in c["items"]]
    beam = c.get("beam_size") or (c.get("effective_decoding") or {}).get("beam_size") or 1
    kwargs = {
        "source_lang": kw.get("source_lang", "en"),
        "target_lang": kw.get("target_lang", kw.get("source_lang", "en")),
        "pnc": str(kw.get("pnc", "yes")).lower() in ("yes", "true", "1"),
        "context": kw.get("decodercontext") or None,
        "timestamps": bool(kw.get("timestamps", "timestamp_bias" in c)),
        "batch_size": c.get("batch_size", 1),
        "beam_size": beam,
    }
    return Case(c["name"], audio, kwargs, tokens, _head_bias(c, g))


def _head_bias(c: dict, g: dict) -> tuple[int, int, float] | None:
    if c.get("timestamp_bias") is not None:  # tests/fixtures/timestamps
        lo, hi = g["timestamp_token_ids"]
        return lo, hi, float(c["timestamp_bias"])
    delta = c.get("head_bias_delta") or g.get("head_bias_delta")
    if isinstance(delta, dict):
        lo, hi = delta["ids"]
        return lo, hi, float(delta["delta"])
    return None


def find_suites() -> tuple[list[Suite], list[str]]:
    suites, skipped = [], []
    for path in sorted(FIXTURES.rglob("golden.json")):
        if path.parent == SALM:  # canary-qwen: its own table (measure_salm)
            continue
        try:
            suites.append(read_suite(path))
        except (ValueError, KeyError, TypeError, StopIteration, OSError) as exc:
            skipped.append(f"{path.parent.relative_to(FIXTURES)}: {type(exc).__name__}: {exc}")
    return suites, skipped


# ---- canary-qwen-2.5b (NeMo SALM) --------------------------------------------------------------------------------
SALM = FIXTURES / "salm"


def measure_salm(root: Path, variant: str, group_size: int) -> dict | None:
    """tests/fixtures/salm: NeMo's generate() tokens (40 each), one clip at a time; None where it does not apply
    (the float32-head experiment is the Canary head's) or the fixture or clips are missing."""
    from canary_server.convert.salm import convert_salm

    dtype, bits, head32 = VARIANTS[variant]
    clips = SHARED / "espeak-tiny-en-clips"
    if head32 or not (SALM / "golden.json").is_file() or not clips.is_dir():
        return None
    out = root / f"salm-{bits or 'full'}"
    if not out.is_dir():
        convert_salm(SALM / "hub", out, quantize=bits, group_size=group_size)
    m = model.load(out, dtype=dtype)
    g = json.loads((SALM / "golden.json").read_text())
    eos, same, prefixes = g["meta"]["eos_id"], 0, []
    for row in g["single"]:
        got = m.generate(str(clips / row["clip"]), context=row["context"], max_new_tokens=g["meta"]["max_new_tokens"])
        want = row["generated"][: row["generated"].index(eos)] if eos in row["generated"] else row["generated"]
        same += got.tokens == want
        prefixes.append(common_prefix(got.tokens, want))
    return {"items": [same, len(g["single"])], "prefixes": prefixes}


def salm_table(res: dict) -> list[str]:
    rows = [(v, r["salm"]) for v, r in res["variants"].items() if r.get("salm")]
    lines = ["| variant | items = NeMo | NeMo tokens before the first difference (per item) |", "|---|---|---|"]
    return lines + [f"| {v} | {frac(r['items'])} | {', '.join(map(str, r['prefixes']))} |" for v, r in rows]


# ---- models ----------------------------------------------------------------------------------------------------
class Models:
    """Converts each .nemo once per quantization and loads it per variant."""

    def __init__(self, root: Path, group_size: int) -> None:
        self.root, self.group_size, self.dirs = root, group_size, {}

    def directory(self, nemo: Path, bits: int | None) -> Path:
        key = (nemo, bits)
        if key not in self.dirs:
            out = self.root / f"{len(self.dirs)}-{nemo.stem}-{bits or 'full'}"
            self.dirs[key] = convert_nemo(nemo, out, quantize=bits, group_size=self.group_size)
        return self.dirs[key]

    def load(self, nemo: Path, variant: str) -> model.Canary:
        dtype, bits, head32 = VARIANTS[variant]
        directory = self.directory(nemo, bits)
        m = model.load(directory, dtype=dtype)
        if head32:
            _float32_head(m, directory)
        return m


def _float32_head(m: model.Canary, directory: Path) -> None:
    """The experiment: logits from float32 hidden states and a float32 copy of the (tied) output head."""
    weight = mx.load(str(directory / "model.safetensors"))["decoder.embedding.token_embedding.weight"]
    head_t = mx.contiguous(weight.astype(mx.float32).T)
    mx.eval(head_t)
    m.logits = lambda hidden: hidden.astype(mx.float32) @ head_t + m.head.bias


# ---- measuring -------------------------------------------------------------------------------------------------
def run_case(m: model.Canary, case: Case) -> list[list[int]]:
    old = m.head.bias
    if case.head_bias is not None:
        lo, hi, add = case.head_bias
        b = np.array(old.astype(mx.float32))
        b[lo : hi + 1] += np.float32(add)
        m.head.bias = mx.array(b).astype(old.dtype)
    try:
        results = m.generate(list(case.audio), **case.kwargs)
    finally:
        m.head.bias = old
    return [r.tokens for r in results]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure_suite(models: Models, suite: Suite, variant: str) -> dict:
    m = models.load(suite.nemo, variant)
    out = {"greedy": [0, 0], "beam": [0, 0], "prefix": [0, 0], "diffs": []}
    for case in suite.cases:
        got = run_case(m, case)
        kind = "beam" if case.kwargs["beam_size"] > 1 else "greedy"
        for i, (ours, nemo) in enumerate(zip(got, case.tokens, strict=True)):
            out[kind][0] += ours == nemo
            out[kind][1] += 1
            out["prefix"][0] += min(common_prefix(ours, nemo), len(nemo))
            out["prefix"][1] += len(nemo)
            if ours != nemo:
                out["diffs"].append(f"{case.name}[{i}]")
    out["fell_back"] = getattr(m, "fell_back_to_float32", False)
    out["quantized_share"] = quantized_share(m)
    return out


def measure_espeak(models: Models, stem: str, variant: str) -> dict | None:
    """WER against the references and exact matches with NeMo's transcripts on a shared espeak model's clips (NeMo's
    own calls: batch_size 4, one call per language)."""
    nemo, clips = SHARED / f"{stem}.nemo", SHARED / f"{stem}-clips"
    if not nemo.is_file():
        return None
    refs = json.loads((clips / "transcripts.json").read_text())
    nemo_text = {k: v.strip() for k, v in json.loads((clips / "nemo_transcripts.json").read_text()).items()}
    meta_path = clips / "clips_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    by_lang: dict[str, list[str]] = {}
    for name in sorted(refs):
        by_lang.setdefault(meta.get(name, {}).get("lang", "en"), []).append(name)
    m = models.load(nemo, variant)
    hyps = {}
    for lang, names in by_lang.items():
        results = m.generate([str(clips / n) for n in names], source_lang=lang, target_lang=lang, batch_size=4)
        hyps.update({n: r.text for n, r in zip(names, results, strict=True)})
    errors = sum(word_errors(refs[n], hyps[n]) for n in refs)
    words = sum(len(refs[n].split()) for n in refs)
    return {
        "errors": errors,
        "words": words,
        "wer": errors / words,
        "nemo_errors": sum(word_errors(refs[n], nemo_text[n]) for n in refs),
        "same_as_nemo": sum(hyps[n] == nemo_text[n] for n in refs),
        "clips": len(refs),
        "diffs": {n: [nemo_text[n], hyps[n]] for n in refs if hyps[n] != nemo_text[n]},
        "fell_back": getattr(m, "fell_back_to_float32", False),
    }


# ---- report ----------------------------------------------------------------------------------------------------
def machine() -> str:
    return f"{describe()}, {backend.paths()} paths"


def frac(pair: list[int]) -> str:
    return f"{pair[0]}/{pair[1]}" if pair[1] else "-"


def summary_table(res: dict) -> list[str]:
    espeak = [k for k in ESPEAK_SETS if any(res["variants"][v].get(k) for v in res["variants"])]
    head = "| variant | greedy items = NeMo | beam items = NeMo | NeMo tokens before the first difference |"
    sep = "|---|---:|---:|---:|"
    for k in espeak:
        head += f" {k}: WER vs refs (NeMo's) | {k}: text = NeMo |"
        sep += "---:|---:|"
    lines = [head, sep]
    for name, v in res["variants"].items():
        total = {"greedy": [0, 0], "beam": [0, 0], "prefix": [0, 0]}
        for s in v["suites"].values():
            for key in total:
                total[key] = [total[key][0] + s[key][0], total[key][1] + s[key][1]]
        pct = 100 * total["prefix"][0] / total["prefix"][1] if total["prefix"][1] else float("nan")
        row = f"| {name} | {frac(total['greedy'])} | {frac(total['beam'])} | {pct:.1f}% |"
        for k in espeak:
            e = v.get(k)
            if e:
                nemo_wer = 100 * e["nemo_errors"] / e["words"]
                row += f" {100 * e['wer']:.1f}% ({nemo_wer:.1f}%) | {e['same_as_nemo']}/{e['clips']} |"
            else:
                row += " - | - |"
        if any(s["fell_back"] for s in v["suites"].values()) or any((v.get(k) or {}).get("fell_back") for k in espeak):
            row += " (float32 fallback ran)"
        lines.append(row)
    return lines


def suite_table(res: dict) -> list[str]:
    names = list(res["variants"])
    lines = ["| fixture | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for suite in res["suites"]:
        cells = []
        for n in names:
            s = res["variants"][n]["suites"][suite]
            cells.append(frac([s["greedy"][0] + s["beam"][0], s["greedy"][1] + s["beam"][1]]))
        lines.append(f"| {suite} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--group-size", type=int, default=32, help="quantization group size (32 quantizes the most)")
    ap.add_argument(
        "--only",
        help="comma-separated fixture folders (relative to tests/fixtures; `salm`: canary-qwen's) and espeak sets "
        f"({', '.join(ESPEAK_SETS)}) to run; default: all",
    )
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    suites, skipped = find_suites()
    if args.only:
        keep = set(args.only.split(","))
        suites = [s for s in suites if s.name in keep]
    skipped += [line for s in suites for line in s.left_out]
    res = {"date": date.today().isoformat(), "machine": machine(), "group_size": args.group_size, "skipped": skipped}
    res["suites"] = [s.name for s in suites]
    res["variants"] = {}
    started, failed = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        models = Models(Path(tmp), args.group_size)
        for v in variants:
            res["variants"][v] = {"suites": {}}
            for s in suites:
                if s.name in failed:
                    continue
                try:
                    r = measure_suite(models, s, v)
                except Exception as exc:  # noqa: BLE001 - a fixture this branch cannot convert or run is reported
                    failed[s.name] = f"{s.name}: {type(exc).__name__}: {exc}"
                    continue
                res["variants"][v]["suites"][s.name] = r
                print(f"{v} {s.name}: {frac(r['greedy'])} greedy, {frac(r['beam'])} beam", file=sys.stderr, flush=True)
            for key, stem in ESPEAK_SETS.items():
                if not args.only or key in args.only.split(","):
                    res["variants"][v][key] = measure_espeak(models, stem, v)
            if not args.only or "salm" in args.only.split(","):
                res["variants"][v]["salm"] = measure_salm(Path(tmp), v, args.group_size)
    res["seconds"] = time.perf_counter() - started
    res["failed"] = list(failed.values())
    res["suites"] = [n for n in res["suites"] if n not in failed]
    for v in res["variants"].values():  # a suite counts only where every variant ran it
        v["suites"] = {n: r for n, r in v["suites"].items() if n not in failed}
    print(f"**Compute dtype vs NeMo 3.0.0** — {res['machine']}, {res['date']}\n")
    print("\n".join(summary_table(res)))
    print("\nItems identical to NeMo per fixture (greedy + beam):\n")
    print("\n".join(suite_table(res)))
    if any(r.get("salm") for r in res["variants"].values()):
        print("\ncanary-qwen (SALM) fixture, `generate()` one clip at a time (tests/fixtures/salm):\n")
        print("\n".join(salm_table(res)))
    quantized = [v for v in variants if VARIANTS[v][1]]
    if quantized and res["variants"][quantized[0]]["suites"]:
        shares = [s["quantized_share"] for s in res["variants"][quantized[0]]["suites"].values()]
        print(f"\nQuantized: affine, group size {args.group_size}; share of the linear weights quantized: "
              f"{100 * min(shares):.0f}% to {100 * max(shares):.0f}% (by model)")  # fmt: skip
    for line in skipped + res["failed"]:
        print(f"\nnot used: {line}")
    print(f"\n({res['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
