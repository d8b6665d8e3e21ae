"""The LoRA linear as torch.library custom ops (ops/custom_ops.py): same function as the reference path,
whole under torch.compile (fullgraph), valid fake/autograd registrations, and dropout that survives
activation checkpointing (the mask is a seed, so the recomputed forward drops the same inputs)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.ops import lora_linear
from lorakit.ops.custom_ops import lora_linear_op


def _inputs(seed: int = 0, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=gen).requires_grad_()
    W = torch.randn(8, 16, generator=gen)
    b = torch.randn(8, generator=gen).requires_grad_() if bias else None
    A = torch.randn(4, 16, generator=gen).requires_grad_()
    B = torch.randn(8, 4, generator=gen).requires_grad_()  # ≠ 0 so the branch counts
    return x, W, b, A, B


def _run(f, x, W, b, A, B, p):
    h = f(x, W, b, A, B, 0.5, p, 7)
    h.pow(2).sum().backward()
    leaves = [t for t in (x, b, A, B) if t is not None]
    out = [h.detach().clone()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_custom_op_matches_reference_path(p: float) -> None:
    args = _inputs()
    ref = _run(lora_linear, *args, p)  # CPU eager: the autograd.Function of lora_linear.py
    got = _run(lora_linear_op, *args, p)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_weightless_call_is_the_branch_alone() -> None:
    x, _, _, A, B = _inputs(1, bias=False)
    h = lora_linear_op(x, None, None, A, B, 0.5, 0.0, 0)
    expected = 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    torch.testing.assert_close(h.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiles_whole_on_cpu(p: float) -> None:
    torch._dynamo.reset()
    args = _inputs(2)
    ref = _run(lora_linear, *args, p)
    got = _run(torch.compile(lora_linear, fullgraph=True), *args, p)  # fullgraph: a graph break is an error
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("need_u", [True, False])
def test_opcheck_forward(p: float, need_u: bool) -> None:
    x, W, b, A, B = _inputs(3)
    x2 = x.detach().reshape(10, 16).requires_grad_(need_u)
    if not need_u:  # (without u there can be no backward: the forward of an inference call)
        b, A, B = b.detach(), A.detach(), B.detach()
    seed = torch.tensor(7) if p else None
    result = torch.library.opcheck(torch.ops.lorakit.lora_linear_fwd.default, (x2, W, b, A, B, 0.5, p, seed, need_u))
    assert set(result.values()) == {"SUCCESS"}, result
    if p:  # the opaque op inside, which has no autograd of its own (the pair's formula covers it)
        args = (x2.detach(), W, b.detach(), A.detach(), B.detach(), 0.5, p, seed, need_u)
        result = torch.library.opcheck(torch.ops.lorakit.lora_linear_dropout_fwd.default, args)
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("route", ["eager", "ops"])
def test_gradcheck_float64(p: float, route: str) -> None:
    """Both routes — the autograd function and the custom ops' registered backward — against finite differences."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lora_linear if route == "eager" else lora_linear_op
    assert torch.autograd.gradcheck(lambda x, b, A, B: f(x, W, b, A, B, 0.7, p, 11), (x, b, A, B))


