"""A newcomer's first minutes (issue 12): fail-fast starts with one-line errors, `~` in paths, progress of the first
download and conversion, settings errors, `--help`, `download`, `convert`'s messages, offline /docs, and every
`canary-server` command that README.md and Dockerfile.dev show.

No network: hub ids resolve against a temporary Hugging Face cache with HF_HUB_OFFLINE=1, and "the hub cannot be
reached" is HF_ENDPOINT on a closed loopback port."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from canary_server.cli import build_parser, main
from canary_server.cli.progress import LogLines
from canary_server.convert.cache import resolve_model
from canary_server.server.app import create_app
from canary_server.server.settings import Settings, SettingsError
from conftest import ESPEAK_CLIPS, ESPEAK_NEMO, LOG_LINE, REPO, log_message
from server_fakes import fake_engine

CLI = str(Path(sys.executable).with_name("canary-server"))


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a first start: no CANARY_* settings, an empty Hugging Face cache, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANARY_", "HF_"))}
    env.update({"HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    # Never the default ports 8000 / 10300: a canary-server may be running on this machine.
    env.update({"CANARY_PORT": "0", "CANARY_WYOMING_PORT": "0", **extra})
    return env


def _run(args: list[str], tmp_path: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if log_message(line) is None]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("canary-server: error: "), proc.stderr
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_espeak() -> None:
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")


# ---- fail fast: one line and a non-zero exit before anything listens --------------------------------------------
def test_serve_offline_without_the_default_model_exits_with_one_line_saying_how_to_download_it(tmp_path):
    proc = _run(["serve"], tmp_path)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "nvidia/canary-1b-flash: not in " in line and "HF_HUB_OFFLINE is set" in line
    assert "`canary-server download nvidia/canary-1b-flash`" in line and "--model" in line
    assert "Uvicorn running" not in proc.stderr


def test_serve_with_an_unreachable_hub_exits_with_one_line(tmp_path):
    proc = _run(["serve"], tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "the Hugging Face Hub could not be reached" in line and "--model" in line


def test_serve_with_a_model_path_that_does_not_exist_exits_with_one_line(tmp_path):
    proc = _run(["serve", "--model", "./models/canary.nemo"], tmp_path)
    assert proc.returncode == 2
    assert "./models/canary.nemo: no such file or directory" in _one_line_error(proc)


def test_serve_on_a_port_in_use_says_so_before_loading_anything(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "absent"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_on_a_wyoming_port_in_use_names_the_wyoming_port_option(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--model", str(tmp_path / "absent"), "--port", "0", "--wyoming-port", str(port)]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Pick another --wyoming-port (0 turns Wyoming off)" in err


def test_transcribe_with_a_model_that_does_not_exist_is_one_line(tmp_path):
    proc = _run(["transcribe", "x.wav", "--model", "absent"], tmp_path)
    assert proc.returncode == 2 and "absent: no such file or directory" in _one_line_error(proc)


def _serve(args: list[str], tmp_path: Path, stop_when_ready: bool = True, deadline_s: float = 120):
    """Run `canary-server serve ARGS` on a free port; its stderr lines and exit code. With `stop_when_ready`, it is
    stopped (SIGTERM) once the model is ready; otherwise it must stop by itself."""
    proc = subprocess.Popen(
        [CLI, "serve", "--port", "0", *args], cwd=tmp_path, env=_env(tmp_path), stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x.rstrip("\n")) for x in proc.stderr], daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + deadline_s
    try:
        while stop_when_ready and not any("model ready" in x for x in seen):
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
    finally:
        if stop_when_ready:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(max(deadline - time.monotonic(), 1))
        reader.join(60)
        proc.stderr.close()
    while not lines.empty():
        seen.append(lines.get())
    return seen, rc


def test_first_serve_of_a_nemo_shows_conversion_progress_before_listening(tmp_path):
    _require_espeak()
    lines, rc = _serve(["--model", str(ESPEAK_NEMO), "--cache-dir", "~/models"], tmp_path)
    assert rc in (0, -signal.SIGTERM) and "Finished server process" in lines[-1], lines  # uvicorn re-raises SIGTERM
    progress = [i for i, x in enumerate(lines) if (log_message(x) or "").startswith("converting espeak-tiny-en.nemo: ")]
    listening = next(i for i, x in enumerate(lines) if "Uvicorn running" in x)
    assert progress and progress[-1] < listening, lines
    assert "(0%)" in lines[progress[0]] and "(100%)" in lines[progress[-1]]
    assert all(LOG_LINE.fullmatch(x) for x in lines), lines  # every line, ours and uvicorn's, says when
    assert list((tmp_path / "home" / "models").iterdir()) and not (tmp_path / "~").exists()


def test_a_model_that_fails_to_load_after_the_start_stops_the_server_with_the_reason(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"format_version": 99}')
    lines, rc = _serve(["--model", str(broken)], tmp_path, stop_when_ready=False)
    assert rc == 1, lines
    assert lines[-1].startswith("canary-server: error: the model failed to load: ") and "format_version 99" in lines[-1]
    assert not any("Traceback" in x for x in lines)


# ---- ~ and $VARS in path settings ------------------------------------------------------------------------------
def test_tilde_and_env_vars_in_toml_path_settings_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELS", str(tmp_path / "models"))
    cfg = tmp_path / "c.toml"
    cfg.write_text('cache_dir = "~/.cache/canary-server"\nmodel = "$MODELS/canary.nemo"\n')
    s = Settings.load(cfg)
    assert s.cache_dir == tmp_path / "home" / ".cache" / "canary-server"
    assert s.model == str(tmp_path / "models" / "canary.nemo")
    monkeypatch.setenv("CANARY_CACHE_DIR", "~/elsewhere")
    assert Settings.load(cfg).cache_dir == tmp_path / "home" / "elsewhere"


def test_relative_paths_in_a_config_file_are_taken_from_its_folder(tmp_path, monkeypatch):
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    (conf / "models" / "m").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for k in ("CANARY_MODEL", "CANARY_CACHE_DIR"):
        monkeypatch.delenv(k, raising=False)
    cfg = conf / "c.toml"
    for model, expected in [
        ("./x.nemo", str(conf / "x.nemo")),
        ("../shared/x.nemo", str(tmp_path / "shared" / "x.nemo")),
        ("models/m", str(conf / "models" / "m")),  # exists there
        ("nvidia/canary-1b-flash", "nvidia/canary-1b-flash"),  # a Hugging Face repo id
    ]:
        cfg.write_text(f'model = "{model}"\ncache_dir = "cache"\n')
        s = Settings.load(Path("../conf/c.toml"))
        assert (s.model, s.cache_dir) == (expected, conf / "cache")
    # flags and variables are the caller's: relative to where serve starts
    monkeypatch.setenv("CANARY_CACHE_DIR", "mine")
    assert Settings.load(cfg, model="./y.nemo").model == "./y.nemo" and Settings.load(cfg).cache_dir == Path("mine")


def test_serve_finds_a_relative_model_of_its_config_from_another_folder(tmp_path):
    _require_espeak()
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "espeak.nemo").symlink_to(ESPEAK_NEMO)
    (conf / "c.toml").write_text('model = "./espeak.nemo"\ncache_dir = "cache"\n')
    lines, _ = _serve(["--config", "conf/c.toml"], tmp_path)  # started in tmp_path, not in conf/
    assert f"model {conf / 'espeak.nemo'}" in map(log_message, lines) and any("model ready" in x for x in lines), lines
    assert any(p.name.startswith("espeak-") and p.is_dir() for p in (conf / "cache").iterdir())  # converted there


def test_a_tilde_cache_dir_never_creates_a_directory_named_tilde(tmp_path, monkeypatch):
    _require_espeak()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    out = resolve_model(ESPEAK_NEMO, cache_dir="~/.cache/canary-server")
    assert out.parent == tmp_path / "home" / ".cache" / "canary-server"
    assert not (tmp_path / "~").exists()


# ---- progress --------------------------------------------------------------------------------------------------
def test_convert_shows_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    _require_espeak()
    proc = _run(["convert", str(ESPEAK_NEMO), "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    progress = [x for x in proc.stderr.splitlines() if "converting espeak-tiny-en.nemo: " in x]
    assert re.fullmatch(r"converting espeak-tiny-en\.nemo: 0 B of [\d.]+ MB \(0%\)", log_message(progress[0]))
    assert "(100%)" in progress[-1] and "\r" not in proc.stderr
    assert proc.stdout.splitlines()[0] == str(tmp_path / "out")  # then what it found, indented
    quiet = _run(["convert", str(ESPEAK_NEMO), "out2", "-q"], tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_the_first_transcribe_with_a_nemo_shows_conversion_progress_and_only_the_transcript_on_stdout(tmp_path):
    _require_espeak()
    proc = _run(["transcribe", str(ESPEAK_CLIPS / "clip03.wav"), "--model", str(ESPEAK_NEMO)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "moon thought student only work got milk\n"
    assert "converting espeak-tiny-en.nemo: " in proc.stderr and "(100%)" in proc.stderr


def test_log_lines_report_at_the_start_every_interval_and_at_the_end(caplog, monkeypatch):
    monkeypatch.setattr(LogLines, "interval", 0.0)
    with caplog.at_level("INFO", logger="canary.progress"):
        bar = LogLines(total=3_000_000, desc="downloading x.nemo", unit="B", unit_scale=True)
        bar.update(1_500_000)
        bar.update(1_500_000)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "canary.progress"]
    assert lines[0] == "downloading x.nemo: 0 B of 3.0 MB (0%)"
    assert re.fullmatch(r"downloading x\.nemo: 1\.5 MB of 3\.0 MB \(50%\), [\d.]+ [kMG]?B/s, about .* left", lines[1])
    assert re.fullmatch(r"downloading x\.nemo: 3\.0 MB of 3\.0 MB \(100%\), [\d.]+ [kMG]?B/s", lines[-1])


def test_download_fetches_from_the_hub_cache_converts_and_prints_the_directory(tmp_path):
    _require_espeak()
    from test_cache import _fake_hub_repo

    _fake_hub_repo(tmp_path / "hf" / "hub", "acme/canary-tiny", {"canary-tiny.nemo": ESPEAK_NEMO})
    proc = _run(["download", "acme/canary-tiny"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip())
    assert out.parent == tmp_path / "home" / ".cache" / "canary-server" and (out / "config.json").is_file()
    assert "converting canary-tiny.nemo: " in proc.stderr
    assert build_parser().parse_args(["download"]).model == Settings.model_fields["model"].default


# ---- settings errors: one line naming the setting, the value and what is allowed -----------------------------
@pytest.mark.parametrize(
    ("args", "env", "toml", "expected"),
    [
        (["--config", "nope.toml"], {}, None, "config file nope.toml: no such file"),
        ([], {"CANARY_PORT": "abc"}, None, "setting port = 'abc' (from CANARY_PORT): input should be a valid integer"),
        ([], {}, "prot = 8001\n", "unknown setting 'prot' (did you mean 'port'?"),
        ([], {}, "port = [\n", "not valid TOML"),
        ([], {"CANARY_LOG_LEVEL": "loud"}, None, "setting log_level = 'loud' (from CANARY_LOG_LEVEL): input should be"),
        (["--port", "99999"], {}, None, "setting port = 99999 (from --port): input should be less than or equal to"),
        (
            [],
            {"CANARY_MODEL_ALIASES": '["whisper-1"'},
            None,
            """setting model_aliases = '["whisper-1"' (from CANARY_MODEL_ALIASES): not a list: give comma-separated"""
            """ values (a,b) or a JSON list (["a", "b"])""",
        ),
    ],
)
def test_settings_errors_are_one_line(tmp_path, monkeypatch, capsys, args, env, toml, expected):
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if toml is not None:
        (tmp_path / "c.toml").write_text(toml)
        args = [*args, "--config", "c.toml"]
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("canary-server: error: ") and expected in err, err


# ---- the command line a whisper-server user expects --------------------------------------------------------------
def test_serve_help_shows_defaults_env_variables_and_the_key_and_log_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--api-key" in out and "--log-level" in out and "--cache-dir" in out
    assert "(default: nvidia/canary-1b-flash; CANARY_MODEL)" in " ".join(out.split())
    for name in Settings.model_fields:
        assert f"{name} / CANARY_{name.upper()}: " in out


def test_version_and_verbosity_flags_work_before_and_after_the_command(capsys):
    from canary_server import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"canary-server {__version__}"
    parser = build_parser()
    assert parser.parse_args(["-v", "serve"]).verbose and parser.parse_args(["serve", "-v"]).verbose
    assert parser.parse_args(["transcribe", "a.wav", "--model", "m", "-q"]).quiet


def test_convert_into_an_existing_dir_names_the_flag_and_group_size_needs_quantize(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main(["convert", str(tmp_path / "m.nemo"), str(tmp_path / "out")]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m.nemo"), str(tmp_path / "new"), "--group-size", "32"]) == 2
    assert "--group-size needs --quantize" in capsys.readouterr().err
    from canary_server.cli.convert import DEFAULT_GROUP_SIZE
    from canary_server.model.quantize import DEFAULT_GROUP_SIZE as MODEL_DEFAULT

    assert DEFAULT_GROUP_SIZE == MODEL_DEFAULT


def test_timestamps_with_text_or_json_output_is_refused(capsys):
    for fmt in ("text", "json", "srt", "vtt"):
        assert main(["transcribe", "a.wav", "--model", "m", "--format", fmt, "--timestamps"]) == 2
        assert f"--timestamps needs --format verbose_json (got {fmt};" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["a.lan,b.lan", " a.lan , b.lan ", '["a.lan", "b.lan"]'])
@pytest.mark.parametrize("setting", ["allowed_hosts", "model_aliases", "detect_languages"])
def test_list_settings_from_the_environment_take_commas_or_json(monkeypatch, setting, value):
    monkeypatch.setenv(f"CANARY_{setting.upper()}", value)
    assert getattr(Settings.load(), setting) == ["a.lan", "b.lan"]


@pytest.mark.parametrize("value", ["[a.lan", '{"a": 1}', "[1, 2"])
@pytest.mark.parametrize("setting", ["allowed_hosts", "model_aliases", "detect_languages"])
def test_a_list_setting_that_is_neither_is_one_error_wording(monkeypatch, setting, value):
    monkeypatch.setenv(f"CANARY_{setting.upper()}", value)
    with pytest.raises(SettingsError) as err:
        Settings.load()
    assert str(err.value) == (
        f"setting {setting} = {value!r} (from CANARY_{setting.upper()}): not a list: give comma-separated values "
        """(a,b) or a JSON list (["a", "b"])"""
    )


def test_docs_and_redoc_load_their_assets_from_the_server_not_a_cdn():
    from fastapi.testclient import TestClient

    app = create_app(Settings(model="/models/fake"), engine=fake_engine())
    with TestClient(app, base_url="http://localhost") as client:  # a loopback Host (no api_key: DNS-rebinding guard)
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assets = re.findall(r"""(?:src|href)=["']([^"']+)""", html)
            assert assets and not [a for a in assets if "//" in a], assets
            for asset in assets:
                if asset != "/openapi.json":
                    assert client.get(asset).status_code == 200, asset


def _command_lines(path: Path) -> list[str]:
    """README.md: the lines of its code blocks (prose may name a command without its arguments); Dockerfile.dev:
    every line (its commands are comments)."""
    lines = path.read_text().splitlines()
    if path.suffix != ".md":
        return lines
    fences = [i for i, line in enumerate(lines) if line.startswith("```")]
    return [line for a, b in zip(fences[::2], fences[1::2], strict=True) for line in lines[a + 1 : b]]


def _documented_commands() -> list[list[str]]:
    """Every `canary-server ...` command line in README.md's code blocks and Dockerfile.dev."""
    pattern = re.compile(r"(?:^|[\s`#])(?:\.venv/bin/)?canary-server ((?:serve|transcribe|download|convert)\b[^`#\n]*)")
    commands = []
    for path in (REPO / "README.md", REPO / "Dockerfile.dev"):
        for line in _command_lines(path):
            for match in pattern.finditer(line):
                words = shlex.split(match.group(1).replace("\\", ""))
                commands.append([w for w in words if not w.startswith("[") and not w.endswith("]")])
    return commands


def test_every_command_in_the_readme_and_dockerfile_parses(monkeypatch):
    commands = _documented_commands()
    assert len(commands) >= 8 and any(c[0] == "download" for c in commands)
    parser = build_parser()
    monkeypatch.setattr(parser, "error", lambda message: pytest.fail(f"{message}: {commands}"))
    for argv in commands:
        if "--help" not in argv:
            parser.parse_args(argv)


def test_dockerfile_documents_a_server_reachable_from_outside_the_container_with_an_api_key():
    text = (REPO / "Dockerfile.dev").read_text()
    assert "CANARY_HOST=0.0.0.0" in text and "CANARY_API_KEY=" in text and "canary-server serve" in text
    assert re.search(r"docker run .*-p 8000:8000", text)
