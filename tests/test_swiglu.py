"""The fused SwiGLU down-projection (ops/swiglu.py) against float64 math written out by hand, against
lora_linear on silu(gate)·up, under torch.compile, and as custom ops (opcheck)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops import dropped_positions, lora_linear
from lorakit.ops.swiglu import swiglu_lora_down
from saved_by_compile import recording_backend  # tests/ is on the path


def _inputs(dtype=torch.float64, seed: int = 0, bias: bool = True, lead=(2, 3), k: int = 8, d: int = 5, r: int = 3):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(*lead, k, generator=gen, dtype=dtype).requires_grad_()
    up = torch.randn(*lead, k, generator=gen, dtype=dtype).requires_grad_()
    W = torch.randn(d, k, generator=gen, dtype=dtype)
    b = torch.randn(d, generator=gen, dtype=dtype).requires_grad_() if bias else None
    A = torch.randn(r, k, generator=gen, dtype=dtype).requires_grad_()
    B = torch.randn(d, r, generator=gen, dtype=dtype).requires_grad_()  # ≠ 0 so the branch counts
    return gate, up, W, b, A, B


def _reference(gate, up, W, b, A, B, s, p, seed):
    """float64 by hand: h = gate·σ(gate)·up; y = h Wᵀ + b + s·(h ⊙ keep / (1-p)) Aᵀ Bᵀ."""
    h = gate * torch.sigmoid(gate) * up
    h2 = h.reshape(-1, h.shape[-1])
    keep = torch.ones(h2.numel(), dtype=h.dtype)
    if p:
        keep[dropped_positions(h2.numel(), p, seed).long()] = 0.0
    dropped = h2 * keep.view_as(h2) / (1.0 - p)
    y = h2 @ W.t() + s * (dropped @ A.t()) @ B.t()
    if b is not None:
        y = y + b
    return y.view(*h.shape[:-1], W.shape[0])


def _grads(f, args, s, p, seed):
    y = f(*args, s, p, seed)
    y.square().sum().backward()
    leaves = [t for t in args if t is not None and t.requires_grad]
    out = [y.detach().clone()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(p: float) -> None:
    gate, up, W, b, A, B = _inputs()
    f = lambda g, u, b_, A_, B_: swiglu_lora_down(g, u, W, b_, A_, B_, 0.7, p, 11)  # noqa: E731
    assert torch.autograd.gradcheck(f, (gate, up, b, A, B))


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_hand_written_float64_reference(p: float, bias: bool) -> None:
    args = _inputs(bias=bias, seed=1)
    got = _grads(swiglu_lora_down, args, 0.7, p, 11)
    ref = _grads(_reference, args, 0.7, p, 11)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    if p:  # the mask matters: another seed gives another result (so the test can fail)
        other = _grads(_reference, args, 0.7, p, 12)
        assert not torch.allclose(got[0], other[0])


def test_weight_gradient_when_the_base_is_unfrozen() -> None:
    gate, up, W, b, A, B = _inputs(seed=2)
    W.requires_grad_()
    args = (gate, up, W, b, A, B)
    for a, e in zip(_grads(swiglu_lora_down, args, 0.5, 0.2, 3), _grads(_reference, args, 0.5, 0.2, 3)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_same_as_lora_linear_on_the_product_float32(p: float) -> None:
    """Bit for bit: the same arithmetic and the same mask as lora_linear on silu(gate)·up."""
    args = _inputs(torch.float32, seed=3, lead=(4, 5), k=16, d=12, r=4)
    unfused = lambda g, u, *rest: lora_linear(F.silu(g) * u, *rest)  # noqa: E731
    for a, e in zip(_grads(swiglu_lora_down, args, 0.5, p, 7), _grads(unfused, args, 0.5, p, 7)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_only_the_adapter_needs_grad() -> None:
    """Inputs that need no gradient (a first layer whose input is frozen) get none."""
    gate, up, W, b, A, B = _inputs(seed=4)
    gate, up = gate.detach(), up.detach()
    swiglu_lora_down(gate, up, W, None, A, B, 0.5, 0.0, 0).sum().backward()
    ref_A, ref_B = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    _reference(gate, up, W, None, A, B, 0.5, 0.0, 0).sum().backward()
    torch.testing.assert_close(ref_A, A.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref_B, B.grad, rtol=1e-10, atol=1e-10)


def test_autocast_computes_in_the_autocast_dtype() -> None:
    gate, up, W, b, A, B = _inputs(torch.float32, seed=5, k=16, d=8, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swiglu_lora_down(gate, up, W, b, A, B, 0.5, 0.0, 0)
        expected = lora_linear(F.silu(gate.bfloat16()) * up.bfloat16(), W, b, A, B, 0.5, 0.0, 0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_shape_mismatch_is_an_error() -> None:
    gate, up, W, b, A, B = _inputs()
    with pytest.raises(ValueError, match="same shape"):
        swiglu_lora_down(gate, up[..., :4], W, b, A, B, 1.0)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiles_whole_on_cpu(p: float) -> None:
    torch._dynamo.reset()
    args = _inputs(torch.float32, seed=6, k=16, d=8, r=4)
    ref = _grads(swiglu_lora_down, args, 0.5, p, 9)
    got = _grads(torch.compile(swiglu_lora_down, fullgraph=True), args, 0.5, p, 9)  # a graph break is an error
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiled_saves_gate_and_up_not_the_product(p: float) -> None:
    """Under torch.compile the function is lora_linear(silu(gate)·up): the partitioner Inductor uses
    recomputes the pointwise product in backward, so the forward graph saves no (N, k) tensor besides gate
    and up — the memory the eager function saves by hand."""
    backend, saved_shapes = recording_backend()
    gate, up, W, b, A, B = _inputs(torch.float32, seed=7, lead=(6,), k=32, d=8, r=2)
    torch._dynamo.reset()
    y = torch.compile(swiglu_lora_down, backend=backend, fullgraph=True)(gate, up, W, b, A, B, 0.5, p, 3)
    y.sum().backward()
    assert saved_shapes.count((6, 32)) == 2, saved_shapes  # gate and up; not silu(gate), not the product


def test_saves_gate_and_up_not_the_product() -> None:
    """What autograd keeps: gate, up and the (N, r) u, never h = silu(gate)·up."""
    gate, up, W, b, A, B = _inputs(torch.float32, seed=8, lead=(6,), k=32, d=8, r=2)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_lora_down(gate, up, W, b, A, B, 0.5, 0.0, 0)
    h = F.silu(gate) * up
    assert not any(t.shape[-1] == 32 and torch.equal(t.reshape(h.shape), h) for t in saved if t.numel() == h.numel())
    big = [t for t in saved if t.numel() == h.numel()]
    assert {t.data_ptr() for t in big} == {gate.data_ptr(), up.data_ptr()}



@pytest.mark.parametrize("p", [0.0, 0.4])
def test_an_nf4_weight_gives_what_its_dequantized_values_give(p: float) -> None:
    """QLoRA: a 4-bit down-projection weight is dequantised where it is used and kept packed; values and
    gradients equal the op over the dequantised tensor (float64), gradcheck passes, and neither the product
    nor the dense weight is kept for backward."""
    from lorakit.ops.nf4 import dequantize_nf4_reference, quantize_nf4

    gate, up, W, b, A, B = _inputs(seed=3, k=64)  # gate, up (2, 3, 64): (6, 64) inside; W (5, 64)
    t = quantize_nf4(W.float())
    dense = dequantize_nf4_reference(t, torch.float64)
    got = _grads(lambda *a: swiglu_lora_down(a[0], a[1], t, *a[3:]), (gate, up, None, b, A, B), 0.7, p, 5)
    ref = _grads(swiglu_lora_down, (gate, up, dense, b, A, B), 0.7, p, 5)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda g, u, b_, A_, B_: swiglu_lora_down(g, u, t, b_, A_, B_, 0.7, p, 5),
                                    (gate, up, b, A, B))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        swiglu_lora_down(gate, up, t, b, A, B, 0.7, p, 5)
    shapes = [tuple(x.shape) for x in saved]
    assert (5, 64) not in shapes and shapes.count((6, 64)) == 2, shapes  # gate and up; no dense weight, no product
