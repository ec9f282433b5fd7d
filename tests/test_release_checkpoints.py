"""The four released Canary checkpoints, as they really are (tests/fixtures/release, made with NeMo 3.0.0 itself).

Full-size structure: NeMo instantiated each family at its real dimensions from the training recipe and wrote every
state-dict key with shape and dtype, and the model_config.yaml it saves (no weights). Each manifest must go through
the converter's config validation, rule table and shape checks with nothing left over.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from canary_server.convert import config as convert_config
from canary_server.convert import mapping
from canary_server.convert.prompting import decoding
from canary_server.model.config import ModelConfig
from canary_server.model.config import family as family_of
from conftest import FIXTURES

RELEASE = FIXTURES / "release"
MANIFESTS = {  # family -> (main state-dict keys, bundled timestamps model keys)
    "canary-180m-flash": (808, None),
    "canary-1b-flash": (1406, None),
    "canary-1b-v2": (1510, 712),
    "canary-1b": (1606, None),
}


def _as_saved(cfg: dict) -> dict:
    """The manifests hold the config of a model instantiated (not saved) by NeMo: its tokenizers point at local
    dirs. `save_to()` registers each tokenizer's files as archive artifacts and writes `model_path: nemo:<uuid>_...`
    (reference §5.3); do the same here."""
    tok = cfg["tokenizer"]
    for i, sub in enumerate(tok["langs"].values() if tok["type"] == "agg" else [tok]):
        sub["model_path"] = f"nemo:{i:032x}_tokenizer.model"
    return cfg


def _state(keys: list) -> dict[str, np.ndarray]:
    """Zero-strided stand-ins of the right shape and dtype: a 1B-parameter state dict without the memory."""
    return {name: np.broadcast_to(np.zeros((), np.dtype(dtype)), tuple(shape)) for name, shape, dtype in keys}


@pytest.mark.parametrize("family", sorted(MANIFESTS))
def test_every_key_of_a_full_size_release_maps_through_the_rule_table(family):
    manifest = json.loads((RELEASE / "manifests" / f"{family}.json").read_text())
    n_keys, n_ctc_keys = MANIFESTS[family]
    state = _state(manifest["keys"])
    assert len(state) == n_keys == manifest["n_keys"]
    cfg = _as_saved(yaml.safe_load(manifest["model_config_yaml"]))
    assert cfg["transf_decoder"]["config_dict"]["vocab_size"] == "None"  # the text NeMo saves
    head = state[mapping.TIED_HEAD].shape[0]
    config = convert_config.build_config(
        cfg,
        tokenizer_vocab=manifest["tokenizer_vocab_size"],
        head_rows=head,
        source_file=f"{family}.nemo",
        dtype="float32",
        enc_dec_proj_present="encoder_decoder_proj.weight" in state,
    )
    mapped = mapping.map_state_dict(state, config)  # raises listing every unmatched / missing / mis-shaped key
    assert set(mapped) == set(mapping.expected_shapes(config))
    dropped = [k for k in state if mapping.map_key(k) is None]
    assert len(mapped) + len(dropped) == n_keys
    assert family_of(ModelConfig.from_dict(config)) == family
    if n_ctc_keys is None:
        return
    ts = manifest["timestamps_model"]
    ctc_state = _state(ts["keys"])
    assert len(ctc_state) == n_ctc_keys == ts["n_keys"]
    ctc_cfg = _as_saved(yaml.safe_load(ts["model_config_yaml"]))
    assert ctc_cfg["encoder"]["use_bias"] is False
    ctc = convert_config.build_ctc_config(
        ctc_cfg,
        tokenizer_vocab=manifest["tokenizer_vocab_size"],
        head_rows=ctc_state["decoder.decoder_layers.0.weight"].shape[0],
        sample_rate=16000,
    )
    assert ctc["encoder"]["use_bias"] is False
    ctc_mapped = mapping.map_ctc_state_dict(ctc_state, ctc)
    assert set(ctc_mapped) == set(mapping.ctc_expected_shapes(ctc))
    assert config["languages"] == list(convert_config.CANARY_1B_V2_LANGUAGES)


def test_the_release_manifests_decode_as_nemo_says_each_family_does():
    beams = {}
    for family in MANIFESTS:
        manifest = json.loads((RELEASE / "manifests" / f"{family}.json").read_text())
        beams[family] = decoding(yaml.safe_load(manifest["model_config_yaml"]))["beam_size"]
    assert beams == {"canary-180m-flash": 1, "canary-1b-flash": 1, "canary-1b-v2": 1, "canary-1b": 5}
