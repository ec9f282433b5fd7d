"""Spoken-language detection: the model's language-ID slot against NeMo, the policy, and the whole pipeline.

The model part (`Canary.language_log_probs`) is the next-token distribution at the prompt's source-language slot.
NeMo references: the teacher-forced log-probs of the parity fixtures (their prompts pass that slot), and lid.json of
the espeak-trained multilingual model (NOT a real Canary: a tiny en/de/es/fr model whose training loss covered the
prompt, so its slot learned language ID). espeak-tiny-en was trained with the prompt masked: its slot is useless.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import canary_server
from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.model.audio import pad_batch
from canary_server.model.prompt import PromptSpec, language_slot_prefix
from canary_server.pipeline.language import LanguageChoice, LanguageDetection, decide
from conftest import ESPEAK_CLIPS, ESPEAK_MULTI_CLIPS, FIXTURES

FAMILIES = ["v1_agg", "flash_agg", "v2_unified"]
LOGPROB_TOL = 1e-3


def _lid() -> dict:
    path = ESPEAK_MULTI_CLIPS / "lid.json"
    if not path.is_file():
        pytest.skip(f"the multilingual espeak clips are not at {ESPEAK_MULTI_CLIPS}")
    return json.loads(path.read_text())["clips"]


def _slot(m: model.Canary, waves: list[np.ndarray]) -> np.ndarray:
    audio, lengths = pad_batch(waves)
    enc, enc_lens = m.encode(audio, lengths)
    return np.array(m.language_log_probs(enc, enc_lens))


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, model.Canary]:
    root = tmp_path_factory.mktemp("lid")
    return {f: model.load(convert_nemo(FIXTURES / f / "model.nemo", root / f), dtype="float32") for f in FAMILIES}


@pytest.fixture(scope="module")
def multi(espeak_multi_dir) -> model.Canary:
    return model.load(espeak_multi_dir, dtype="float32")


# ---- the model: NeMo parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_language_slot_equals_nemos_teacher_forced_log_probs_for_every_prompt_format(families, family):
    """canary (v1: after <|startoftranscript|>), canary2 aggregate and unified (after <|emo:undefined|>)."""
    m = families[family]
    meta = json.loads((FIXTURES / family / "golden.json").read_text())
    g = np.load(FIXTURES / family / "golden.npz")
    prefix = language_slot_prefix(m.tokenizer, m.config.prompt_format)
    lang_ids = [m.tokenizer.special_id(f"<|{lang}|>") for lang in m.languages]
    for case in meta["teacher_forced"]:
        assert case["ids"][: len(prefix)] == prefix  # NeMo's prompt passes the slot: its next row is ours
        ours = _slot(m, [g[f"audio_{case['audio']}"]])[0]
        nemo = g[f"tf_{case['name']}_logprobs"][len(prefix) - 1][lang_ids]
        np.testing.assert_allclose(ours, nemo, rtol=0, atol=LOGPROB_TOL, err_msg=case["name"])
        # Random weights with a -100 bias on every prompt special: the slot says nothing about the audio.
        assert ours.max() < -100


def test_every_candidate_language_shares_the_slot_prefix(families):
    for m in families.values():
        prefix = language_slot_prefix(m.tokenizer, m.config.prompt_format)
        for lang in m.languages:
            assert m.prompt_ids(PromptSpec(lang, lang))[: len(prefix)] == prefix


def test_a_unified_tokenizers_prompt_flags_are_not_languages(families):
    assert families["v2_unified"].languages == ["de", "en", "es", "fr"]  # not <|pnc|>, <|itn|>


def test_the_english_espeak_models_slot_equals_nemo_and_knows_nothing_of_languages(espeak_model):
    """Trained with the prompt masked out of the loss: <|en|> gets ~1e-4 at the slot (text tokens win)."""
    meta = json.loads((FIXTURES / "espeak" / "golden.json").read_text())
    g = np.load(FIXTURES / "espeak" / "golden.npz")
    wave, _ = sf.read(ESPEAK_CLIPS / "clip00.wav", dtype="float32")
    ours = _slot(espeak_model, [wave])[0]
    prefix = language_slot_prefix(espeak_model.tokenizer, "canary2")
    assert meta["teacher_forced"][0]["ids"][: len(prefix)] == prefix
    nemo = g["tf_clip00_logprobs"][len(prefix) - 1][espeak_model.tokenizer.special_id("<|en|>")]
    assert espeak_model.languages == ["en"]
    assert abs(ours[0] - nemo) < LOGPROB_TOL and np.exp(ours[0]) < 1e-3


def test_the_multilingual_espeak_model_matches_nemos_lid_on_every_clip_alone_and_batched(multi):
    lid = _lid()
    names = sorted(lid)
    waves = [sf.read(ESPEAK_MULTI_CLIPS / n, dtype="float32")[0] for n in names]
    batched = _slot(multi, waves)
    for i, name in enumerate(names):
        nemo = np.log([lid[name]["probs"][lang] for lang in multi.languages])
        alone = _slot(multi, [waves[i]])[0]
        for ours in (alone, batched[i]):
            np.testing.assert_allclose(ours, nemo, rtol=0, atol=LOGPROB_TOL, err_msg=name)
            assert multi.languages[int(np.argmax(ours))] == lid[name]["argmax"] == name[:2]


# ---- the policy ------------------------------------------------------------------------------------------
def test_detection_renormalises_over_the_candidates_and_falls_back_below_the_threshold():
    scores = {"en": -1.0, "de": -0.5, "fr": -9.0, "es": -30.0}  # full-vocabulary log-probs
    d = decide(LanguageDetection(("en", "de", "fr"), "en", 0.5), scores)
    assert d.language == "de" and d.confident and d.spoken == "de"
    assert sum(d.probabilities.values()) == pytest.approx(1.0) and set(d.probabilities) == {"en", "de", "fr"}
    assert d.probability == pytest.approx(np.exp(-0.5) / (np.exp(-1) + np.exp(-0.5) + np.exp(-9)))
    unsure = decide(LanguageDetection(("en", "de", "fr"), "en", 0.7), scores)
    assert (unsure.language, unsure.confident, unsure.spoken) == ("en", False, "de")
    no_fallback = decide(LanguageDetection(("de", "fr"), None, 0.99999), scores)
    assert (no_fallback.language, no_fallback.confident) == ("de", False)


def test_a_decided_choice_sets_the_source_and_keeps_a_translation_target():
    spec = PromptSpec("en", "en", pnc=False, context="x")
    transcribe = LanguageChoice(LanguageDetection(("en", "de"), "en", 0.5))
    transcribe.decide({"en": -3.0, "de": -0.1})
    assert transcribe.apply(spec) == PromptSpec("de", "de", pnc=False, context="x")
    translate = LanguageChoice(LanguageDetection(("en", "de"), "en", 0.5, target="en"))
    translate.decide({"en": -3.0, "de": -0.1})
    assert translate.apply(spec) == PromptSpec("de", "en", pnc=False, context="x")


# ---- the pipeline on the multilingual espeak model --------------------------------------------------------
@pytest.fixture(scope="module")
def multi_api(espeak_multi_dir):
    with canary_server.load(espeak_multi_dir, dtype="float32", chunk_seconds=5.0) as m:
        yield m


def test_language_auto_decodes_every_clip_in_its_detected_language_exactly_as_nemo(multi_api):
    lid = _lid()
    nemo = json.loads((ESPEAK_MULTI_CLIPS / "nemo_transcripts.json").read_text())
    names = sorted(nemo)
    results = multi_api.transcribe([str(ESPEAK_MULTI_CLIPS / n) for n in names], source_lang="auto", batch_size=12)
    for name, r in zip(names, results, strict=True):
        lang = name[:2]
        assert (r.source_language, r.language, r.task) == (lang, lang, "transcribe"), name
        assert r.text == nemo[name].strip(), name
        d = r.detected_language
        assert d.confident and d.probability == pytest.approx(lid[name]["probs_renormalized_over_4"][lang], abs=1e-4)


def test_the_first_piece_of_a_long_file_decides_its_language(multi_api):
    """de (4.0 s), a pause, fr (3.9 s); pieces of at most 5 s: the German start decides for both pieces."""
    nemo = json.loads((ESPEAK_MULTI_CLIPS / "nemo_transcripts.json").read_text())
    de, _ = sf.read(ESPEAK_MULTI_CLIPS / "de_00.wav", dtype="float32")
    fr, _ = sf.read(ESPEAK_MULTI_CLIPS / "fr_01.wav", dtype="float32")
    long = np.concatenate([de, np.zeros(24000, np.float32), fr])
    r = multi_api.transcribe(long, source_lang="auto")
    assert r.source_language == "de" and r.segments[0].text == nemo["de_00.wav"].strip()
    assert r.segments[0].end < 5.0 < r.duration  # two pieces (the French one, decoded as German, gave no text)
    alone = multi_api.transcribe(fr, source_lang="auto")
    assert alone.source_language == "fr"


def test_detection_picks_only_among_the_requested_languages(multi_api):
    de = str(ESPEAK_MULTI_CLIPS / "de_01.wav")
    assert multi_api.transcribe(de, source_lang="auto").source_language == "de"
    narrowed = multi_api.pipeline.options(None, languages=["fr", "es"])
    assert narrowed.detect.candidates == ("es", "fr")  # the model's order
    result = multi_api._run(multi_api.pipeline.transcribe(de, narrowed))
    assert result.source_language in ("es", "fr") and set(result.detected_language.probabilities) == {"es", "fr"}
    assert multi_api.pipeline.options(None, languages=["fr"]).detect is None  # one candidate: no detection
    assert multi_api.pipeline.options(None, languages=["fr"]).source_lang == "fr"


def test_the_command_line_detects_with_language_auto(espeak_multi_dir, capsys):
    from canary_server.cli import main

    nemo = json.loads((ESPEAK_MULTI_CLIPS / "nemo_transcripts.json").read_text())
    names = ["de_00.wav", "fr_02.wav"]
    files = [str(ESPEAK_MULTI_CLIPS / n) for n in names]
    assert main(["transcribe", *files, "--model", str(espeak_multi_dir), "--language", "auto", "--format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["text"], x["languages"]) for x in lines] == [(nemo[n].strip(), [{"code": n[:2]}]) for n in names]
