"""`canary-server convert`: a NeMo .nemo checkpoint -> an MLX model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_GROUP_SIZE = 64  # canary_server.model.quantize.DEFAULT_GROUP_SIZE (a test keeps them equal)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        parents=parents,
        help="convert a NeMo .nemo checkpoint (or a canary-qwen-2.5b directory) into an MLX model directory",
    )
    p.add_argument(
        "source",
        help="path to a .nemo file, or to a NeMo SALM directory (canary-qwen-2.5b: config.json + model.safetensors)",
    )
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
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        default=None,
        help=f"quantization group size, with --quantize (default: {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument(
        "--llm-dir",
        metavar="DIR",
        default=None,
        help="canary-qwen-2.5b: the LLM's config.json, tokenizer.json and tokenizer_config.json (Qwen/Qwen3-1.7B's; "
        "default: the directory config.json's pretrained_llm names). `download` fetches them itself",
    )
    p.add_argument(
        "--no-timestamps-model",
        action="store_true",
        help="leave out a bundled timestamps (CTC aligner) model, as in canary-1b-v2 (no word times then)",
    )
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    from canary_server.model.errors import CanaryError

    if args.group_size is not None and args.quantize is None:
        raise CanaryError("--group-size needs --quantize 8 or 4 (it is the quantization's group size)")
    out = Path(args.out_dir).expanduser()
    if not args.overwrite and out.is_dir() and any(out.iterdir()):
        raise CanaryError(f"{out}: directory exists and is not empty; pass --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    from canary_server.cli.progress import progress_class
    from canary_server.convert import convert_nemo

    _check(args)
    source = Path(args.source).expanduser()
    if source.is_dir():  # canary-qwen-2.5b: a SALM release directory
        from canary_server.convert.salm import convert_salm

        out = convert_salm(
            source,
            Path(args.out_dir).expanduser(),
            llm_dir=args.llm_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
            quantize=args.quantize,
            group_size=args.group_size or DEFAULT_GROUP_SIZE,
        )
        return _print(out)
    out = convert_nemo(
        Path(args.source).expanduser(),
        Path(args.out_dir).expanduser(),
        dtype=args.dtype,
        overwrite=args.overwrite,
        quantize=args.quantize,
        group_size=args.group_size or DEFAULT_GROUP_SIZE,
        timestamps_model=not args.no_timestamps_model,
        progress=progress_class(args.quiet),
    )
    return _print(out)


def _print(out: Path) -> int:
    from canary_server.convert.summary import summary

    print(out)
    for line in summary(out):
        print(f"  {line}")
    return 0
