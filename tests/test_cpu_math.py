"""model/cpu_math.py: the arithmetic exp and the activations built on it, and the shift-and-add depthwise conv,
against MLX's own kernels and float64 NumPy."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from canary_server.model import backend, cpu_math
from canary_server.model.conformer import _depthwise_shift_add


@pytest.fixture
def values() -> np.ndarray:
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 1.5, 20.0, -20.0, 80.0, -80.0, 87.0, -87.0]
    return np.concatenate([rng.normal(0, 4, 20000), rng.uniform(-87, 87, 20000), edges]).astype(np.float32)


def test_exp_is_as_accurate_as_mlx_exp(values):
    exact = np.exp(values.astype(np.float64))
    ours = np.array(cpu_math.exp(mx.array(values)), dtype=np.float64)
    theirs = np.array(mx.exp(mx.array(values)), dtype=np.float64)
    rel = np.abs(ours - exact) / exact
    # float32 range reduction (x * log2(e)) costs precision as |x| grows, in MLX's kernel exactly as here
    assert rel[np.abs(values) < 20].max() < 1e-6
    assert rel.max() < 1e-5
    assert rel.max() <= np.max(np.abs(theirs - exact) / exact) * 1.01


def test_exp_saturates_without_inf_or_nan():
    out = np.array(cpu_math.exp(mx.array([-1e4, -200.0, 200.0, 1e4], dtype=mx.float32)))
    assert np.all(np.isfinite(out))
    assert out[0] < 1e-37 and out[1] < 1e-37
    assert out[2] > 1e37 and out[3] > 1e37


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_activations_equal_mlx_kernels(values, dtype):
    x = mx.array(values).astype(dtype)
    scores = mx.array(values[:40000].reshape(50, 800)).astype(dtype)
    masked = mx.where(mx.arange(800) < 600, scores, -10000.0).astype(dtype)
    results = {}
    for enabled in (True, False):
        with backend.forced(backend.CPU if enabled else backend.GPU):
            results[enabled] = [
                cpu_math.silu(x),
                cpu_math.sigmoid(x),
                cpu_math.softmax(scores),
                cpu_math.softmax(masked),
            ]
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    for ours, theirs in zip(results[True], results[False], strict=True):
        assert ours.dtype == theirs.dtype == dtype
        a, b = np.array(ours.astype(mx.float32)), np.array(theirs.astype(mx.float32))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    assert float(mx.max(results[True][3][:, 600:]).item()) < 1e-37  # masked scores get no weight


def test_enabled_follows_the_backend_switch():
    with backend.forced(None):
        assert cpu_math.enabled() == (mx.default_device() == mx.cpu)
    with backend.forced(backend.GPU):
        assert not cpu_math.enabled()
    with backend.forced(backend.CPU):
        assert cpu_math.enabled()


@pytest.mark.parametrize("shape", [(2, 250, 64, 8), (1, 251, 65, 8), (3, 7, 5, 4), (1, 1, 1, 2)])
def test_shift_add_depthwise_conv_equals_grouped_conv(shape):
    conv = nn.Conv2d(shape[-1], shape[-1], 3, stride=2, padding=1, groups=shape[-1])
    x = mx.random.normal(shape, key=mx.random.key(1))
    expected = conv(x)
    got = _depthwise_shift_add(x, conv)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-6)
