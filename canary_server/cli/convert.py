"""`canary-server convert`: a NeMo .nemo checkpoint -> an MLX model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_GROUP_SIZE = 64  # canary_server.model.quantize.DEFAULT_GROUP_SIZE (a test keeps them equal)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", parents=parents, help="convert a NeMo .nemo checkpoint into an MLX model directory")
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
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        default=None,
        help=f"quantization group size, with --quantize (default: {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
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
    from canary_server.convert.summary import summary

    _check(args)
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
    print(out)
    for line in summary(out):
        print(f"  {line}")
    return 0
