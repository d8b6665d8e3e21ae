"""ops.native: the C kernels against float64 torch math, their fallbacks, and _LoraLinear through them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lorakit.ops import lora_linear, native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler (cc/gcc/clang) to build ops/native")


@pytest.fixture
def built():
    if not native.available():
        pytest.fail(f"native kernels did not build although a compiler exists: {native.unavailable_reason()}")


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


EPS = {torch.float64: 1e-13, torch.float32: 1e-5}


def _close(got, ref):
    """Elementwise, within a rounding budget for sums of a few thousand terms in got's dtype."""
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=EPS[got.dtype] * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 7, 2049])
@pytest.mark.parametrize("r", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_match_float64(built, dtype, N, r, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the thread count the kernels are given
    k, d = 67, 129  # odd: vector tiles plus a tail of columns in both dtypes
    x, g = _rand(N, k, dtype=dtype, seed=1), _rand(N, d, dtype=dtype, seed=2)
    A, B = _rand(r, k, dtype=dtype, seed=3), _rand(d, r, dtype=dtype, seed=4)
    X, G, A64, B64 = x.double(), g.double(), A.double(), B.double()
    sBt, bias = _rand(r, d, dtype=dtype, seed=5), _rand(d, dtype=dtype, seed=6)
    before = native.calls
    u = native.xat(x, A)
    v, dB, none = native.g_pass(g, B, u, 0.7, -1.3)
    dA = native.xt_pass(x, v)
    h3 = native.expand(u, sBt)
    u2, h = native.xat_expand(x, A, sBt, bias)
    v2, dB2, gx = native.g_pass(g, B, u, 0.7, -1.3, A)
    e = native.expand(u, sBt, bias)
    assert native.calls == before + 7 and none is None
    _close(u, X @ A64.T)
    _close(v, 0.7 * G @ B64)
    assert dB.shape == (d, r)
    _close(dB, -1.3 * G.T @ u.double())
    _close(dA, v.double().T @ X)
    # the fused forms: the same u, v, ∂B, plus the rank-r expansions written in the same pass
    assert torch.equal(v2, v) and torch.equal(dB2, dB) and torch.equal(u2, u)
    _close(h, bias.double() + u.double() @ sBt.double())
    _close(h3, u.double() @ sBt.double())
    _close(gx, v.double() @ A64)
    _close(e, bias.double() + u.double() @ sBt.double())
    # deterministic for a fixed thread count: the per-thread sums are added in thread order
    assert torch.equal(native.g_pass(g, B, u, 0.7, -1.3)[1], dB) and torch.equal(native.xt_pass(x, v), dA)


def test_unsupported_inputs_fall_back_to_torch(built):
    x = _rand(9, 33, dtype=torch.float64, seed=5).t()  # not contiguous
    A = _rand(2, 9, dtype=torch.float64, seed=6)
    before = native.calls
    torch.testing.assert_close(native.xat(x, A), x @ A.T, rtol=0, atol=0)
    xb, Ab = x.contiguous().bfloat16(), A.bfloat16()
    torch.testing.assert_close(native.xat(xb, Ab), xb @ Ab.T, rtol=0, atol=0)  # bf16: torch
    v = _rand(33, 2, dtype=torch.float64, seed=7)
    torch.testing.assert_close(native.xt_pass(x, v), v.T @ x, rtol=0, atol=0)
    w = _rand(9, 2, dtype=torch.float64, seed=8).t()  # (2, 9), not contiguous
    torch.testing.assert_close(native.expand(v, w), v @ w, rtol=0, atol=0)
    g, B = _rand(5, 9, dtype=torch.float64, seed=9), _rand(9, 2, dtype=torch.float64, seed=10)
    u = _rand(5, 2, dtype=torch.float64, seed=11)
    v, _, gx = native.g_pass(g, B, u, 1.0, 1.0, w)  # A (as w) not contiguous
    torch.testing.assert_close(gx, v @ w, rtol=0, atol=0)
    u, h = native.xat_expand(x, A, w)  # x not contiguous
    torch.testing.assert_close(h, (x @ A.T) @ w, rtol=0, atol=0)
    assert native.calls == before


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_gradcheck_through_native(built, p):
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, W, b = mk(2, 9, 37).requires_grad_(), mk(35, 37), mk(35).requires_grad_()
    A, B = mk(5, 37).requires_grad_(), mk(35, 5).requires_grad_()
    before = native.calls
    fn = lambda x, b, A, B: lora_linear(x, W, b, A, B, 0.7, p, 11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, A, B))
    assert native.calls > before  # u, then v/∂B and ∂A, ran in C


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


_PROBE = """
    import torch
    from lorakit.ops import lora_linear, native
    x, W, A, B = torch.randn(4, 8), torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2)
    ref = x @ W.T + 0.5 * x @ A.T @ B.T
    torch.testing.assert_close(lora_linear(x, W, None, A, B, 0.5), ref)
    print("available", native.available(), native.calls, native.unavailable_reason())
"""


def test_env_switch_disables_without_warning():
    done = _run_python(_PROBE, LORAKIT_NATIVE="0")
    assert done.returncode == 0, done.stderr
    assert "available False 0 LORAKIT_NATIVE=0" in done.stdout
    assert "native CPU kernels disabled" not in done.stderr


def test_unusable_cache_dir_falls_back_with_one_warning(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where the cache directory should be")
    done = _run_python(_PROBE, LORAKIT_CACHE_DIR=str(not_a_dir))
    assert done.returncode == 0, done.stderr
    assert "available False 0" in done.stdout
    assert done.stderr.count("native CPU kernels disabled") == 1


def test_damaged_cached_library_is_rebuilt(tmp_path):
    done = _run_python(_PROBE, LORAKIT_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0 and "available True" in done.stdout, done.stderr
    for lib in tmp_path.glob("lora_cpu-*"):
        lib.write_bytes(b"not a shared library")
    done = _run_python(_PROBE, LORAKIT_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0 and "available True" in done.stdout, done.stderr
    assert "native CPU kernels disabled" not in done.stderr
