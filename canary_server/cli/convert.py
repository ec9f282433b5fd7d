"""`canary-server convert`: a NeMo .nemo checkpoint -> an MLX model directory."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "float16", "bfloat16")


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--no-timestamps-model",
        action="store_true",
        help="leave out a bundled timestamps (CTC aligner) model, as in canary-1b-v2 (no word times then)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from canary_server.convert import convert_nemo
    from canary_server.convert.summary import summary

    out = convert_nemo(
        args.source,
        args.out_dir,
        dtype=args.dtype,
        overwrite=args.overwrite,
        quantize=args.quantize,
        group_size=args.group_size,
        timestamps_model=not args.no_timestamps_model,
    )
    print(out)
    for line in summary(out):
        print(f"  {line}")
    return 0
