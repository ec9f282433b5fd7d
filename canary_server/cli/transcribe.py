"""`canary-server transcribe`: files of any length through the same pipeline and renderers as the server."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from canary_server.cli.convert import DTYPES

FORMATS = ("text", "json", "verbose_json", "srt", "vtt")
EXTENSIONS = {"text": "txt", "json": "json", "verbose_json": "json", "srt": "srt", "vtt": "vtt"}


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "transcribe",
        parents=parents,
        help="transcribe or translate audio files (any length: cut at pauses like the server)",
        description="Transcribe or translate audio files. Long audio is cut at pauses and decoded exactly as the "
        "server does; every --format gives the server's body for that response_format.",
    )
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3, m4a, mp4, webm, ...)")
    p.add_argument(
        "--model",
        required=True,
        help="converted model directory, .nemo file (converted once into the cache) or Hugging Face repo id",
    )
    p.add_argument(
        "--language",
        default=None,
        help="source language code (default: detected from the audio on a multilingual model, never assumed)",
    )
    p.add_argument("--target-language", default=None, help="output language; differs from --language = translation")
    p.add_argument("--no-pnc", action="store_true", help="no punctuation and capitalisation")
    p.add_argument("--prompt", default=None, help="decoder context text (canary2-format models; ignored otherwise)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text: the transcript; json / verbose_json: the server's body, one JSON line per file (with 'file'); "
        "srt / vtt: subtitles (default: text)",
    )
    p.add_argument(
        "--timestamps",
        action="store_true",
        help="word and segment times from the model (flash models, canary-1b-v2): adds 'words' to verbose_json "
        "(only with --format verbose_json, as the API's timestamp_granularities[]); an error for a model without "
        "timestamps (srt/vtt always use the model's times where it has them, else cues cut at pauses)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="write <name>.<ext> per input there instead of to stdout (two inputs that would write the same file are "
        "refused; a file from an earlier run is replaced)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="files decoded together (default: 8)")
    p.add_argument("--beam-size", type=int, default=None, help="beam search width (default: the model's decoding)")
    p.add_argument(
        "--chunk-seconds",
        type=float,
        default=40.0,
        help="audio up to this long is decoded whole, longer audio cut at pauses; <= 40 (default: 40, as NeMo)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="where converted models are kept (default: ~/.cache/canary-server)"
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: float32)")
    p.add_argument(
        "--keywords", nargs="+", default=None, metavar="PHRASE", help="phrases to boost (names, jargon; quote phrases)"
    )
    p.add_argument("--keywords-file", default=None, metavar="PATH", help="phrases to boost, one a line (UTF-8)")
    p.add_argument(
        "--boosting-tree-alpha", type=float, default=None, help="keyword boost weight (default: 1.0; 0: none)"
    )
    p.set_defaults(func=run)


def _check(args: argparse.Namespace, parser_error) -> None:
    if args.timestamps and args.format != "verbose_json":
        # as the API's timestamp_granularities[] (OpenAI: a 400 with any other response_format)
        parser_error(
            f"--timestamps needs --format verbose_json (got {args.format}; srt and vtt always use the model's times)"
        )
    if args.format in ("srt", "vtt") and len(args.audio) > 1 and args.output_dir is None:
        parser_error(f"--format {args.format} with several files needs --output-dir")
    if not 0 < args.chunk_seconds <= 40:
        parser_error("--chunk-seconds must be in (0, 40]")
    if args.batch_size < 1:
        parser_error("--batch-size must be at least 1")


def run(args: argparse.Namespace) -> int:
    from canary_server.cli.progress import progress_class
    from canary_server.convert.cache import resolve_model
    from canary_server.model.errors import CanaryError
    from canary_server.pipeline import Transcriber
    from canary_server.pipeline.formats import ResponseFormat, render
    from canary_server.pipeline.keywords import read_keywords_file
    from canary_server.pipeline.options import PipelineConfig

    def parser_error(message: str) -> None:
        raise CanaryError(message)

    _check(args, parser_error)
    targets = _targets(args, parser_error)  # before the model loads: a clash is found at once
    fmt = ResponseFormat(args.format)
    alpha = {} if args.boosting_tree_alpha is None else {"boosting_tree_alpha": args.boosting_tree_alpha}
    config = PipelineConfig(chunk_seconds=args.chunk_seconds, batch_size=max(args.batch_size, 1), **alpha)
    keywords = list(args.keywords or []) + list(read_keywords_file(args.keywords_file) if args.keywords_file else [])
    # Download / convert in the foreground, with progress, before the engine thread loads the directory.
    model_dir = resolve_model(args.model, args.cache_dir, progress=progress_class(args.quiet))
    failed = 0
    with Transcriber(model_dir, dtype=args.dtype or "auto", config=config) as m:
        if args.timestamps and not m.supports_timestamps:
            parser_error(f"--timestamps: {args.model} has no word timestamps (the flash models and canary-1b-v2 do)")
        results = m.transcribe_each(
            list(args.audio),
            source_lang=args.language,
            target_lang=args.target_language,
            pnc=not args.no_pnc,
            context=args.prompt,
            batch_size=args.batch_size,
            beam_size=args.beam_size,
            keywords=keywords,
            # the server asks the model for times exactly when the response shows them
            timestamps=args.timestamps or fmt in (ResponseFormat.srt, ResponseFormat.vtt),
            progress=LongFileProgress(args.audio, progress_class(args.quiet)),
        )
        with contextlib.closing(results):
            for index, result in enumerate(results):
                path = args.audio[index]
                if isinstance(result, Exception):  # this file only: the others are still written
                    print(f"canary-server: error: {path}: {result}", file=sys.stderr)
                    failed += 1
                    continue
                if fmt is ResponseFormat.verbose_json and not args.timestamps:
                    result = _without_words(result)
                _emit(path, render(result, fmt), args, targets[index] if targets else None)
    return 1 if failed else 0


class LongFileProgress:
    """A progress bar (a log line every 10 s when stderr is not a terminal) per input decoded in several pieces,
    in seconds of audio; nothing for one-piece inputs. Called on the pipeline's loop thread."""

    def __init__(self, paths: list[str], factory) -> None:
        self.paths, self.factory, self.bars = paths, factory, {}

    def __call__(self, index: int, done: float, total: float) -> None:
        bar = self.bars.get(index)
        if bar is None:
            if done >= total:  # one piece: done as soon as it started
                return
            desc = f"transcribing {self.paths[index]}"
            bar = self.bars[index] = self.factory(total=round(total, 1), initial=round(done, 1), unit="s", desc=desc)
        else:
            bar.update(round(done - bar.n, 1))
        if done >= total:
            bar.close()


