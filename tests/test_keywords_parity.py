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
    return golden()["families"].get(family, {"cases": []})["cases"]  # a missing family fails the test below


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
        batch_size=c["batch_size"],  # beam > 1: one item at a time (NeMo's batched beam search mixes items)
        beam_size=c["beam_size"],
        keywords=c["phrases"],
        keywords_alpha=c["alpha"],
    )
    return [r.tokens for r in results]


def test_the_goldens_cover_the_aggregate_and_unified_tokenizers_and_the_trained_model():
    # every family's prompt format and tokenizer: canary (v1_agg), canary2 aggregate + projection (flash_agg),
    # unified (v2_unified), and the trained espeak model
    assert {"v1_agg", "flash_agg", "v2_unified", "espeak"} <= set(golden()["families"])


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


@pytest.mark.parametrize("beam", [1, 4])
def test_rows_with_different_keyword_lists_and_none_share_one_batch_each_as_if_alone(models, beam):
    """One decoder loop, rows joining at different steps with their own trees (two lists, one of them twice, and
    none): every item's tokens equal NeMo-style generate() alone with its own list."""
    m = models["v1_agg"]
    single, multi = (
        next(c["phrases"] for c in _cases("v1_agg") if c["name"].startswith(n)) for n in ("single", "multi")
    )
    lists = [single, None, multi, single]
    g = np.load(FIXTURES / "v1_agg" / "golden.npz")
    waves = [g[f"audio_{i}"] for i in (1, 0, 2, 1)]
    jobs = list(zip(waves, lists, strict=True))
    alone = [m.generate(w, beam_size=beam, keywords=kw, keywords_alpha=5.0).tokens for w, kw in jobs]
    assert len({tuple(a) for a in alone}) > 2  # the lists do change the outputs
    batcher = ContinuousBatcher(m, max_batch=3, encode_seconds=2.5, beam_size=beam, keywords_alpha=5.0)
    items = [WorkItem(w, PromptSpec("en", "en", keywords=tuple(kw or ())), tag=i) for i, (w, kw) in enumerate(jobs)]
    batcher.submit(items)
    done = []
    while len(batcher):
        done += batcher.step()
    assert sorted(it.tag for it in done) == [0, 1, 2, 3]
    assert [it.result.tokens for it in items] == alone
    assert len(batcher._decoder(0 if beam == 1 else beam).boosts.trees) == 0  # nothing kept after the rows left


def test_a_phrase_the_tokenizer_cannot_spell_is_named(models):
    m = models["v1_agg"]
    with pytest.raises(UnspellablePhrase, match="<\\|endoftext\\|>"):
        m.keyword_tree(["hello <|endoftext|>"], "en")
    tree = build_tree(m.tokenizer, ["a", "a"], "en", m.config.decoder.vocab_size)
    assert tree.phrases == ("a",)  # duplicates count once, as NeMo keys phrases by text
    assert m.keyword_tree(("a",), "en") is m.keyword_tree(["a"], "en")  # built once per content
