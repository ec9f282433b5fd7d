"""canary_server/_gemv_forward.c: MLX's single-row / single-column matmuls go to OpenBLAS's sgemv, products of a few
rows (2..64 with AVX2 or AVX-512, 2..12 without) with nn.Linear weights to the library's own two-thread kernel
(every build of it the CPU runs), with the same results; everything else still goes to sgemm. Linux with the library
built (scripts/setup.sh builds it)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from canary_server import _blas

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _blas.gemv_counts() is None,
    reason="the sgemv forwarder is a Linux-only C library, built when a C compiler was there at install",
)


def test_matrix_vector_products_go_to_sgemv_with_the_same_results():
    import mlx.core as mx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 96)).astype(np.float32)
    w = rng.standard_normal((96, 160)).astype(np.float32)  # (K, N)
    bias = rng.standard_normal(160).astype(np.float32)
    col = rng.standard_normal((96, 1)).astype(np.float32)
    xm, wm, bm, colm = mx.array(x), mx.array(w), mx.array(bias), mx.array(col)
    wt = mx.contiguous(wm.T)  # (N, K): nn.Linear's layout
    cases = {
        "x @ W": (lambda: xm @ wm, x @ w),
        "x @ W.T (nn.Linear)": (lambda: xm @ wt.T, x @ w),
        "addmm": (lambda: mx.addmm(bm, xm, wm), bias + x @ w),
        "W.T @ col (one column)": (lambda: wt @ colm, w.T @ col),
        "col.T @ W (a transposed row)": (lambda: colm.T @ wm, col.T @ w),
    }
    before = _blas.gemv_counts()
    for name, (fn, want) in cases.items():
        got = np.array(fn())
        assert np.allclose(got, want, rtol=1e-5, atol=1e-4), name
    forwarded, passed = (a - b for a, b in zip(_blas.gemv_counts(), before, strict=True))
    assert forwarded >= len(cases) and passed == 0
    before = _blas.gemv_counts()
    got = np.array(mx.array(np.repeat(x, 3, 0)) @ wm)  # three rows: sgemm
    assert np.allclose(got, np.repeat(x @ w, 3, 0), rtol=1e-5, atol=1e-4)
    assert _blas.gemv_counts()[1] == before[1] + 1


def _isas() -> list[str]:
    """The few-row kernel's builds this CPU can run (its best and every lower one)."""
    best = _blas.small_m_isa()
    return list(_blas.SMALL_M_ISAS[: _blas.SMALL_M_ISAS.index(best) + 1]) if best else []


@pytest.fixture(params=["generic", "avx2", "avx512"])
def isa(request):
    """Each build of the few-row kernel this CPU has (the others are skipped), the best one restored after."""
    if request.param not in _isas():
        pytest.skip(f"this CPU does not run the {request.param} build")
    previous = _blas.set_small_m_isa(request.param)
    assert _blas.small_m_isa() == request.param
    yield request.param
    _blas.set_small_m_isa(previous)


def test_the_kernel_runs_the_best_build_the_cpu_has():
    import subprocess

    code = "import canary_server; from canary_server import _blas; print(_blas.small_m_isa(), _blas.small_m_max())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == _isas()[-1] and int(out[1]) == (12 if out[0] == "generic" else 64)


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(2, 1024, 1024), (3, 40, 64), (5, 100, 70), (9, 1024, 4096), (12, 33, 7), (16, 1024, 4096), (54, 77, 130)],
)
def test_few_row_products_with_linear_weights_are_computed_here_with_the_same_results(m, k, n, isa):
    """x (M x K) @ W.T with W (N x K) as nn.Linear stores it, with and without a bias (addmm: beta 1), K and N not
    multiples of the 8 x 4 blocks, N too small for the helper thread; every build of the kernel the CPU has."""
    import mlx.core as mx

    if m > _blas.small_m_max():
        pytest.skip(f"{m} rows go to sgemm with the {isa} build (it takes up to {_blas.small_m_max()})")
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    xm, wm, bm = mx.array(x), mx.array(w), mx.array(bias)
    mx.eval(xm, wm, bm)
    before, counts = _blas.small_m_count(), _blas.gemv_counts()
    for _ in range(3):  # the helper thread's later jobs as well as its first
        got = np.array(xm @ wm.T)
        with_bias = np.array(mx.addmm(bm, xm, wm.T))
        tol = 1e-5 * np.sqrt(k) * np.abs(x).max() * np.abs(w).max()
        np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=tol)
        np.testing.assert_allclose(with_bias, bias + x @ w.T, rtol=1e-5, atol=tol)
    assert _blas.small_m_count() == before + 6
    assert _blas.gemv_counts() == counts  # neither sgemv nor sgemm