def _targets(args: argparse.Namespace, parser_error) -> list[Path] | None:
    """The file each input is written to with --output-dir: <stem>.<ext>. Two inputs that would write the same
    file (a/x.wav and b/x.wav, x.wav and x.mp3) are refused rather than one overwriting the other."""
    if args.output_dir is None:
        return None
    out = Path(args.output_dir).expanduser()
    targets = [out / f"{Path(path).stem}.{EXTENSIONS[args.format]}" for path in args.audio]
    first: dict[Path, str] = {}
    for path, target in zip(args.audio, targets, strict=True):
        if target in first:
            parser_error(
                f"--output-dir: {first[target]} and {path} would both be written to {target}; "
                "rename one, or transcribe them with different --output-dir"
            )
        first[target] = path
    return targets


def _without_words(result):
    import dataclasses

    return dataclasses.replace(result, words=None)


def _emit(path: str, body: dict | str, args: argparse.Namespace, target: Path | None) -> None:
    if isinstance(body, dict):
        text = json.dumps(body if target else {"file": path, **body}, ensure_ascii=False)
        text += "\n"
    elif target is None and args.format == "text" and len(args.audio) > 1:
        text = f"{path}: {body}"  # several transcripts on stdout: say whose each is
    else:
        text = body
    if target is None:
        sys.stdout.write(text)
        sys.stdout.flush()  # each file's transcript as soon as it is done
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(target, file=sys.stderr)
