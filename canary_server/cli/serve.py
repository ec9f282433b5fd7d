"""`canary-server serve`: read settings, build the HTTP app over the pipeline, run uvicorn."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_serve_arguments(p)
    p.set_defaults(func=run)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (see config.example.toml)")
    parser.add_argument("--model", help="converted directory, .nemo file, or Hugging Face repo id")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port (default 8000)")


def settings_from_args(args: argparse.Namespace):
    """Flags override environment variables, which override the TOML file."""
    from canary_server.server.settings import Settings

    return Settings.load(args.config, model=args.model, host=args.host, port=args.port)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from canary_server.server.app import create_app

    settings = settings_from_args(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0