def _dropout_net(width: int, dropout: float) -> torch.nn.Module:
    """Linear-GELU-Linear with LoRA (B ≠ 0, so the branches count) on both linears, in training mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 8))
    net = lorakit.inject(net, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=["0", "2"]))
    for _, layer in lorakit.lora_layers(net):
        for name in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[name])
    return net.train()


def test_checkpointing_recomputes_the_same_dropout_mask() -> None:
    net = _dropout_net(32, 0.3)
    x = torch.randn(16, 32, requires_grad=True)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(5)  # the layers draw their dropout seeds from the CPU generator
        y = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False) if use_checkpoint else net(x)
        y.square().sum().backward()
        grads.append([x.grad.clone()] + [q.grad.clone() for q in net.parameters() if q.requires_grad])
        x.grad = None
        net.zero_grad(set_to_none=True)
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.manual_seed(6)  # and a different seed does change the result: the test can fail
    y = net(x)
    y.square().sum().backward()
    assert not torch.equal(x.grad, grads[0][0])


@pytest.mark.parametrize("route", ["eager", "ops"])
def test_forward_skips_u_under_no_grad(monkeypatch, route) -> None:
    """Inputs that require grad still report needs_input_grad under torch.no_grad(); the forward
    must not compute u = x Aᵀ (a full pass over x) for a backward that cannot come."""
    from types import SimpleNamespace

    from lorakit.ops import backends, torch_lora

    asked = []

    def recording_forward(*args):
        asked.append(args[8])  # need_u
        return torch_lora.lora_forward(*args)

    be = SimpleNamespace(MERGED_WEIGHT=False, lora_forward=recording_forward, lora_backward=torch_lora.lora_backward)
    monkeypatch.setattr(backends, "backend_for", lambda x: be)
    f = lora_linear if route == "eager" else lora_linear_op
    x, W, b, A, B = _inputs()
    with torch.no_grad():
        f(x, W, b, A, B, 0.5, 0.0, 0)
    f(x, W, b, A, B, 0.5, 0.0, 0)
    assert asked == [False, True]


def test_layers_with_dropout_compile_without_graph_breaks() -> None:
    """The layer draws its dropout seed as a tensor under torch.compile (int() would break the graph)."""
    net = _dropout_net(16, 0.5)
    x = torch.randn(32, 16)
    torch._dynamo.reset()
    assert torch._dynamo.explain(net)(x).graph_break_count == 0
    compiled = torch.compile(net, fullgraph=True)
    y1, y2 = compiled(x), compiled(x)
    with torch.no_grad():
        net.eval()
        y_eval = net(x)
        net.train()
    assert not torch.allclose(y1, y2) and not torch.allclose(y1, y_eval)  # fresh masks each call
    y1.square().sum().backward()
    grads = [q.grad for q in net.parameters() if q.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("need", [(True, True, True), (False, True, True), (False, False, True), (False, False, False)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_backward_outputs_never_alias(need, p) -> None:
    """Gradients that are not needed come back as placeholders: each a fresh tensor, never one shared by
    two outputs (outputs aliasing each other break CUDA graph trees; opcheck's schema test sees it on CPU)."""
    gen = torch.Generator().manual_seed(4)
    g, x = torch.randn(10, 8, generator=gen), torch.randn(10, 16, generator=gen)
    W, A, B = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen), torch.randn(8, 4, generator=gen)
    u = torch.randn(10, 4, generator=gen)
    seed = torch.tensor(7) if p else None
    for op in [torch.ops.lorakit.lora_linear_bwd] + ([torch.ops.lorakit.lora_linear_dropout_bwd] if p else []):
        result = torch.library.opcheck(op.default, (g, x, W, A, B, u, 0.5, p, seed, *need))
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_dense_dropout_route_compiles_and_is_the_lora_linear() -> None:
    """What compiled CUDA code runs with dropout: without dropout it is lora_linear; with dropout, compiled
    (fallback_random: torch's generator, as eager) it equals its eager self and the mask changes the result."""
    from lorakit.ops.custom_ops import dense_dropout_lora

    x, W, b, A, B = _inputs(9)
    x2 = x.detach().reshape(10, 16)
    torch.testing.assert_close(dense_dropout_lora(x2, W, b, A, B, 0.5, 0.0), lora_linear(x2, W, b, A, B, 0.5),
                               rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(dense_dropout_lora, fullgraph=True)
    outs = []
    for f in (dense_dropout_lora, compiled):
        torch.manual_seed(3)
        with torch._inductor.config.patch(fallback_random=True):
            h = f(x2, W, b, A, B, 0.5, 0.4)
        h.square().sum().backward()
        outs.append([h.detach(), A.grad.clone(), B.grad.clone()])
        A.grad = B.grad = b.grad = None
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0][0], lora_linear(x2, W, b, A, B, 0.5))
