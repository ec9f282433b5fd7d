"""`canary-server install-service`: run `serve` with the user's config at login, as the platform does it.

macOS: a launchd agent, ~/Library/LaunchAgents/org.canary-server.serve.plist, loaded with `launchctl bootstrap
gui/<uid>`; logs in ~/Library/Logs/canary-server/. Linux: a systemd user unit, ~/.config/systemd/user/
canary-server.service, enabled with `systemctl --user enable --now`; logs in the journal (`journalctl --user -u
canary-server`). `--uninstall` stops it and removes the file. The service runs this Python
(`python -m canary_server serve --config FILE`) with the config file's folder as working directory, so relative
paths in the config mean what they mean next to it.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from canary_server.model.errors import CanaryError

LABEL = "org.canary-server.serve"  # launchd
UNIT = "canary-server.service"  # systemd

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install-service",
        parents=parents,
        help="run `serve` at login (a launchd agent on macOS, a systemd user unit on Linux)",
        description="Write and load a launchd agent (macOS) or a systemd user unit (Linux) that runs "
        "`canary-server serve --config FILE` at login, restarting it if it crashes.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML settings file the service runs with (required to install)")
    p.add_argument("--uninstall", action="store_true", help="stop the service and remove its file")
    p.add_argument("--dry-run", action="store_true", help="print the file and the commands; change nothing")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class ServiceFile:
    path: Path
    content: str
    load: list[list[str]]  # commands that (re)load it
    unload: list[list[str]]  # commands that stop it (failures ignored: it may not be loaded)


def serve_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "canary_server", "serve", "--config", str(config)]


def launchd_agent(home: Path, config: Path, uid: int) -> ServiceFile:
    logs = home / "Library" / "Logs" / "canary-server"
    plist = {
        "Label": LABEL,
        "ProgramArguments": serve_command(config),
        "WorkingDirectory": str(config.parent),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},  # log lines reach the files as they happen
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restarted after a crash, not after a clean stop
        "ProcessType": "Interactive",  # not throttled like a background job (inference wants the GPU/CPU)
        "StandardOutPath": str(logs / "serve.log"),
        "StandardErrorPath": str(logs / "serve.err.log"),
    }
    path = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    domain = f"gui/{uid}"
    return ServiceFile(
        path,
        plistlib.dumps(plist).decode(),
        load=[["launchctl", "bootstrap", domain, str(path)]],
        unload=[["launchctl", "bootout", f"{domain}/{LABEL}"]],
    )


def systemd_unit(home: Path, config: Path) -> ServiceFile:
    exec_start = " ".join(_systemd_quote(a) for a in serve_command(config))
    content = f"""[Unit]
Description=canary-server: NVIDIA Canary speech-to-text (OpenAI API, Wyoming)

[Service]
Type=simple
ExecStart={exec_start}
WorkingDirectory={_systemd_quote(str(config.parent))}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=5

[Install]
WantedBy=default.target
"""
    path = home / ".config" / "systemd" / "user" / UNIT
    return ServiceFile(
        path,
        content,
        load=[["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", UNIT]],
        unload=[["systemctl", "--user", "disable", "--now", UNIT]],
    )


def _systemd_quote(arg: str) -> str:
    """One ExecStart word: specifiers (%) and variables ($) escaped, quoted when it has spaces or quotes."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"\\'"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def service_file(platform: str, home: Path, config: Path, uid: int) -> ServiceFile:
    if platform == "darwin":
        return launchd_agent(home, config, uid)
    if platform.startswith("linux"):
        return systemd_unit(home, config)
    raise CanaryError(f"install-service supports macOS (launchd) and Linux (systemd), not {platform}")


def install(
    config: Path | None,
    *,
    uninstall: bool = False,
    dry_run: bool = False,
    platform: str = sys.platform,
    home: Path | None = None,
    uid: int | None = None,
    runner: Runner | None = None,
    out=sys.stdout,
) -> ServiceFile:
    """Write (or remove) the service file and (un)load it; `runner` runs the commands (tests: a recorder)."""
    home = home or Path.home()
    uid = os.getuid() if uid is None else uid
    run_cmd = runner or (lambda cmd: subprocess.run(cmd, capture_output=True, text=True))
    if not uninstall:
        config = _checked_config(config)
    svc = service_file(platform, home, config or Path("unused.toml"), uid)
    if dry_run:
        if not uninstall:
            print(f"# {svc.path}\n{svc.content}", file=out)
        for cmd in svc.unload + ([] if uninstall else svc.load):
            print("$ " + " ".join(cmd), file=out)
        return svc
    for cmd in svc.unload:  # stop a running copy first (also before reinstalling)
        run_cmd(cmd)
    if uninstall:
        svc.path.unlink(missing_ok=True)
        if platform != "darwin":
            run_cmd(["systemctl", "--user", "daemon-reload"])
        print(f"removed {svc.path}", file=out)
        return svc
    svc.path.parent.mkdir(parents=True, exist_ok=True)
    if platform == "darwin":
        (home / "Library" / "Logs" / "canary-server").mkdir(parents=True, exist_ok=True)
    svc.path.write_text(svc.content)
    for cmd in svc.load:
        done = run_cmd(cmd)
        if done.returncode != 0:
            raise CanaryError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()}")
    where = "~/Library/Logs/canary-server/" if platform == "darwin" else f"journalctl --user -u {UNIT}"
    print(f"installed {svc.path}; it runs `serve` now and at every login (logs: {where})", file=out)
    return svc


def _checked_config(config: Path | None) -> Path:
    """The config as an absolute path, loadable now (a bad one is refused here, not in a restart loop)."""
    if config is None:
        raise CanaryError("install-service needs --config FILE (the settings it runs with; see config.example.toml)")
    from canary_server.server.settings import Settings

    path = Path(config).expanduser().resolve()
    try:
        Settings.load(path)
    except (OSError, ValueError) as exc:  # a missing file, bad TOML, an unknown or invalid setting
        raise CanaryError(f"the config {path} cannot be used: {exc}") from None
    return path


def run(args: argparse.Namespace) -> int:
    install(Path(args.config) if args.config else None, uninstall=args.uninstall, dry_run=args.dry_run)
    return 0
