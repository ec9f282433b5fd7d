"""`canary-server` command line: convert, transcribe, serve, install-service."""

from __future__ import annotations

import argparse
import logging
import sys

from canary_server.cli import convert, serve, service, transcribe


def build_parser() -> argparse.ArgumentParser:
    from canary_server import __version__

    parser = argparse.ArgumentParser(
        prog="canary-server",
        description="Local OpenAI-compatible speech transcription and translation with NVIDIA Canary on MLX.",
    )
    parser.add_argument("--version", action="version", version=f"canary-server {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (convert, transcribe, serve, service):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from canary_server.convert.errors import ConversionError
    from canary_server.model.errors import CanaryError

    try:
        return args.func(args)
    except (CanaryError, ConversionError) as exc:  # unsupported language, undecodable audio, bad .nemo, ...
        print(f"canary-server: error: {exc}", file=sys.stderr)
        return 2
