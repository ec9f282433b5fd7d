"""scripts/setup.sh picks a Python MLX can run (3.10+) even where `python3` is 3.9, as on a fresh Mac (issue 18).

`setup.sh --check` runs the same interpreter search as a real set-up and only reports it; the real install path runs
in CI itself (`.ci/run` is `setup.sh --dev`). Each test gives the script a PATH of symlinks built in a temporary
folder, so that exactly the interpreters the test names are there."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SETUP = REPO / "scripts" / "setup.sh"
TOOLS = ("uname", "dirname")  # the commands setup.sh --check needs besides Python


def _python39() -> str:
    """A real Python 3.9 executable (pyenv's, a system one), or skip: a pyenv shim of 3.9 may be installed but not
    enabled, so the binaries themselves are looked for."""
    root = os.environ.get("PYENV_ROOT") or os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".pyenv")
    candidates = sorted(glob.glob(f"{root}/versions/3.9*/bin/python3.9"))
    candidates += [p for p in ("/usr/bin/python3.9", "/usr/local/bin/python3.9", shutil.which("python3.9")) if p]
    for candidate in candidates:
        proc = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
        if proc.returncode == 0 and proc.stdout.strip() == b"(3, 9)":
            return candidate
    pytest.skip("no Python 3.9 interpreter on this machine")


def _new_python() -> str:
    """The interpreter this venv was made from (3.10+)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _bin(tmp_path: Path, **links: str) -> Path:
    """A folder with the tools and `links` (name -> target) for PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in TOOLS:
        (folder / tool).symlink_to(shutil.which(tool))
    for name, target in links.items():
        (folder / name).symlink_to(target)
    return folder


def _check(tmp_path: Path, path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {"PATH": str(path), "HOME": str(tmp_path / "home"), **env}
    return subprocess.run(["/bin/bash", str(SETUP), "--check"], env=environ, capture_output=True, text=True, timeout=60)


def test_setup_skips_a_python_3_9_first_on_the_path_for_a_newer_one(tmp_path):
    path = _bin(tmp_path, python3=_python39(), **{"python3.11": _new_python()})
    proc = _check(tmp_path, path)
    assert proc.returncode == 0, proc.stderr
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert proc.stdout.strip() == f"setup.sh would use Python {ver} at {path / 'python3.11'} (found on PATH)"


def test_setup_takes_python3_when_it_is_new_enough(tmp_path):
    path = _bin(tmp_path, python3=_new_python())
    proc = _check(tmp_path, path)
    assert proc.returncode == 0 and proc.stdout.endswith(f"at {path / 'python3'} (python3 on PATH)\n"), proc


def test_setup_with_only_python_3_9_says_it_would_get_python_through_uv(tmp_path):
    path = _bin(tmp_path, python3=_python39())
    proc = _check(tmp_path, path)
    assert proc.returncode == 0, proc.stderr
    assert "found no Python 3.10+ (python3 is 3.9)" in proc.stdout
    assert "python3 -m pip install --user uv" in proc.stdout and "uv python install 3.12" in proc.stdout


def test_setup_uses_the_python_that_uv_finds(tmp_path):
    path = _bin(tmp_path, python3=_python39())
    uv = path / "uv"
    uv.write_text(f'#!/bin/sh\n[ "$1 $2" = "python find" ] && echo {_new_python()}\n')
    uv.chmod(0o755)
    proc = _check(tmp_path, path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"at {_new_python()} (found by uv ({uv}))"), proc.stdout


def test_python_env_var_chooses_the_interpreter_and_an_old_one_is_refused_clearly(tmp_path):
    path = _bin(tmp_path, python3=_python39(), **{"python3.11": _new_python()})
    proc = _check(tmp_path, path, PYTHON=_new_python())
    assert proc.returncode == 0 and proc.stdout.endswith(f"(PYTHON={_new_python()})\n"), proc
    old = _check(tmp_path, path, PYTHON="python3")
    assert old.returncode == 2 and old.stdout == ""
    assert old.stderr == "setup.sh: PYTHON=python3 is Python 3.9; canary-server (MLX) needs 3.10 or newer\n"
    missing = _check(tmp_path, path, PYTHON="python9")
    assert missing.returncode == 2 and "PYTHON=python9: no such interpreter" in missing.stderr
