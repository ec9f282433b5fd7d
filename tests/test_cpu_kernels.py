"""model/cpu_kernels.py: the fused CPU kernels against the MLX compositions they replace, the encoder with and
without them, and when they are (not) used: a stale build, the GPU paths, the off switch, no build at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from canary_server.model import backend, cpu_kernels
from canary_server.model.config import EncoderConfig
from canary_server.model.conformer import (
    BatchNorm,
    ConformerConvolution,
    ConformerEncoder,
    RelPositionMultiHeadAttention,
    _depthwise_shift_add_1d,
    rel_positional_encoding,
)
from canary_server.model.prompt import PromptSpec

loaded = pytest.mark.skipif(cpu_kernels.status() != "loaded", reason=f"CPU kernels: {cpu_kernels.status()}")


@pytest.fixture
def kernels_off():
    previous = cpu_kernels.set_enabled(False)
    yield
    cpu_kernels.set_enabled(previous)


def _close(a: mx.array, b: mx.array, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=rtol, atol=atol)


def test_the_kernels_are_built_where_a_compiler_and_nanobind_are():
    """setup.sh builds them on Linux: with g++ and nanobind present, a missing or stale build is a failure here,
    not a silent fall back to the slower compositions."""
    if not sys.platform.startswith("linux") or shutil.which("g++") is None:
        pytest.skip("no g++ here: the MLX compositions run")
    pytest.importorskip("nanobind")
    if os.environ.get(cpu_kernels.ENV_OFF):
        pytest.skip(f"{cpu_kernels.ENV_OFF} is set")
    assert cpu_kernels.status() == "loaded"


@loaded
def test_silu_equals_mlx_silu_on_any_layout():
    rng = np.random.default_rng(0)
    x = mx.array(np.concatenate([rng.normal(0, 4, 4099), [0.0, -0.0, 87.0, -87.0, 200.0, -200.0]]).astype(np.float32))
    _close(cpu_kernels.silu(x), nn.silu(x))
    m = mx.array(rng.normal(0, 3, (3, 37, 11)).astype(np.float32)).transpose(2, 0, 1)  # not row-contiguous
    _close(cpu_kernels.silu(m), nn.silu(m))


@loaded
def test_glu_mask_equals_split_sigmoid_and_masking():
    rng = np.random.default_rng(1)
    x = mx.array(rng.normal(0, 3, (2, 13, 2 * 37)).astype(np.float32))
    valid = mx.arange(13)[None, :] < mx.array([13, 5])[:, None]
    a, gate = mx.split(x, 2, axis=-1)
    want = mx.where(valid[..., None], a * mx.sigmoid(gate), 0.0)
    _close(cpu_kernels.glu_mask(x, valid), want)
    _close(cpu_kernels.glu_mask(x, None), a * mx.sigmoid(gate))


@loaded
@pytest.mark.parametrize(("t", "k", "bias"), [(63, 9, True), (4, 9, True), (40, 31, False), (1, 3, True)])
def test_dwconv_affine_silu_equals_the_conv_batchnorm_silu_composition(t, k, bias):
    rng = np.random.default_rng(k + t)
    c = 24
    conv = nn.Conv1d(c, c, k, padding=(k - 1) // 2, groups=c, bias=bias)
    bn = BatchNorm(c)
    for name in BatchNorm.STATS:
        bn[name] = mx.array(rng.uniform(0.5, 1.5, c).astype(np.float32))
    x = mx.array(rng.normal(0, 1, (2, t, c)).astype(np.float32))
    want = nn.silu(bn(_depthwise_shift_add_1d(x, conv)))
    taps = mx.contiguous(conv.weight[:, :, 0].T)
    scale, shift = bn.scale_shift()
    got = cpu_kernels.dwconv_affine_silu(x, taps, scale, shift, conv.bias if bias else None)
    _close(got, want, rtol=1e-5, atol=2e-6)


@loaded
def test_layer_norm_equals_mlx_layer_norm():
    rng = np.random.default_rng(2)
    norm = nn.LayerNorm(1027, eps=1e-5)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, 1027).astype(np.float32))
    norm.bias = mx.array(rng.normal(0, 1, 1027).astype(np.float32))
    x = mx.array((rng.normal(3, 2, (3, 7, 1027))).astype(np.float32))
    _close(cpu_kernels.layer_norm(x, norm.weight, norm.bias, norm.eps), norm(x), rtol=1e-5, atol=1e-5)


@loaded
@pytest.mark.parametrize(
    ("d_model", "heads", "t", "lengths"),
    [(64, 4, 29, [29, 17, 1]), (128, 2, 29, [29, 17, 1]), (256, 4, 63, [63]), (128, 4, 130, [130, 97, 12, 40]),
     (64, 2, 1, [1]), (64, 2, 2, [2, 1])],
)  # fmt: skip
@pytest.mark.parametrize("isa", cpu_kernels.PACKED_ISAS)
def test_relative_attention_with_the_kernel_equals_the_composition(kernels_off, d_model, heads, t, lengths, isa):
    """The kernels do NeMo's two score products, rel_shift, scaling, masking, softmax and weighted sum: the attention
    module's output with them equals the composition's, padded batch rows (all zero weights) included. Head size 16:
    `rel_softmax`; 32 and 64: `rel_attention` (each build of the packed matmul the CPU runs), with several 12-row
    blocks and 32-key panels at 130 frames."""
    if cpu_kernels.packed_supported() and isa not in PACKED_ISAS:
        pytest.skip(f"this CPU has no {isa}")
    previous = cpu_kernels.set_packed_isa(isa)
    rng = np.random.default_rng(3)
    d_k = d_model // heads
    att = RelPositionMultiHeadAttention(d_model, heads)
    att.pos_bias_u = mx.array(rng.normal(0, 1, (heads, d_k)).astype(np.float32))
    att.pos_bias_v = mx.array(rng.normal(0, 1, (heads, d_k)).astype(np.float32))
    x = mx.array(rng.normal(0, 1, (len(lengths), t, d_model)).astype(np.float32))
    valid = mx.arange(t)[None, :] < mx.array(lengths)[:, None]
    mask = ~(valid[:, None, :, None] & valid[:, None, None, :])
    pos = att.project_positions(rel_positional_encoding(t, d_model))
    with backend.forced(backend.CPU):
        want = att(x, pos, mask, valid)  # kernels off: the composition
        cpu_kernels.set_enabled(True)
        assert cpu_kernels.rel_attention_usable(d_k, x) == (d_k % 32 == 0 and cpu_kernels.packed_supported())
        got = att(x, pos, mask, valid)
    cpu_kernels.set_packed_isa(previous)
    _close(got, want, rtol=1e-5, atol=2e-6)


@loaded
def test_conv_module_with_the_kernels_equals_the_composition(kernels_off):
    rng = np.random.default_rng(4)
    conv = ConformerConvolution(32, 9)
    for name in BatchNorm.STATS:
        conv.batch_norm[name] = mx.array(rng.uniform(0.5, 1.5, 32).astype(np.float32))
    x = mx.array(rng.normal(0, 1, (2, 21, 32)).astype(np.float32))
    pad_mask = (mx.arange(21)[None, :] < mx.array([21, 12])[:, None])[..., None]
    with backend.forced(backend.CPU):
        want = conv(x, pad_mask)
        cpu_kernels.set_enabled(True)
        got = conv(x, pad_mask)
        # new weights are seen: the cached taps and BatchNorm constants follow them
        conv.batch_norm.weight = conv.batch_norm.weight * 2
        got2 = conv(x, pad_mask)
        cpu_kernels.set_enabled(False)
        want2 = conv(x, pad_mask)
    _close(got, want, atol=2e-6)
    _close(got2, want2, atol=2e-6)


@loaded
@pytest.mark.parametrize("factor", [8, 4, 2])
def test_the_encoder_with_the_kernels_equals_the_compositions(kernels_off, factor):
    """Subsampling (every stride-2 conv, its masks and ReLUs), LayerNorms, attention, conv module, FF: padded rows
    and a clip shorter than the conv kernels included."""
    cfg = EncoderConfig(feat_in=32, n_layers=2, d_model=64, n_heads=4, subsampling_factor=factor,
                        subsampling_conv_channels=16)  # fmt: skip
    mx.random.seed(5)
    enc = ConformerEncoder(cfg)
    feats = mx.random.normal((3, 161, 32))
    lengths = mx.array([161, 90, 7])
    with backend.forced(backend.CPU):
        want, want_len = enc(feats, lengths)
        cpu_kernels.set_enabled(True)
        got, got_len = enc(feats, lengths)
    assert np.array_equal(np.array(got_len), np.array(want_len))
    _close(got, want, rtol=1e-5, atol=1e-5)


@loaded
def test_the_gpu_paths_and_other_dtypes_do_not_use_the_kernels():
    x = mx.zeros((2, 3))
    assert cpu_kernels.usable(x)
    assert not cpu_kernels.usable(x.astype(mx.bfloat16))
    with backend.forced(backend.GPU):
        assert not cpu_kernels.usable(x)


@loaded
def test_the_kernels_split_between_two_threads_give_the_values_of_one():
    """Inputs large enough for the two threads (from 32768 output values) give, row by row, exactly what the same
    kernel gives for that row alone (one thread), and what the composition gives: the split changes nothing."""
    rng = np.random.default_rng(11)
    x = mx.array(rng.normal(0, 3, (96, 1027)).astype(np.float32))
    w, b = (mx.array(rng.normal(1, 0.2, 1027).astype(np.float32)) for _ in range(2))
    ln = cpu_kernels.layer_norm(x, w, b, 1e-5)
    g = cpu_kernels.glu_mask(x[:, :1026], mx.arange(96) < 70)
    s = cpu_kernels.silu(x)
    taps, scale, shift, bias = (mx.array(rng.normal(0, 1, shape).astype(np.float32)) for shape in
                                ((9, 1027), (1027,), (1027,), (1027,)))  # fmt: skip
    dw = cpu_kernels.dwconv_affine_silu(x.reshape(3, 32, 1027), taps, scale, shift, bias)
    for r in (0, 47, 48, 95):
        assert mx.array_equal(ln[r], cpu_kernels.layer_norm(x[r : r + 1], w, b, 1e-5)[0])
        assert mx.array_equal(g[r], cpu_kernels.glu_mask(x[r : r + 1, :1026], mx.array([r < 70]))[0])
        assert mx.array_equal(s[r], cpu_kernels.silu(x[r]))
    last = cpu_kernels.dwconv_affine_silu(x.reshape(3, 32, 1027)[2:], taps, scale, shift, bias)
    assert mx.array_equal(dw[2], last[0])
    norm = nn.LayerNorm(1027, eps=1e-5)
    norm.weight, norm.bias = w, b
    _close(ln, norm(x), rtol=1e-5, atol=1e-4)
    _close(s, nn.silu(x))


@loaded
@pytest.mark.parametrize(
    ("t", "f", "c"), [(501, 128, 256), (37, 80, 64), (1, 9, 64), (37, 80, 16), (1, 9, 8), (3000, 128, 32)]
)
@pytest.mark.parametrize("isa", ["best", "avx2"])
def test_the_first_two_subsampling_convs_in_one_pass_equal_the_two_kernels(t, f, c, isa):
    """subsample_conv0_dw (the first conv's frames never in memory) gives exactly subsample_conv0 then depthwise_s2:
    full, shorter and one-frame rows, tiny and 30 s inputs (split between the threads), with its AVX-512 loops
    (channels in multiples of 64, where the CPU has it) and its C++ ones (other channel counts, or turned off with
    the packed matmul's AVX-512 build)."""
    previous = cpu_kernels.set_packed_isa(None if isa == "best" else isa)
    try:
        _first_two_convs_equal_the_two_kernels(t, f, c)
    finally:
        cpu_kernels.set_packed_isa(previous)


def _first_two_convs_equal_the_two_kernels(t: int, f: int, c: int) -> None:
    rng = np.random.default_rng(t + c)
    x = mx.array(rng.normal(0, 1, (3, t, f)).astype(np.float32))
    w0, w1 = (mx.array(rng.normal(0, 1, (3, 3, c)).astype(np.float32)) for _ in range(2))
    b0, b1 = (mx.array(rng.normal(0, 1, (c,)).astype(np.float32)) for _ in range(2))
    len0 = mx.array([t, max(1, t // 3), 1], dtype=mx.int32)
    len1 = (len0 - 1) // 2 + 1
    len2 = (len1 - 1) // 2 + 1
    want = cpu_kernels.depthwise_s2(cpu_kernels.subsample_conv0(x, w0, b0, len0, len1), w1, b1, len1, len2, False)
    got = cpu_kernels.subsample_conv0_dw(x, w0, b0, w1, b1, len0, len1, len2)
    assert got.shape == want.shape
    assert mx.array_equal(got, want)


@loaded
@pytest.mark.parametrize(
    ("b", "h", "length", "d", "mask"),
    [(3, 8, 128, 128, "positions"), (1, 8, 63, 128, None), (5, 2, 7, 12, "one row"), (2, 4, 20, 16, "all masked")],
)
def test_decode_attention_equals_mlx_attention(b, h, length, d, mask):
    """One query per row: MLX's scaled_dot_product_attention, with a self-attention mask by position (NeMo's
    NEG_INF), none, one mask row for the batch, and rows with every position masked (the composition's result)."""
    rng = np.random.default_rng(b * length)
    q, k, v = (mx.array(rng.normal(0, s, shape).astype(np.float32))
               for s, shape in ((3, (b, h, 1, d)), (1, (b, h, length, d)), (1, (b, h, length, d))))  # fmt: skip
    if mask == "positions":
        pos = mx.array(rng.integers(0, length, b))
        m = mx.where(mx.arange(length)[None, :] <= pos[:, None], 0.0, -10000.0)[:, None, None, :]
    elif mask == "one row":
        m = mx.where(mx.arange(length) < 4, 0.0, -10000.0)[None, None, None, :]
    elif mask == "all masked":
        m = mx.full((b, 1, 1, length), -10000.0)
    else:
        m = None
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=m)
    _close(cpu_kernels.decode_attention(q, k, v, m, d**-0.5), want, rtol=1e-5, atol=2e-6)
    with backend.forced(backend.CPU):
        _close(cpu_kernels.attention(q, k, v, d**-0.5, m), want, rtol=1e-5, atol=2e-6)


@loaded
def test_attention_leaves_other_shapes_to_mlx(monkeypatch):
    """Several queries per row, a mask per head, or one that does not match the keys: MLX's attention, not the
    kernel (which would refuse them)."""
    calls = []
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a: calls.append(a))
    rng = np.random.default_rng(1)
    q1, q3 = (mx.array(rng.normal(0, 1, (2, 4, t, 8)).astype(np.float32)) for t in (1, 3))
    k = mx.array(rng.normal(0, 1, (2, 4, 5, 8)).astype(np.float32))
    with backend.forced(backend.CPU):
        for q, m in ((q3, None), (q1, mx.zeros((2, 4, 1, 5))), (q1, mx.zeros((2, 1, 1, 1)))):
            want = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.3, mask=m)
            _close(cpu_kernels.attention(q, k, k, 0.3, m), want)
        assert not calls
        cpu_kernels.attention(q1, k, k, 0.3, mx.zeros((2, 1, 1, 5)))  # one query per row, a mask per row: the kernel
    assert len(calls) == 1


@loaded
def test_decoder_steps_with_the_attention_kernel_equal_the_composition(espeak_model, kernels_off):
    """A batch of rows with different encoder lengths (padded cross-attention) and prompt positions decodes the same
    tokens and log-probs with the kernel (self- and cross-attention of each step) as with MLX's attention."""
    from canary_server.model.batch_decoder import BatchDecoder, Sequence

    rng = np.random.default_rng(7)
    hidden = espeak_model.config.decoder.hidden_size
    encs = [mx.array(rng.normal(0, 1, (t, hidden)).astype(np.float32)) for t in (30, 11, 23)]
    prompt = espeak_model.prompt_ids(PromptSpec("en", "en"))

    def decode() -> list[tuple[list[int], list[float]]]:
        bd = BatchDecoder(espeak_model, compile=False)
        seqs = [Sequence(e, e.shape[0], prompt, 8 + 3 * i) for i, e in enumerate(encs)]
        bd.add(seqs[:2])
        bd.step()
        bd.add(seqs[2:])  # joins at another position
        while len(bd):
            bd.step()
        return [(s.tokens, s.logprobs) for s in seqs]

    with backend.forced(backend.CPU):
        want = decode()
        cpu_kernels.set_enabled(True)
        got = decode()
    for (tw, lw), (tg, lg) in zip(want, got, strict=True):
        assert tg == tw
        np.testing.assert_allclose(lg, lw, atol=1e-5)


def _fresh_status(tmp_path, env: dict[str, str], setup: str = "") -> str:
    """cpu_kernels.status() in a new process (the module loads once per process)."""
    code = textwrap.dedent(f"""
        from canary_server.model import cpu_kernels
        {setup}
        print(cpu_kernels.status())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_off_switch_is_read_in_a_fresh_process(tmp_path):
    assert _fresh_status(tmp_path, {cpu_kernels.ENV_OFF: "1"}) == f"off ({cpu_kernels.ENV_OFF} is set)"


def test_a_library_built_for_another_mlx_is_not_loaded(tmp_path):
    stamp = tmp_path / "stamp.json"
    stamp.write_text(json.dumps(cpu_kernels.expected_stamp() | {"mlx": "0.0.1"}))
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"not a library")
    setup = f"""
        from pathlib import Path
        cpu_kernels.stamp_path = lambda directory=None: Path({str(stamp)!r})
        cpu_kernels.library_path = lambda directory=None: Path({str(lib)!r})
    """
    status = _fresh_status(tmp_path, {}, textwrap.dedent(setup).replace("\n", "\n        "))
    assert status.startswith("built for another mlx (0.0.1)")


def test_no_library_means_the_compositions_run(tmp_path):
    setup = f"""
        from pathlib import Path
        cpu_kernels.library_path = lambda directory=None: Path({str(tmp_path / "absent.so")!r})
    """
    status = _fresh_status(tmp_path, {}, textwrap.dedent(setup).replace("\n", "\n        "))
    assert status.startswith("not built")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_build_makes_a_library_that_loads_and_computes(tmp_path):
    pytest.importorskip("nanobind")
    out = tmp_path / "kernels"
    built = subprocess.run([sys.executable, "-m", "canary_server.model.cpu_kernels_build", "--dir", str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr
    stamp = json.loads(cpu_kernels.stamp_path(out).read_text())
    assert stamp["mlx"] == mx.__version__ and stamp["source_sha256"] == cpu_kernels.expected_stamp()["source_sha256"]
    code = textwrap.dedent(f"""
        import importlib.util
        import canary_server
        import mlx.core as mx
        spec = importlib.util.spec_from_file_location("_cpu_kernels", {str(cpu_kernels.library_path(out))!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        x = mx.array([-2.0, 0.0, 3.0])
        print(mx.allclose(module.silu(x), x * mx.sigmoid(x)).item())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_batchnorm_scale_shift_is_the_same_map():
    rng = np.random.default_rng(6)
    bn = BatchNorm(8)
    for name in BatchNorm.STATS:
        bn[name] = mx.array(rng.uniform(0.5, 1.5, 8).astype(np.float32))
    x = mx.array(rng.normal(0, 2, (5, 8)).astype(np.float32))
    scale, shift = bn.scale_shift()
    _close(x * scale + shift, bn(x), rtol=1e-6, atol=1e-6)


@loaded
@pytest.mark.parametrize(("rows", "k", "n", "group_size"), [(1, 1024, 96, 64), (3, 256, 40, 32), (4, 512, 24, 128),
                                                             (5, 128, 8, 64)])  # fmt: skip
def test_qmatmul8_equals_the_dequantized_product(rows, k, n, group_size):
    rng = np.random.default_rng(rows * k + n)
    w = mx.array(rng.normal(0, 0.05, (n, k)).astype(np.float32))
    x = mx.array(rng.normal(0, 1, (rows, k)).astype(np.float32))
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=8)
    want = x @ mx.dequantize(q, scales, biases, group_size=group_size, bits=8).T
    _close(cpu_kernels.qmatmul8(x, q, scales, biases, group_size), want, rtol=1e-5, atol=2e-5)


@loaded
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_quantized_decoder_linear_equals_mlx_quantized_linear(rows, kernels_off):
    """Up to KERNEL_MAX_ROWS rows through the kernel, more through mx.quantized_matmul: both as nn.QuantizedLinear."""
    from canary_server.model.cpu_layout import QuantizedDecoderLinear

    rng = np.random.default_rng(rows)
    lin = nn.Linear(256, 48)
    lin.weight = mx.array(rng.normal(0, 0.05, (48, 256)).astype(np.float32))
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=8)
    wrapped = QuantizedDecoderLinear(q)
    assert sorted(k for k, _ in tree_flatten(wrapped.parameters())) == sorted(
        k for k, _ in tree_flatten(q.parameters())
    )  # the same parameters: a strict weight load sees no difference
    x = mx.array(rng.normal(0, 1, (1, rows, 256)).astype(np.float32))
    with backend.forced(backend.CPU):
        cpu_kernels.set_enabled(True)
        _close(wrapped(x), q(x), rtol=1e-5, atol=2e-5)


def test_decoder_bits_quantizes_the_decoder_only_and_is_checked(espeak_dir):
    """model.load(decoder_bits=8) on a float32 model: every decoder Linear 8-bit (wrapped for the kernel on the CPU
    paths), the encoder and the output head untouched; anything but 0 or 8 is refused."""
    from canary_server import model
    from canary_server.model.cpu_layout import QuantizedDecoderLinear

    m = model.load(espeak_dir, decoder_bits=8)
    quantized = [n for n, layer in m.named_modules() if isinstance(layer, nn.QuantizedLinear)]
    assert quantized and all(name.startswith("decoder.") for name in quantized)
    assert not [n for n, layer in m.decoder.named_modules() if isinstance(layer, nn.Linear)]
    assert all(isinstance(layer, QuantizedDecoderLinear) for n, layer in m.named_modules() if n in quantized) == (
        backend.cpu_paths()
    )
    with pytest.raises(ValueError, match="decoder_bits"):
        model.load(espeak_dir, decoder_bits=4)


packed = pytest.mark.skipif(not cpu_kernels.packed_supported(), reason="the packed matmul needs AVX-512 or AVX2")
# every build of the packed matmul this CPU runs (the tests of both on an AVX-512 machine)
_BEST = cpu_kernels.packed_isa()
PACKED_ISAS = list(cpu_kernels.PACKED_ISAS[: cpu_kernels.PACKED_ISAS.index(_BEST) + 1]) if _BEST else []


@pytest.fixture(params=PACKED_ISAS or ["none"])
def packed_isa(request):
    if request.param == "none":
        pytest.skip("the packed matmul needs AVX-512 or AVX2")
    previous = cpu_kernels.set_packed_isa(request.param)
    assert cpu_kernels.packed_isa() == request.param
    yield request.param
    cpu_kernels.set_packed_isa(previous)


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        *((m, 40, 64) for m in range(1, 25)),
        (5, 700, 96),
        (13, 1100, 64),
        (63, 512, 256),
        (130, 1030, 320),
        (250, 96, 512),
        (0, 64, 64),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_the_matmul(packed_isa, m, k, n, bias):
    """Every block size (1..12 rows: one tile up to 12 rows, two of 7..12 up to 24), several blocks of K (512) with a
    remainder, more rows than one block of 10 tiles, a single panel (one thread), no rows at all."""
    rng = np.random.default_rng(m * 7 + k)
    x = mx.array(rng.normal(0, 1, (m, k)).astype(np.float32))
    w = mx.array(rng.normal(0, k**-0.5, (n, k)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (n,)).astype(np.float32)) if bias else None
    want = x @ w.T if b is None else mx.addmm(b, x, w.T)
    got = cpu_kernels.packed_linear(x, cpu_kernels.pack_weight(w), b)
    assert got.shape == (m, n)
    _close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.skipif(len(PACKED_ISAS) < 2, reason="needs a CPU with AVX-512 (both builds)")
def test_both_builds_give_the_same_bits():
    """The AVX-512 build (blocks of 512-bit FMAs, x packed into tiles by transposes in registers, 16 columns at a
    time with masked tails) and the AVX2 build (256-bit FMAs, scalar packing) multiply and add in the same order:
    equal to the bit, for every tile height, K with and without a 16-column tail, one tile and many. Relative
    attention packs q + pos_bias through the same path (with its add)."""
    rng = np.random.default_rng(11)
    shapes = [(m, k) for m in (*range(1, 26), 63, 130) for k in (1, 5, 16, 17, 40, 700)]
    xs = [mx.array(rng.normal(0, 1, s).astype(np.float32)) for s in shapes]
    ws = [cpu_kernels.pack_weight(mx.array(rng.normal(0, 1, (64, s[1])).astype(np.float32))) for s in shapes]
    b = mx.array(rng.normal(0, 1, (64,)).astype(np.float32))
    q, k, v = (mx.array(rng.normal(0, 1, (2, 75, 128)).astype(np.float32)) for _ in range(3))
    p = mx.array(rng.normal(0, 1, (149, 128)).astype(np.float32))
    u, vb = (mx.array(rng.normal(0, 1, (2, 64)).astype(np.float32)) for _ in range(2))
    valid = mx.arange(75)[None, :] < mx.array([75, 40])[:, None]
    out = {}
    for isa in ("avx512", "avx2"):
        previous = cpu_kernels.set_packed_isa(isa)
        try:
            out[isa] = [cpu_kernels.packed_linear(x, w, b) for x, w in zip(xs, ws, strict=True)]
            out[isa].append(cpu_kernels.rel_attention(q, k, v, p, u, vb, valid))
            mx.eval(out[isa])
        finally:
            cpu_kernels.set_packed_isa(previous)
    for a, c in zip(out["avx512"], out["avx2"], strict=True):
        assert mx.array_equal(a, c)


@loaded
def test_kv_write_puts_rows_at_each_offset_in_place_only_when_nothing_else_holds_the_cache():
    """kv_write equals put_along_axis (the rows are copied: exactly); a cache still referenced elsewhere is left as it
    was (written into a copy); one only the write holds gives the same (there MLX may let it write in place, which
    this cannot observe); an offset past the buffer writes nothing."""
    rng = np.random.default_rng(5)
    b, h, length, d = 3, 2, 7, 16
    base = rng.normal(0, 1, (b, h, length, d)).astype(np.float32)
    x = mx.array(rng.normal(0, 1, (b, h, 1, d)).astype(np.float32))
    offsets = mx.array([0, 6, 3], dtype=mx.int32)
    cache = mx.array(base)
    idx = mx.broadcast_to(offsets[:, None, None, None], (b, h, 1, d))
    want = mx.put_along_axis(cache, idx, x, axis=2)
    got = cpu_kernels.kv_write(cache, offsets, x)
    assert mx.array_equal(got, want)
    assert np.array_equal(np.array(cache), base)  # `cache` is held here: untouched
    held_alone = mx.array(base) + 0.0  # computed, then only the write holds it
    got = cpu_kernels.kv_write(held_alone, offsets, x)
    del held_alone
    assert mx.array_equal(got, want)
    past = cpu_kernels.kv_write(mx.array(base), mx.array([0, 7, 3], dtype=mx.int32), x)
    assert np.array_equal(np.array(past)[1], base[1]) and mx.array_equal(past[0], want[0])
    for bad in ((mx.array(base), offsets.astype(mx.float32), x), (mx.array(base), offsets, x[:, :1])):
        with pytest.raises(ValueError):
            cpu_kernels.kv_write(*bad)


@packed
def test_rel_attention_refuses_what_it_cannot_compute():
    q, p, bias, valid = mx.zeros((2, 5, 64)), mx.zeros((9, 64)), mx.zeros((2, 32)), mx.ones((2, 5), dtype=mx.bool_)
    bad = [(q, q, q, p[:8], bias, bias, valid), (q, q, q, p, mx.zeros((4, 16)), mx.zeros((4, 16)), valid),
           (q, q, q[:1], p, bias, bias, valid), (q, q, q, p, bias, bias, valid[:, :4])]  # fmt: skip
    for args in bad:
        with pytest.raises(ValueError):
            cpu_kernels.rel_attention(*args)


@packed
def test_packed_linear_refuses_what_it_cannot_compute():
    x, wp = mx.zeros((3, 64)), cpu_kernels.pack_weight(mx.zeros((64, 64)))
    for args in ((x, wp[:, :32], None), (x, wp, mx.zeros((63,))), (x[:, :32], wp, None), (x, mx.zeros((64, 64)), None),
                 (x, wp[:0], None)):  # fmt: skip
        with pytest.raises(ValueError):
            cpu_kernels.packed_linear(*args)


def test_pack_weight_and_unpack_weight_are_inverse():
    w = mx.arange(96 * 5, dtype=mx.float32).reshape(96, 5)
    wp = cpu_kernels.pack_weight(w)
    assert wp.shape == (3, 5, 32) and wp[1, 2, 3].item() == w[35, 2].item()
    assert mx.array_equal(cpu_kernels.unpack_weight(wp), w.T)


def test_packed_linear_layers_equal_nn_linear_with_and_without_the_kernels(packed_isa, kernels_off):
    """PackedLinear on (B, T, K) input as nn.Linear computes it, with the kernel and (turned off after loading) from
    an unpacked copy; a layer whose output features are not whole panels, or not float32, is not packed."""
    from canary_server.model.cpu_layout import PackedLinear

    cpu_kernels.set_enabled(True)
    mx.random.seed(3)
    for bias in (True, False):
        lin = nn.Linear(80, 64, bias=bias)
        layer = PackedLinear(lin)
        x = mx.random.normal((2, 7, 80))
        with backend.forced(backend.CPU):
            _close(layer(x), lin(x), atol=1e-5)
            cpu_kernels.set_enabled(False)
            _close(layer(x), lin(x), atol=1e-5)
            cpu_kernels.set_enabled(True)
    assert PackedLinear.fits(nn.Linear(8, 64)) and not PackedLinear.fits(nn.Linear(8, 48))
    half = nn.Linear(8, 64)
    half.set_dtype(mx.float16)
    assert not PackedLinear.fits(half)
    cpu_kernels.set_enabled(False)
    assert not PackedLinear.fits(nn.Linear(8, 64))  # off at load: nothing is packed


@loaded
@pytest.mark.parametrize(("b", "v"), [(1, 5248), (16, 5248), (3, 1), (5, 77)])
def test_greedy_pick_equals_argmax_and_logsumexp(b, v):
    """The first maximum (ties included) and its log-softmax value, as the batch decoder's MLX composition gives
    them; a row with +inf or NaN gets a NaN log-prob as there (what the overflow guard looks for), -inf is a token
    never picked."""
    rng = np.random.default_rng(b * v)
    x = rng.normal(0, 4, (b, v)).astype(np.float32)
    if v > 2:
        x[0, 1] = x[0, v - 1] = x[0].max() + 1.0  # a tie: the first one wins
    logits = mx.array(x)
    with backend.forced(backend.CPU):
        token, lp = cpu_kernels.pick(logits)
    want_token = mx.argmax(logits, axis=-1)
    want_lp = mx.take_along_axis(logits, want_token[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
    assert token.dtype == want_token.dtype and mx.array_equal(token, want_token)
    _close(lp, want_lp, rtol=1e-6, atol=2e-5)
    if b > 1:
        for bad in (np.inf, -np.inf, np.nan):
            y = x.copy()
            y[1, v // 2] = bad
            with backend.forced(backend.CPU):
                _, lp = cpu_kernels.pick(mx.array(y))
            got = np.array(lp)
            assert np.isfinite(np.delete(got, 1)).all()
            if bad == -np.inf:
                ym = mx.array(y)
                top = mx.take_along_axis(ym, mx.argmax(ym, axis=-1)[:, None], axis=-1)[:, 0]
                _close(lp, top - mx.logsumexp(ym, axis=-1), rtol=1e-6, atol=2e-5)
            else:
                assert np.isnan(got[1])
