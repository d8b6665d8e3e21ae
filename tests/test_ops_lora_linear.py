"""lora_linear against float64 references, gradcheck, and the seeded dropout mask."""

import math

import pytest
import torch

from lorakit.ops import dropped_positions, lora_linear


def _inputs(N=7, k=6, d=5, r=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(2, N, k), mk(d, k), mk(d), mk(r, k), mk(d, r)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_base", [True, False])
def test_gradcheck_float64(p, with_base):
    x, W, b, A, B = _inputs()
    fn = lambda x, W, b, A, B: lora_linear(x, W if with_base else None, b if with_base else None, A, B, 0.7, p, 11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W, b, A, B))


def test_matches_explicit_formula_with_mask():
    x, W, b, A, B = (t.detach() for t in _inputs(N=9, k=8))
    p, seed, s = 0.4, 5, 1.5
    mask = torch.ones(x.numel(), dtype=x.dtype)
    mask[dropped_positions(x.numel(), p, seed).long()] = 0
    dropped = x * mask.view_as(x) / (1 - p)
    ref = x @ W.T + b + s * dropped @ A.T @ B.T
    torch.testing.assert_close(lora_linear(x, W, b, A, B, s, p, seed), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_inference_skips_autograd_and_equals_the_training_route(p, monkeypatch):
    import importlib

    module = importlib.import_module("lorakit.ops.lora_linear")

    x, W, b, A, B = _inputs(N=9, k=8)
    ref = lora_linear(x, W, b, A, B, 0.9, p, 4)  # the autograd route
    calls = []
    monkeypatch.setattr(module._LoraLinear, "apply", lambda *a: calls.append(a))  # would return None
    with torch.no_grad():
        out = lora_linear(x, W, b, A, B, 0.9, p, 4)
    plain = [t.detach() for t in (x, W, b, A, B)]  # no input requires grad: no graph either, grad mode on
    out_plain = lora_linear(*plain, 0.9, p, 4)
    assert calls == [] and not out.requires_grad and not out_plain.requires_grad
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out_plain, ref.detach(), rtol=0, atol=0)


def test_hand_computed_values():
    x = torch.tensor([[1.0, 2.0]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    A = torch.tensor([[1.0, -1.0]])  # A x = -1
    B = torch.tensor([[2.0], [0.0], [1.0]])  # B A x = [-2, 0, -1]
    out = lora_linear(x, W, None, A, B, 0.5, 0.0, 0)  # W x = [1, 2, 3]
    assert out.tolist() == [[0.0, 2.0, 2.5]]


def test_frozen_weight_gets_no_gradient_and_saves_small():
    x, W, b, A, B = _inputs(dtype=torch.float32)
    W.requires_grad_(False)
    out = lora_linear(x, W, None, A, B, 2.0, 0.1, 3)
    saved = out.grad_fn.saved_tensors
    sizes = sorted(t.numel() for t in saved)
    # x, W (a parameter, not a copy), A, B and u = drop(x)Aᵀ of shape (N, r): nothing else of x's size
    assert sizes.count(x.numel()) == 1 and any(t.shape == (14, 3) for t in saved)
    out.sum().backward()
    assert W.grad is None and A.grad is not None and B.grad is not None


def test_bf16_stays_bf16_and_is_close_to_float64():
    x, W, b, A, B = (t.detach() for t in _inputs(N=16, k=32, d=24, r=4, dtype=torch.float32))
    ref = (x.double() @ W.double().T + 0.5 * x.double() @ A.double().T @ B.double().T)
    out = lora_linear(x.bfloat16(), W.bfloat16(), None, A, B, 0.5)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_dropout_mask_statistics_and_determinism():
    n, p = 200_000, 0.05
    pos = dropped_positions(n, p, seed=1)
    assert torch.equal(pos, dropped_positions(n, p, seed=1))
    assert not torch.equal(pos, dropped_positions(n, p, seed=2))
    assert abs(pos.numel() / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert pos.numel() == pos.unique().numel() and int(pos.max()) < n and int(pos.min()) >= 0
    assert torch.all(pos[1:] > pos[:-1])
    # each element is dropped with probability p, independently of where it sits
    counts = torch.zeros(50)
    for seed in range(400):
        counts[dropped_positions(50, 0.3, seed).long()] += 1
    assert (counts / 400 - 0.3).abs().max() < 0.1


@pytest.mark.parametrize("numel, p", [(2**21, 0.05), (1000, 0.3), (77, 0.9), (12345, 0.01)])
def test_dropout_positions_are_the_documented_gap_formula(numel, p):
    """A seed's mask is pinned to its definition, written out plainly: drop positions are the partial
    sums of gaps 1 + floor(log(1 - U) / log(1 - p)), float32 U from torch.rand on a generator seeded
    with ``seed``. A faster rewrite of dropped_positions must not change which elements a seed drops."""
    for seed in range(5):
        mean = numel * p
        chunk = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 64)
        u = torch.rand(chunk, generator=torch.Generator().manual_seed(seed))
        gaps = torch.floor(torch.log1p(-u) * (1.0 / math.log1p(-p))).long() + 1
        expected = torch.cumsum(gaps, 0) - 1
        assert int(expected[-1]) >= numel  # one chunk covers these sizes
        got = dropped_positions(numel, p, seed)
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), expected[expected < numel])


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_with_dropout_matches_float64_same_mask(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    W, A, B = torch.randn(16, 32, generator=g), torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g)
    grads = []
    for dt in (dtype, torch.float64):
        xs = x.to(dt).requires_grad_()
        adapter_dtype = torch.float64 if dt == torch.float64 else torch.float32
        As, Bs = A.to(adapter_dtype).clone().requires_grad_(), B.to(adapter_dtype).clone().requires_grad_()
        out = lora_linear(xs, W.to(dt), None, As, Bs, 0.5, 0.2, seed=3)
        assert out.dtype == dt
        out.double().sum().backward()
        grads.append((out.detach(), xs.grad, As.grad, Bs.grad))
    for low, ref in zip(*grads):
        assert ((low.double() - ref).norm() / ref.norm()) < tol


def test_under_autocast_computes_in_the_autocast_dtype():
    x, W, b, A, B = (t.detach().float() for t in _inputs(N=16, k=32, d=24, r=4))
    x.requires_grad_()
    A.requires_grad_()
    ref = x.double() @ W.double().T + b.double() + 0.5 * x.double() @ A.double().T @ B.double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, W, b, A, B, 0.5, 0.1, seed=2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, W, b, A, B, 0.5)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2
