"""`canary-server` command line: convert, transcribe, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys

DTYPES = ("float32", "float16", "bfloat16")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a NeMo .nemo checkpoint into an MLX model directory")
    p.add_argument("source", help="path to a .nemo file")
    p.add_argument("out_dir", help="directory to create (written atomically)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default: float32)")
    p.add_argument(
        "--quantize",
        type=int,
        choices=(8, 4),
        default=None,
        help="MLX affine quantization of the linear layers to 8 or 4 bits (default: none)",
    )
    p.add_argument(
        "--group-size", type=int, choices=(32, 64, 128), default=64, help="quantization group size (default: 64)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_run_convert)


def _add_transcribe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcribe", help="transcribe or translate audio files")
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3, m4a, mp4, webm, ...)")
    p.add_argument(
        "--model",
        required=True,
        help="converted model directory, .nemo file (converted once into the cache) or Hugging Face repo id",
    )
    p.add_argument("--language", default=None, help="source language code (default: the model's default)")
    p.add_argument("--target-language", default=None, help="output language; differs from --language = translation")
    p.add_argument("--no-pnc", action="store_true", help="no punctuation and capitalisation")
    p.add_argument("--format", choices=("json", "text"), default="text", help="json: one JSON line per input")
    p.add_argument("--batch-size", type=int, default=8, help="files decoded together (default: 8)")
    p.add_argument("--beam-size", type=int, default=None, help="beam search width (default: the model's, 1)")
    p.add_argument(
        "--timestamps",
        action="store_true",
        help="word and segment times (flash models, canary-1b-v2); with --format json adds words/segments",
    )
    p.add_argument(
        "--cache-dir", default=None, help="where converted models are kept (default: ~/.cache/canary-server)"
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: bf16 on Metal, else fp32)")
    p.set_defaults(func=_run_transcribe)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    from server.serve import add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=_run_serve)


def _run_convert(args: argparse.Namespace) -> int:
    from convert import convert_nemo

    out = convert_nemo(
        args.source,
        args.out_dir,
        dtype=args.dtype,
        overwrite=args.overwrite,
        quantize=args.quantize,
        group_size=args.group_size,
    )
    print(out)
    return 0


def _run_transcribe(args: argparse.Namespace) -> int:
    from pathlib import Path

    import model
    from convert.cache import resolve_model

    directory = resolve_model(args.model, Path(args.cache_dir) if args.cache_dir else None)
    m = model.load(directory, dtype=args.dtype or model.default_dtype())
    results = m.transcribe(
        list(args.audio),
        source_lang=args.language,
        target_lang=args.target_language,
        pnc=not args.no_pnc,
        batch_size=args.batch_size,
        beam_size=args.beam_size,
        timestamps=args.timestamps,
    )
    for path, res in zip(args.audio, results, strict=True):
        if args.format == "json":
            line = {"file": path, "text": res.text}
            if args.timestamps:
                line["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in res.words]
                line["segments"] = [{"text": s.text, "start": s.start, "end": s.end} for s in res.segments]
            print(json.dumps(line, ensure_ascii=False))
        else:
            print(res.text)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from server.serve import run_serve

    run_serve(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary-server",
        description="Local OpenAI-compatible speech transcription and translation with NVIDIA Canary on MLX.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_transcribe(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from convert.errors import ConversionError
    from model.errors import CanaryError

    try:
        return args.func(args)
    except (CanaryError, ConversionError) as exc:  # unsupported language, undecodable audio, bad .nemo, ...
        print(f"canary-server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
