"""`canary-server download`: get a model ready before the first `serve` (or for use offline later)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "download",
        parents=parents,
        help="download a Hugging Face model and convert it into the cache (what the first serve does)",
        description="Download MODEL from the Hugging Face Hub into its cache (HF_HOME / HF_HUB_CACHE) and convert it "
        "into canary-server's cache, with progress; then `serve --model MODEL` and `transcribe --model MODEL` start "
        "at once, also offline (HF_HUB_OFFLINE=1). A .nemo file is converted into the cache. Prints the converted "
        "directory.",
    )
    p.add_argument(
        "model", nargs="?", default="nvidia/canary-1b-flash", help="Hugging Face repo id or .nemo file (default: "
        "nvidia/canary-1b-flash, the server's default model)"
    )  # fmt: skip
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="where converted models are kept (default: ~/.cache/canary-server)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from canary_server.cli.progress import progress_class
    from canary_server.convert.cache import resolve_model

    print(resolve_model(args.model, args.cache_dir, progress=progress_class(args.quiet)))
    return 0
