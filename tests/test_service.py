"""`canary-server install-service`: the launchd agent and the systemd user unit it writes, and the commands it runs
(recorded, not run: loading a service is not possible in CI)."""

from __future__ import annotations

import io
import plistlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from canary_server.cli import build_parser, main
from canary_server.cli.service import install
from canary_server.model.errors import CanaryError


class Recorder:
    def __init__(self, fail: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd):
        self.commands.append(list(cmd))
        failed = self.fail is not None and self.fail in cmd
        return subprocess.CompletedProcess(cmd, 1 if failed else 0, "", "boom" if failed else "")


@pytest.fixture
def config(tmp_path) -> Path:
    folder = tmp_path / "my configs"  # a space: quoting matters
    folder.mkdir()
    path = folder / "canary.toml"
    path.write_text('model = "./models/canary-180m-flash"\nwyoming_host = "0.0.0.0"\n')
    return path


def test_macos_gets_a_launchd_agent_that_runs_serve_with_the_config_at_login(tmp_path, config):
    home, runner, out = tmp_path / "home", Recorder(), io.StringIO()
    svc = install(config, platform="darwin", home=home, uid=501, runner=runner, out=out)
    assert svc.path == home / "Library/LaunchAgents/org.canary-server.serve.plist" and svc.path.is_file()
    plist = plistlib.loads(svc.path.read_bytes())
    assert plist["Label"] == "org.canary-server.serve"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "canary_server", "serve", "--config", str(config)]
    assert plist["WorkingDirectory"] == str(config.parent) and plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["ProcessType"] == "Interactive"
    assert plist["StandardOutPath"] == str(home / "Library/Logs/canary-server/serve.log")
    assert plist["StandardErrorPath"] == str(home / "Library/Logs/canary-server/serve.err.log")
    assert (home / "Library/Logs/canary-server").is_dir()
    assert runner.commands == [
        ["launchctl", "bootout", "gui/501/org.canary-server.serve"],  # a running copy is replaced
        ["launchctl", "bootstrap", "gui/501", str(svc.path)],
    ]
    assert "Library/Logs/canary-server" in out.getvalue()


def test_linux_gets_a_systemd_user_unit_enabled_now_and_at_login(tmp_path, config):
    home, runner = tmp_path / "home", Recorder()
    svc = install(config, platform="linux", home=home, uid=1000, runner=runner, out=io.StringIO())
    assert svc.path == home / ".config/systemd/user/canary-server.service"
    unit = svc.path.read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart=")) == [
        sys.executable, "-m", "canary_server", "serve", "--config", str(config)
    ]  # fmt: skip
    assert f'WorkingDirectory="{config.parent}"' in unit
    assert "Restart=on-failure" in unit and "WantedBy=default.target" in unit and "[Install]" in unit
    assert runner.commands == [
        ["systemctl", "--user", "disable", "--now", "canary-server.service"],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "canary-server.service"],
    ]


def test_systemd_specifiers_and_variables_in_paths_are_escaped(tmp_path):
    # a literal '$' in a directory name (path settings expand defined variables such as $HOME; this one is unset)
    folder = tmp_path / "100%$CANARY_TEST_UNSET_VARIABLE"
    folder.mkdir()
    config = folder / "c.toml"
    config.write_text("")
    svc = install(config, platform="linux", home=tmp_path / "h", uid=1, runner=Recorder(), out=io.StringIO())
    assert "100%%$$CANARY_TEST_UNSET_VARIABLE/c.toml" in svc.path.read_text()


def test_uninstall_stops_the_service_and_removes_the_file(tmp_path, config):
    home = tmp_path / "home"
    for platform in ("darwin", "linux"):
        svc = install(config, platform=platform, home=home, uid=501, runner=Recorder(), out=io.StringIO())
        runner = Recorder()
        install(None, uninstall=True, platform=platform, home=home, uid=501, runner=runner, out=io.StringIO())
        assert not svc.path.exists()
        assert runner.commands[0][:2] in (["launchctl", "bootout"], ["systemctl", "--user"])


def test_dry_run_prints_the_file_and_commands_and_changes_nothing(tmp_path, config):
    home, runner, out = tmp_path / "home", Recorder(), io.StringIO()
    svc = install(config, dry_run=True, platform="linux", home=home, uid=1, runner=runner, out=out)
    assert runner.commands == [] and not svc.path.exists()
    assert svc.content in out.getvalue() and "$ systemctl --user enable --now canary-server.service" in out.getvalue()


def test_a_missing_or_bad_config_is_refused_before_anything_is_written(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(CanaryError, match="needs --config"):
        install(None, platform="linux", home=home, runner=Recorder())
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(CanaryError, match="cannot be used"):
        install(bad, platform="linux", home=home, runner=Recorder())
    with pytest.raises(CanaryError, match="cannot be used"):
        install(tmp_path / "missing.toml", platform="linux", home=home, runner=Recorder())
    assert not home.exists()


def test_a_failing_load_command_is_reported_and_other_platforms_are_refused(tmp_path, config):
    with pytest.raises(CanaryError, match="enable --now canary-server.service failed: boom"):
        install(config, platform="linux", home=tmp_path / "h", runner=Recorder(fail="enable"), out=io.StringIO())
    with pytest.raises(CanaryError, match="not win32"):
        install(config, platform="win32", home=tmp_path / "h", runner=Recorder())


def test_the_command_line_has_install_service(capsys, tmp_path):
    args = build_parser().parse_args(["install-service", "--config", "x.toml", "--uninstall", "--dry-run"])
    assert (args.config, args.uninstall, args.dry_run) == ("x.toml", True, True)
    assert main(["install-service"]) == 2 and "needs --config" in capsys.readouterr().err
