"""`canary-server serve`: read settings, get the model ready (download and convert on first use, with progress),
then run the HTTP server, and the Wyoming server (Home Assistant) on the same pipeline in the same event loop.

Fail fast: a setting that does not validate, a model path that does not exist, a hub id that is neither cached nor
downloadable (offline, unreachable, no such repo) or a `.nemo` that does not convert is one line on stderr and exit
code 2, before anything listens. Once the server runs, /health answers 503 while the converted model loads; if
loading fails (nothing retries it), the server stops with the reason on one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging

# Settings that have a flag (the rest: TOML file or CANARY_* variables; all are listed in --help).
FLAGS = ("model", "cache_dir", "host", "port", "api_key", "log_level", "wyoming_host", "wyoming_port")

log = logging.getLogger("canary.serve")


class _HelpWithSettings(argparse.Action):
    """-h: fills in each flag's default and variable, and lists every setting, only when help is asked for
    (reading the settings class imports MLX: too slow for every `canary-server` call)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help="show this help and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from canary_server.server.settings import Settings, env_name

        fields = Settings.model_fields
        for action in parser._actions:
            if action.dest in fields:
                field = fields[action.dest]
                about = field.description or action.help
                action.help = f"{about} (default: {_default(field)}; {env_name(action.dest)})"
        lines = [
            "Every setting, as TOML key in --config FILE / environment variable: default. Variables win over the",
            "file, flags over both; config.example.toml describes each one.",
        ]
        lines += [f"  {name} / {env_name(name)}: {_default(f)}" for name, f in fields.items()]
        parser.epilog = "\n".join(lines)
        parser.print_help()
        parser.exit()


def _default(field) -> str:
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else (json.dumps(value) if isinstance(value, list) else str(value))


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        parents=parents,
        add_help=False,
        help="run the OpenAI-compatible HTTP server (and Wyoming for Home Assistant)",
        description="Run the OpenAI-compatible HTTP server (POST /v1/audio/transcriptions, /v1/audio/translations; "
        "GET /v1/models, /health, /docs) and, unless --wyoming-port is 0, the Wyoming server Home Assistant "
        "connects to, both on one model. The first start downloads and converts the model, with progress.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-h", "--help", action=_HelpWithSettings)
    add_serve_arguments(p)
    p.set_defaults(func=run)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (see config.example.toml)")
    parser.add_argument("--model", help="converted directory, .nemo file, or Hugging Face repo id")
    parser.add_argument("--cache-dir", metavar="DIR", help="where converted models are kept")
    parser.add_argument("--host", help="bind address")
    parser.add_argument("--port", type=int, help="bind port")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (prefer the variable: flags show in ps)")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), help="logging")
    parser.add_argument("--wyoming-host", help="Wyoming (Home Assistant) bind address")
    parser.add_argument("--wyoming-port", type=int, help="Wyoming port (0 turns it off)")


def settings_from_args(args: argparse.Namespace):
    """Flags override environment variables, which override the TOML file."""
    from canary_server.server.settings import Settings

    log_level = getattr(args, "log_level", None)
    if getattr(args, "verbose", False):
        log_level = "debug"
    elif getattr(args, "quiet", False) and log_level is None:
        log_level = "warning"
    flags = {name: getattr(args, name, None) for name in FLAGS}
    return Settings.load(args.config, **{**flags, "log_level": log_level})


def prepare_model(settings, quiet: bool = False):
    """The converted directory for the settings' model: downloaded and converted now, with progress, on first use.
    Raises ConversionError (one line: what is wrong and what to do) when it cannot be had."""
    from canary_server.cli.progress import progress_class
    from canary_server.convert.cache import resolve_model

    log.info("model %s", settings.model)
    return resolve_model(settings.model, settings.cache_dir, progress=progress_class(quiet))


def check_port(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port something already listens on now, not after a long first download; `flag` names the option
    that picks it."""
    import socket

    from canary_server.server.settings import SettingsError

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SettingsError(f"setting host = {host!r}: not an address of this machine ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            hint = " (0 turns Wyoming off)" if flag == "--wyoming-port" else ""
            raise SettingsError(
                f"cannot listen on {host}:{port} ({e.strerror}); is another server running there? "
                f"Pick another {flag}{hint}"
            ) from None


def set_log_level(level: str) -> None:
    for name in ("canary", "canary_server"):
        logging.getLogger(name).setLevel(level.upper())


def build_app(settings, *, wyoming_port: int | None = None, engine=None, model_dir=None):
    """The HTTP app, and unless `wyoming_port` is 0 the Wyoming server on the same pipeline, entered in the
    app's lifespan (so it runs in uvicorn's event loop and stops before the engine closes). `wyoming_port`
    overrides the setting's bind port (tests: 0 = any free port, read back from `app.state.wyoming.port`);
    `engine`: tests inject a fake; `model_dir`: the model already resolved (downloaded and converted)."""
    from canary_server.server.app import build_pipeline, create_app
    from canary_server.wyoming_server import WyomingConfig, WyomingServer

    pipeline = build_pipeline(settings, engine=engine, model_dir=model_dir)
    services = []
    if wyoming_port is not None or settings.wyoming_port != 0:
        config = WyomingConfig(
            host=settings.wyoming_host,
            port=settings.wyoming_port if wyoming_port is None else wyoming_port,
            zeroconf=settings.wyoming_zeroconf,
            model_name=settings.model_id,
            max_connections=settings.wyoming_max_connections,
            idle_seconds=settings.wyoming_idle_seconds,
            chunk_seconds=settings.wyoming_chunk_seconds,
            max_utterance_seconds=settings.wyoming_utterance_seconds,
            max_utterance_mb=settings.wyoming_max_utterance_mb,
            max_chunks=settings.wyoming_max_chunks,
            max_held_mb=settings.wyoming_max_held_mb,
            max_held_seconds=settings.wyoming_max_held_seconds,
            partials=settings.wyoming_partials,
        )
        services.append(WyomingServer(pipeline, config))
    app = create_app(settings, pipeline=pipeline, services=services)
    app.state.wyoming = services[0] if services else None
    return app


def run(args: argparse.Namespace) -> int:
    import sys

    from canary_server.server.serving import run_server

    settings = settings_from_args(args)
    set_log_level(settings.log_level)
    check_port(settings.host, settings.port)
    if settings.wyoming_port:
        check_port(settings.wyoming_host, settings.wyoming_port, "--wyoming-port")
    model_dir = prepare_model(settings, quiet=getattr(args, "quiet", False))
    app = build_app(settings, model_dir=model_dir)
    pipeline = app.state.pipeline
    run_server(app, settings)  # until SIGTERM/SIGINT (with a shutdown deadline) or a model that failed to load
    if pipeline.engine.error is not None:  # (closing the app has set the state to CLOSED since)
        print(f"canary-server: error: the model failed to load: {pipeline.engine.error}", file=sys.stderr)
        return 1
    return 0
