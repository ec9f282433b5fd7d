"""The default compute dtype, pinned per platform: float32 everywhere, Apple Silicon included.

Chosen from bench/dtype_eval.py's table (README "Compute dtype"): float32 is the only dtype that gave NeMo's tokens
on every NeMo fixture. float16 and bfloat16 stay available (`dtype=`, `--dtype`), guarded against overflow.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.pipeline.engine import load_model
from canary_server.server.settings import Settings
from conftest import FIXTURES


@pytest.mark.parametrize(
    ("platform", "metal"),
    [("darwin", True), ("darwin", False), ("linux", False), ("linux", True), ("win32", False)],
    ids=["apple-silicon-metal", "mac-without-metal", "linux-cpu", "linux-gpu", "windows"],
)
def test_the_default_compute_dtype_is_float32_on_every_platform(monkeypatch, platform, metal):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    assert model.default_dtype() == mx.float32


def test_auto_loads_float32_and_an_explicit_dtype_is_honoured(tmp_path):
    directory = convert_nemo(FIXTURES / "flash_agg" / "model.nemo", tmp_path / "m")
    assert Settings().dtype == "auto"
    auto = load_model(str(directory), dtype="auto")
    assert auto.dtype == mx.float32 and not auto.guards_overflow
    half = load_model(str(directory), dtype="float16")
    assert half.dtype == mx.float16 and half.guards_overflow
