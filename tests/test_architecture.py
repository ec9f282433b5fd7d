"""The package layout and its layers: what installs, under which names, and who may import whom."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _installed_layout(target: Path) -> Path:
    """The `canary_server` package as a wheel installs it (pyproject's package-dir table), without building one."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    for package in setuptools["packages"]:
        parts = package.split(".")
        for depth in range(len(parts), 0, -1):
            source = setuptools["package-dir"].get(".".join(parts[:depth]))
            if source is not None:
                folder = REPO / source / Path(*parts[depth:])
                break
        dest = target / Path(*parts)
        dest.mkdir(parents=True, exist_ok=True)
        for module in folder.glob("*.py"):
            shutil.copy(module, dest / module.name)
    return target


def test_every_source_folder_is_installed_under_the_canary_server_namespace():
    setuptools = PYPROJECT["tool"]["setuptools"]
    packages, folders = set(setuptools["packages"]), setuptools["package-dir"]
    assert all(name == "canary_server" or name.startswith("canary_server.") for name in packages)
    for name, folder in folders.items():
        for init in (REPO / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(REPO / folder).parts
            assert ".".join([name, *sub]) in packages, f"{init.parent} is not installed"


def test_no_top_level_model_server_or_convert_module_is_importable_outside_the_repo(tmp_path):
    code = "import importlib.util as u; print([n for n in ('model', 'server', 'convert') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import canary_server.model, canary_server.server.app, canary_server.cli; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def _lint(layout: Path, cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(layout), "PATH": str(lint.parent)},
        capture_output=True,
        text=True,
    )


def test_the_import_contracts_hold(tmp_path):
    """import-linter's contracts in pyproject.toml (layers; no cycles inside a package), on the installed layout."""
    result = _lint(_installed_layout(tmp_path / "site"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    layout = _installed_layout(tmp_path / "site")
    (layout / "canary_server" / "model" / "upward.py").write_text("import canary_server.pipeline.engine\n")
    (layout / "canary_server" / "model" / "cycle_a.py").write_text("from canary_server.model import cycle_b\n")
    (layout / "canary_server" / "model" / "cycle_b.py").write_text("from canary_server.model import cycle_a\n")
    result = _lint(layout, tmp_path)
    assert result.returncode != 0
    assert "canary_server.model.upward -> canary_server.pipeline.engine" in result.stdout
    assert "cycle_a" in result.stdout and "2 broken" in result.stdout


def test_the_two_front_doors_never_import_each_other(tmp_path):
    layout = _installed_layout(tmp_path / "site")
    (layout / "canary_server" / "wyoming_server" / "sideways.py").write_text("import canary_server.server.errors\n")
    result = _lint(layout, tmp_path)
    assert result.returncode != 0
    assert "canary_server.wyoming_server.sideways -> canary_server.server.errors" in result.stdout
