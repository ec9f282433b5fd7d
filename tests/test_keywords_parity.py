"""Keyword boosting equals NeMo 3.0.0's boosting tree (GPU-PB shallow fusion in the multitask beam decoder).

Goldens: tests/fixtures/boosting/golden.json, made by NeMo itself (make_boosting_fixtures.py): the random-weight
families and the espeak model, several phrase lists, beam 1 (NeMo's greedy with fusion) and 4, two alphas each.
Tokens must be equal; every case also stores NeMo's output without boosting, to show the goldens test something.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.model.boosting import UnspellablePhrase, build_tree
from canary_server.model.prompt import PromptSpec
from canary_server.pipeline.scheduler import ContinuousBatcher, WorkItem
from conftest import ESPEAK_CLIPS, FIXTURES

GOLDEN = Path(os.environ.get("KW_GOLDEN", FIXTURES / "boosting" / "golden.json"))
RANDOM = ["v1_agg", "flash_agg", "v2_unified"]


@cache
def golden() -> dict:
    return json.loads((GOLDEN).read_text())


def _cases(family: str) -> list[dict]:
    return golden()["families"][family]["cases"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, model.Canary]:
    root = tmp_path_factory.mktemp("kw")
    return {f: model.load(convert_nemo(FIXTURES / f / "model.nemo", root / f), dtype="float32") for f in RANDOM}


def _audio(family: str, c: dict) -> list[np.ndarray]:
    if family == "espeak":
        return [sf.read(ESPEAK_CLIPS / name, dtype="float32")[0] for name in c["clips"]]
    g = np.load(FIXTURES / family / "golden.npz")
    return [g[f"audio_{i}"] for i in golden()["families"][family]["audio"]]


def _generate(m: model.Canary, family: str, c: dict) -> list[list[int]]:
    kw = c["kwargs"]
    results = m.generate(
        _audio(family, c),
        source_lang=kw["source_lang"],
        target_lang=kw["target_lang"],
        batch_size=len(c["tokens"]),
        beam_size=c["beam_size"],
        keywords=c["phrases"],
        keywords_alpha=c["alpha"],
    )
    return [r.tokens for r in results]


def test_the_goldens_show_boosting_changing_nemo_outputs():
    changed = [c["name"] for f in golden()["families"].values() for c in f["cases"] if c["tokens"] != c["plain"]]
    assert len(changed) >= 10
    assert golden()["nemo_version"] == "3.0.0"


@pytest.mark.parametrize(("family", "case"), [(f, c["name"]) for f in RANDOM for c in _cases(f)])
def test_boosted_tokens_equal_nemo_on_the_random_weight_families(models, family, case):
    c = next(x for x in _cases(family) if x["name"] == case)
    assert _generate(models[family], family, c) == c["tokens"]


@pytest.mark.parametrize("case", [c["name"] for c in _cases("espeak")])
def test_boosted_tokens_equal_nemo_on_the_espeak_model(espeak_model, case):
    c = next(x for x in _cases("espeak") if x["name"] == case)
    assert _generate(espeak_model, "espeak", c) == c["tokens"]