def test_more_rows_or_another_layout_still_go_to_sgemm(isa):
    import mlx.core as mx

    w = mx.ones((64, 32))
    assert _blas.small_m_max() == (12 if isa == "generic" else 64)
    more = _blas.small_m_max() + 1
    for a, b in ((mx.ones((more, 32)), w.T), (mx.ones((4, 32)), mx.ones((32, 64)))):  # more rows; W not transposed
        before, counts = _blas.small_m_count(), _blas.gemv_counts()
        mx.eval(a @ b)
        assert _blas.small_m_count() == before and _blas.gemv_counts()[1] == counts[1] + 1


def test_the_few_row_kernel_works_in_a_forked_child():
    """A child forked after the helper thread started has no such thread: the kernel must start one, not wait."""
    import subprocess

    code = """
import ctypes, os, sys
import numpy as np
from canary_server import _blas
f = _blas._forward
def product():
    x = np.ones((4, 256), np.float32); w = np.ones((512, 256), np.float32); c = np.zeros((4, 512), np.float32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    f.cblas_sgemm(101, 111, 112, 4, 512, 256, ctypes.c_float(1.0), p(x), 256, p(w), 256, ctypes.c_float(0.0), p(c),
                  512)
    return float(c.min()), float(c.max())
assert product() == (256.0, 256.0)  # the helper thread is running now
pid = os.fork()
if pid == 0:
    os._exit(0 if product() == (256.0, 256.0) else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_forwarding_can_be_turned_off_at_run_time():
    import mlx.core as mx

    x, w = mx.ones((1, 8)), mx.ones((8, 4))
    try:
        assert _blas.set_gemv_forward(False)
        before = _blas.gemv_counts()
        mx.eval(x @ w)
        assert _blas.gemv_counts() == (before[0], before[1] + 1)
    finally:
        _blas.set_gemv_forward(True)
    before = _blas.gemv_counts()
    mx.eval(x @ w)
    assert _blas.gemv_counts() == (before[0] + 1, before[1])


def test_without_openblas_the_forwarder_is_not_loaded_and_matmuls_still_work():
    """The forwarder's sgemm calls OpenBLAS's: where no OpenBLAS loads, it must stay out of MLX's way."""
    import subprocess
    from pathlib import Path

    blas_py = Path(_blas.__file__)
    code = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("blas_alone", {str(blas_py)!r})
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
b._CANDIDATES = ("libno-such-openblas.so.0",)
assert b.preload_openblas() == "" and b.gemv_counts() is None
import mlx.core as mx
print((mx.ones((1, 8)) @ mx.ones((8, 4))).tolist(), (mx.ones((3, 8)) @ mx.ones((8, 2))).tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[8.0, 8.0, 8.0, 8.0]] [[8.0, 8.0], [8.0, 8.0], [8.0, 8.0]]"
    assert "libopenblas.so.0 not found" in out.stderr


@pytest.mark.parametrize("user_value", [None, "24"])
def test_the_openblas_thread_timeout_is_set_for_openblas_only_and_a_users_value_wins(user_value):
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when it loads: _blas sets 20 for that moment (idle OpenBLAS threads
    spinning for ~0.1 s starve the few-row kernel's helper thread) and takes it out again, so child processes (NeMo
    in the benches) do not inherit it; a value the user set is left alone."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    code = "import os, canary_server; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(user_value)
