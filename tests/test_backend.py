"""model/backend.py: the one switch between the CPU paths and the GPU paths, and what it decides.

Parity of the GPU paths with NeMo (forced on this CPU) is in tests/test_parity.py, which runs every model test with
both paths.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from canary_server import model
from canary_server.convert import convert_nemo
from canary_server.model import backend, cpu_kernels, cpu_math
from canary_server.model.batch_decoder import BatchDecoder
from canary_server.model.cpu_layout import PackedEmbedding, PackedLinear, TransposedLinear
from conftest import FIXTURES, REPO


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("auto", None), ("cpu", "cpu"), ("GPU", "gpu"), (" gpu ", "gpu")],
)
def test_canary_backend_env_var_is_read(value, expected):
    env = {} if value is None else {"CANARY_BACKEND": value}
    assert backend.from_env(env) == expected


def test_an_unknown_canary_backend_value_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match="CANARY_BACKEND.*metal"):
        backend.from_env({"CANARY_BACKEND": "metal"})
    with pytest.raises(ValueError, match="backend paths"):
        backend.force("metal")


def test_by_default_the_paths_follow_mlx_default_device(monkeypatch):
    with backend.forced(None):
        assert backend.paths() == "cpu"  # MLX's CPU backend here
        monkeypatch.setattr(backend.mx, "default_device", lambda: mx.gpu)
        assert backend.paths() == "gpu" and not cpu_math.enabled()


def test_forcing_sets_the_paths_for_the_block_and_restores_them():
    before = backend.paths()
    with backend.forced(backend.GPU):
        assert backend.paths() == "gpu" and not backend.cpu_paths()
        with backend.forced(backend.CPU):
            assert backend.cpu_paths() and cpu_math.enabled()
        assert backend.paths() == "gpu"
    assert backend.paths() == before


def _linears(m: nn.Module) -> tuple[int, int]:
    """(plain nn.Linears, Linears in a CPU layout: transposed or packed)."""
    modules = [mod for _, mod in m.named_modules()]
    return sum(type(x) is nn.Linear for x in modules), sum(type(x) in (TransposedLinear, PackedLinear) for x in modules)


def test_the_paths_decide_the_layout_at_load_and_whether_the_decoder_step_is_compiled(tmp_path):
    directory = convert_nemo(FIXTURES / "flash_agg" / "model.nemo", tmp_path / "m")
    with backend.forced(backend.CPU):
        m = model.load(directory, dtype="float32")
        enc_plain, enc_transposed = _linears(m.encoder)
        assert enc_plain == 0 and enc_transposed > 0
        # the model's own Linear (the encoder-decoder projection) too: it was left in nn.Linear (OpenBLAS's sgemm)
        assert m.config.enc_dec_proj and type(m.encoder_decoder_proj) in (TransposedLinear, PackedLinear)
        packed = sum(type(x) is PackedLinear for _, x in m.encoder.named_modules())
        assert (packed > 0) == cpu_kernels.packed_supported()  # AVX-512 or AVX2: the packed matmul's layout
        dec_plain, dec_layout = _linears(m.decoder)
        dec_packed = sum(type(x) is PackedLinear for _, x in m.decoder.named_modules())
        # the decoder: packed where the CPU has AVX-512 (output features in whole panels of 32; this fixture's dims
        # leave some out), else nn.Linear's rows for sgemv (_blas.py); never transposed
        assert dec_layout == dec_packed and (dec_packed > 0) == (cpu_kernels.packed_isa() == "avx512")
        assert dec_plain > 0
        emb = m.decoder.embedding.token_embedding  # the table is the tied head: packed with the decoder
        emb_rows = m.config.decoder.vocab_size  # (in whole panels of 32: not this fixture's 1520)
        assert isinstance(emb, PackedEmbedding) == (cpu_kernels.packed_isa() == "avx512" and emb_rows % 32 == 0)
        bd = BatchDecoder(m)
        assert bd._step_fn == bd._forward  # not compiled
    with backend.forced(backend.GPU):
        m = model.load(directory, dtype="float32")
        plain, transposed = _linears(m)
        assert plain > 0 and transposed == 0
        bd = BatchDecoder(m)
        assert bd._step_fn != bd._forward  # mx.compile'd


def test_the_env_var_forces_the_gpu_paths_in_a_fresh_process():
    code = "from canary_server.model import backend, cpu_math; print(backend.paths(), cpu_math.enabled())"
    env = dict(os.environ, CANARY_BACKEND="gpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["gpu", "False"]


def test_the_packed_embedding_looks_up_and_projects_as_its_table(tmp_path):
    """PackedEmbedding (the decoder's tied table as panels): lookups give the table's rows exactly, as_linear the
    product with the table (the logits), for one row, a few and a batch."""
    if not cpu_kernels.packed_supported():
        pytest.skip("the packed matmul needs AVX-512 or AVX2")
    rng = np.random.default_rng(3)
    table = nn.Embedding(96, 40)
    table.weight = mx.array(rng.normal(0, 1, (96, 40)).astype(np.float32))
    packed = PackedEmbedding(table)
    ids = mx.array([[0, 31, 32, 95], [64, 5, 5, 63]])
    for dtype in (mx.int32, mx.uint32):  # prompts, and the tokens a step picked
        assert mx.array_equal(packed(ids.astype(dtype)), table(ids))
    previous = cpu_kernels.set_enabled(False)  # the indexing the kernel replaces
    try:
        assert mx.array_equal(packed(ids), table(ids))
    finally:
        cpu_kernels.set_enabled(previous)
    for rows in (1, 5, 16):
        x = mx.array(rng.normal(0, 1, (rows, 40)).astype(np.float32))
        np.testing.assert_allclose(np.array(packed.as_linear(x)), np.array(table.as_linear(x)), rtol=1e-5, atol=1e-5)
