"""`canary-server` command line: serve, transcribe, download, convert, install-service."""

from __future__ import annotations

import argparse
import logging
import sys

from canary_server.cli import convert, download, serve, service, transcribe

COMMANDS = (serve, transcribe, download, convert, service)


def _common_flags(default: object) -> argparse.ArgumentParser:
    """-v / -q, accepted before or after the command (after it, SUPPRESS keeps a value given before it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress or info lines, only warnings/errors"
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    from canary_server import __version__

    parser = argparse.ArgumentParser(
        prog="canary-server",
        description="Local OpenAI-compatible speech transcription and translation with NVIDIA Canary on MLX.",
        epilog="`canary-server COMMAND --help` shows a command's options.",
        parents=[_common_flags(default=False)],
    )
    parser.add_argument("--version", action="version", version=f"canary-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, [_common_flags(default=argparse.SUPPRESS)])
    return parser


class _Formatter(logging.Formatter):
    """A timestamp, then uvicorn's look ("2026-12-07 01:20:00,123 INFO:     message"): a log read later (a service's,
    a container's) says when each thing happened, and the server's lines and ours read alike."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.formatTime(record)} {record.levelname + ':':<10}{super().format(record)}"


def configure_logging(args: argparse.Namespace) -> None:
    """Warnings and errors from everything; info lines and progress from ours unless -q; debug with -v.
    `serve` then applies its log_level setting to our loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # a no-op where logging is set up (tests)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if args.command == "transcribe" and level == logging.INFO:
        level = logging.WARNING  # stdout is the transcript; stderr keeps only progress
    for name in ("canary", "canary_server"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("canary.progress").setLevel(logging.WARNING if args.quiet else min(level, logging.INFO))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    from canary_server.convert.errors import ConversionError
    from canary_server.model.errors import CanaryError
    from canary_server.server.settings import SettingsError

    try:
        return args.func(args)
    except (CanaryError, ConversionError, SettingsError) as exc:  # bad settings, model, language, audio, ...
        print(f"canary-server: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
