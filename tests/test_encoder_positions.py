"""The encoder's cached position projections (ConformerEncoder.projected_positions) equal projecting every call."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from canary_server.model import conformer
from canary_server.model.config import EncoderConfig


def _encoder() -> conformer.ConformerEncoder:
    mx.random.seed(3)
    enc = conformer.ConformerEncoder(EncoderConfig(n_layers=2, d_model=64, n_heads=4, subsampling_conv_channels=16))
    mx.eval(enc.parameters())
    return enc


def _direct(enc: conformer.ConformerEncoder, t: int) -> list[np.ndarray]:
    table = conformer.rel_positional_encoding(t, enc.cfg.d_model)
    return [np.array(layer.self_attn.linear_pos(table)) for layer in enc.layers]


def test_slices_of_the_cache_equal_the_direct_projection_for_every_length():
    enc = _encoder()
    for t in (63, 200, 5, 64, 65, 130):  # a longer one grows the cache, shorter ones slice it
        got = [np.array(p) for p in enc.projected_positions(t, mx.float32)]
        for a, b in zip(got, _direct(enc, t), strict=True):
            assert a.shape == (2 * t - 1, 64)
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert enc.__dict__["_pos_cache"][0] == 256  # 200 frames, rounded up to the growth step


def test_new_weights_are_seen_and_the_cache_is_not_a_parameter():
    enc = _encoder()
    enc.projected_positions(40, mx.float32)
    assert "_pos_cache" not in dict(enc.items())
    layer = enc.layers[1].self_attn
    layer.linear_pos.weight = layer.linear_pos.weight * 2.0
    got = np.array(enc.projected_positions(40, mx.float32)[1])
    np.testing.assert_allclose(got, _direct(enc, 40)[1], rtol=1e-6, atol=1e-6)


def test_long_inputs_are_projected_directly():
    enc = _encoder()
    t = conformer.POS_CACHE_MAX + 3
    got = np.array(enc.projected_positions(t, mx.float32)[0])
    np.testing.assert_allclose(got, _direct(enc, t)[0], rtol=1e-6, atol=1e-6)
    assert "_pos_cache" not in enc.__dict__
