"""ops.dora: the DoRA linear and its weight norm against float64 references written from the equations."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops import dora_linear, dora_weight_norm
from lorakit.ops.dora import dropped_copy


def _inputs(N=7, k=6, d=5, r=3, dtype=torch.float64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, k, generator=gen, dtype=dtype)
    W = torch.randn(d, k, generator=gen, dtype=dtype)
    b = torch.randn(d, generator=gen, dtype=dtype) if bias else None
    A = torch.randn(r, k, generator=gen, dtype=dtype)
    B = torch.randn(d, r, generator=gen, dtype=dtype)
    m = torch.rand(d, generator=gen, dtype=dtype) + 0.5
    return x, W, b, A, B, m


def _reference(x, W, b, A, B, m, s, xt=None):
    """PEFT's DoRA forward: base(x) + (f − 1)·x̃Wᵀ + f·s·x̃AᵀBᵀ, f = m / ‖W + sBA‖ (norm detached)."""
    xt = x if xt is None else xt
    n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
    f = m / n
    out = x @ W.t() + (f - 1) * (xt @ W.t()) + f * s * (xt @ A.t() @ B.t())
    return out + b if b is not None else out


def test_weight_norm_matches_the_materialised_norm():
    _, W, _, A, B, _ = _inputs(d=9, k=11, r=4)
    for s in (0.5, 2.0):
        expected = torch.linalg.norm(W + s * B @ A, dim=1)
        assert torch.allclose(dora_weight_norm(W, A, B, s), expected, rtol=1e-12, atol=0)


def test_weight_norm_in_bfloat16_is_accumulated_in_float32():
    _, W, _, A, B, _ = _inputs(d=64, k=256, r=8, dtype=torch.float32)
    Wb = W.bfloat16()
    expected = torch.linalg.norm(Wb.double() + 0.3 * B.double() @ A.double(), dim=1)
    got = dora_weight_norm(Wb, A, B, 0.3)
    assert got.dtype == torch.float32
    assert ((got.double() - expected).abs() / expected).max() < 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_the_reference(bias):
    x, W, b, A, B, m = _inputs(bias=bias)
    s = 0.7
    _compare(lambda x, A, B, m: dora_linear(x, W, b, A, B, s, m),
             lambda x, A, B, m: _reference(x, W, b, A, B, m, s), (x, A, B, m))


def _compare(ours_fn, ref_fn, inputs):
    """Outputs and gradients (for one random ∂L/∂h) of ours_fn and ref_fn agree to float64 rounding."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    out, ref = ours_fn(*leaves), ref_fn(*ref_leaves)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for ours, theirs in zip(leaves, ref_leaves):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def test_with_dropout_matches_the_reference_with_the_same_mask():
    x, W, b, A, B, m = _inputs(N=9, k=8)
    s, p, seed = 1.3, 0.4, 1234
    xt = dropped_copy(x, p, seed)
    assert (xt == 0).any() and (xt != 0).any()
    keep = (xt != 0).double() / (1 - p)
    _compare(lambda x, A, B, m: dora_linear(x, W, b, A, B, s, m, None, p, seed),
             lambda x, A, B, m: _reference(x, W, b, A, B, m, s, x * keep), (x, A, B, m))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck(p):
    x, W, b, A, B, m = _inputs(N=4, k=5, d=3, r=2)
    n = dora_weight_norm(W, A, B, 0.9)
    W.requires_grad_()  # an unfrozen base gets its gradient too
    b.requires_grad_()
    fn = lambda x, W, b, A, B, m: dora_linear(x, W, b, A, B, 0.9, m, n, p, 77)
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (x, W, b, A, B, m)])


def test_bfloat16_activations_against_float64():
    x, W, b, A, B, m = _inputs(N=32, k=64, d=48, r=4, dtype=torch.float32)
    out = dora_linear(x.bfloat16(), W.bfloat16(), b.bfloat16(), A, B, 0.5, m)
    ref = _reference(x.bfloat16().double(), W.bfloat16().double(), b.bfloat16().double(), A.double(), B.double(),
                     m.double(), 0.5)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_gradients_survive_a_later_raw_write_into_the_output():
    """Kernels after a layer (liger's RoPE, its SwiGLU backward) may overwrite the layer's output in place
    unseen by autograd; the magnitude's gradient must not be computed from that output."""
    x, W, b, A, B, m = _inputs()
    c = torch.randn(x.shape[0], W.shape[0], dtype=x.dtype)
    grads = []
    for clobber in (False, True):
        m_ = m.clone().requires_grad_()
        h = dora_linear(x, W, b, A, B, 0.7, m_)
        loss = (h * c).sum()  # mul by a constant keeps c, not h
        if clobber:
            h.data.fill_(123.0)
        loss.backward()
        grads.append(m_.grad)
    assert torch.equal(grads[0], grads[1])
