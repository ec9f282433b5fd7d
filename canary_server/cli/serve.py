"""`canary-server serve`: read settings, build the HTTP app over the pipeline (and the Wyoming server on the same
pipeline, in the same event loop), run uvicorn."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (and Wyoming for Home Assistant)")
    add_serve_arguments(p)
    p.set_defaults(func=run)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (see config.example.toml)")
    parser.add_argument("--model", help="converted directory, .nemo file, or Hugging Face repo id")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port (default 8000)")
    parser.add_argument("--wyoming-host", help="Wyoming (Home Assistant) bind address (default 127.0.0.1)")
    parser.add_argument("--wyoming-port", type=int, help="Wyoming port (default 10300; 0 turns it off)")


def settings_from_args(args: argparse.Namespace):
    """Flags override environment variables, which override the TOML file."""
    from canary_server.server.settings import Settings

    return Settings.load(
        args.config,
        model=args.model,
        host=args.host,
        port=args.port,
        wyoming_host=getattr(args, "wyoming_host", None),
        wyoming_port=getattr(args, "wyoming_port", None),
    )


def build_app(settings, *, wyoming_port: int | None = None, engine=None):
    """The HTTP app, and unless `wyoming_port` is 0 the Wyoming server on the same pipeline, entered in the
    app's lifespan (so it runs in uvicorn's event loop and stops before the engine closes). `wyoming_port`
    overrides the setting's bind port (tests: 0 = any free port, read back from `app.state.wyoming.port`);
    `engine`: tests inject a fake."""
    from canary_server.server.app import build_pipeline, create_app
    from canary_server.wyoming_server import WyomingConfig, WyomingServer

    pipeline = build_pipeline(settings, engine=engine)
    services = []
    if wyoming_port is not None or settings.wyoming_port != 0:
        config = WyomingConfig(
            host=settings.wyoming_host,
            port=settings.wyoming_port if wyoming_port is None else wyoming_port,
            zeroconf=settings.wyoming_zeroconf,
            model_name=settings.model_id,
        )
        services.append(WyomingServer(pipeline, config))
    app = create_app(settings, pipeline=pipeline, services=services)
    app.state.wyoming = services[0] if services else None
    return app


def run(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from_args(args)
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0
