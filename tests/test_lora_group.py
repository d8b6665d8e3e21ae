"""lora_linear_group: m LoRA linears on one input as one autograd node.

References: float64 math written out per member, and m separate calls of lora_linear; the Triton
route (merged weights, one xa pass, one tall_product for every ∂A) runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpret import interpreted, report  # tests/ is on the path (pytest; the script's own dir)

from lorakit.ops import lora_linear
from lorakit.ops.lora_group import lora_linear_group

K = 12
MEMBERS = [(10, 3, True), (7, 2, False), (10, 5, True)]  # (d_i, r_i, has bias)


def make(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, K, generator=g, dtype=dtype)
    Ws = [torch.randn(d, K, generator=g, dtype=dtype) for d, _, _ in MEMBERS]
    bs = [torch.randn(d, generator=g, dtype=dtype) if has_b else None for d, _, has_b in MEMBERS]
    As = [torch.randn(r, K, generator=g, dtype=dtype) for _, r, _ in MEMBERS]
    Bs = [torch.randn(d, r, generator=g, dtype=dtype) for d, r, _ in MEMBERS]
    scales = [0.5, 2.0, 1.25]
    return x, Ws, bs, As, Bs, scales


def test_gradcheck_float64():
    x, Ws, bs, As, Bs, scales = make()
    leaves = [t.requires_grad_() for t in [x, *As, *Bs]]
    m = len(MEMBERS)

    def fn(x, *ab):
        return lora_linear_group(x, Ws, bs, ab[:m], ab[m:], scales)

    assert torch.autograd.gradcheck(fn, leaves)


def test_matches_hand_written_float64():
    x, Ws, bs, As, Bs, scales = make()
    x.requires_grad_()
    for t in As + Bs:
        t.requires_grad_()
    outs = lora_linear_group(x, Ws, bs, As, Bs, scales)
    grads = [torch.randn_like(h) for h in outs]
    torch.autograd.backward(outs, grads)
    got = [x.grad.clone()] + [t.grad.clone() for t in As + Bs]
    for t in [x, *As, *Bs]:
        t.grad = None
    refs = []
    for W, b, A, B, s in zip(Ws, bs, As, Bs, scales):
        h = x @ W.t() + s * (x @ A.t()) @ B.t()
        refs.append(h + b if b is not None else h)
    torch.autograd.backward(refs, grads)
    for h, ref in zip(outs, refs):
        torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, [x.grad] + [t.grad for t in As + Bs]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_same_as_separate_lora_linear_fp32_with_an_unused_member():
    x, Ws, bs, As, Bs, scales = make(torch.float32, seed=1)
    leaves = [x, *As, *Bs]

    def run(grouped: bool):
        ts = [t.detach().clone().requires_grad_() for t in leaves]
        xx, As_, Bs_ = ts[0], ts[1:4], ts[4:]
        if grouped:
            outs = lora_linear_group(xx, Ws, bs, As_, Bs_, scales)
        else:
            outs = [lora_linear(xx, W, b, A, B, s) for W, b, A, B, s in zip(Ws, bs, As_, Bs_, scales)]
        (outs[0].square().sum() + outs[2].sin().sum()).backward()  # member 1 does not reach the loss
        return [o.detach() for o in outs], [t.grad for t in ts]

    (o1, g1), (o2, g2) = run(True), run(False)
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inference_skips_autograd_and_equals_the_training_route(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module = importlib.import_module("lorakit.ops.lora_group")
    x, Ws, bs, As, Bs, scales = make()
    for t in [x, *As, *Bs]:
        t.requires_grad_()
    ref = lora_linear_group(x, Ws, bs, As, Bs, scales)  # the autograd node
    assert all(h.requires_grad for h in ref)
    calls = []
    monkeypatch.setattr(module._LoraGroup, "apply", lambda *a: calls.append(a))  # would return None
    with torch.no_grad():
        outs = lora_linear_group(x, Ws, bs, As, Bs, scales)
    detached = [[t.detach() for t in ts] for ts in (As, Bs)]
    plain = lora_linear_group(x.detach(), Ws, bs, *detached, scales)  # grad mode on, nothing requires grad
    assert calls == []
    for h, h_plain, h_ref in zip(outs, plain, ref):
        assert not h.requires_grad and not h_plain.requires_grad
        torch.testing.assert_close(h, h_ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(h_plain, h_ref.detach(), rtol=0, atol=0)


def test_member_count_must_agree():
    x, Ws, bs, As, Bs, scales = make()
    with pytest.raises(ValueError, match="one weight, bias, A, B and scale per member"):
        lora_linear_group(x, Ws, bs, As[:2], Bs, scales)


def _triton_check(name: str) -> str:  # the subprocess side, TRITON_INTERPRET=1
    from lorakit.ops import backends, triton_lora

    backends.backend_for = lambda x: triton_lora  # the CUDA route, on CPU tensors through the interpreter
    _, Ws, bs, As, Bs, scales = make(torch.float32, seed=2)
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(3))
    ts = [t.clone().requires_grad_() for t in [x, *As, *Bs]]
    outs = lora_linear_group(ts[0], Ws, bs, ts[1:4], ts[4:], scales)
    grads = [torch.randn_like(h) for h in outs]
    torch.autograd.backward(outs, grads)
    x64 = x.double().requires_grad_()
    A64 = [A.double().requires_grad_() for A in As]
    B64 = [B.double().requires_grad_() for B in Bs]
    refs = []
    for W, b, A, B, s in zip(Ws, bs, A64, B64, scales):
        h = x64 @ W.double().t() + s * (x64 @ A.t()) @ B.t()
        refs.append(h + b.double() if b is not None else h)
    torch.autograd.backward(refs, [g.double() for g in grads])
    got = [*outs, *(t.grad for t in ts)]
    want = [*refs, x64.grad, *(a.grad for a in A64), *(b.grad for b in B64)]
    errs = [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]
    return "" if max(errs) <= 1e-5 else f"relative errors {errs}"


def test_triton_route_under_interpreter():
    pytest.importorskip("triton")
    assert interpreted(__file__)["group"] == ""


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is already in the environment
    report(["group"], _triton_check)


def test_nf4_member_weights_give_what_their_dequantized_values_give():
    """QLoRA: a member's 4-bit weight (NF4Tensors) is dequantised where it is used, in forward and for ∂x;
    the group over packed weights (here with a dense member among them) equals the group over the
    dequantised tensors in float64, passes gradcheck, and keeps no dense copy of a 4-bit weight."""
    from lorakit.ops.nf4 import dequantize_nf4_reference, quantize_nf4

    x, Ws, bs, As, Bs, scales = make(seed=2)
    packed = [quantize_nf4(W.float()) for W in Ws]
    dense = [dequantize_nf4_reference(t, torch.float64) for t in packed]
    mixed = [packed[0], dense[1], packed[2]]
    leaves = [t.requires_grad_() for t in [x, *As, *Bs]]
    m = len(MEMBERS)

    def run(weights):
        outs = lora_linear_group(x, weights, bs, As, Bs, scales)
        torch.autograd.backward(outs, [torch.full_like(h, 0.5) + h for h in outs])
        got = [h.detach() for h in outs] + [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        return got

    for a, e in zip(run(mixed), run(dense)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, *ab: lora_linear_group(x, mixed, bs, ab[:m], ab[m:], scales), leaves)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear_group(x, mixed, bs, As, Bs, scales)
    shapes = [tuple(t.shape) for t in saved]
    assert shapes.count((MEMBERS[0][0], K)) == 1  # the dense member's weight only, never a dequantised one
