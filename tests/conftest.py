"""Shared test fixtures. `model` is imported first so OpenBLAS is preloaded before MLX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import model  # noqa: F401  (preloads OpenBLAS before anything imports mlx)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# CI clones the repo with shared/ beside it; a developer checkout has ../shared too.
SHARED = REPO.parent / "shared"
ESPEAK_NEMO = SHARED / "models" / "espeak-tiny-en.nemo"
ESPEAK_CLIPS = SHARED / "models" / "espeak-tiny-en-clips"


def _require_espeak() -> None:
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")


@pytest.fixture(scope="session")
def espeak_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The espeak-trained tiny Canary-architecture model (NOT a real Canary), converted once per session."""
    _require_espeak()
    from convert import convert_nemo

    return convert_nemo(ESPEAK_NEMO, tmp_path_factory.mktemp("espeak") / "model")


@pytest.fixture(scope="session")
def espeak_model(espeak_dir: Path):
    return model.load(espeak_dir, dtype="float32")


@pytest.fixture(scope="session")
def espeak_nemo_transcripts() -> dict[str, str]:
    _require_espeak()
    return json.loads((ESPEAK_CLIPS / "nemo_transcripts.json").read_text())
