"""The Triton route of the fused SwiGLU down-projection (ops/triton_swiglu.py and ops/swiglu.py with the
Triton backend), on the CPU through Triton's interpreter.

The elementwise kernels are compared with torch's silu / silu_backward, and the whole route — h from the
kernel, triton_lora's forward and backward on it, h recomputed, the one-pass SwiGLU backward — with
float64 math and the Triton kernels' own keep-mask (``triton_lora.keep_mask``).  One subprocess with
TRITON_INTERPRET=1 (set before triton is imported); fp32 and fp16 (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import pytest
from triton_interpret import interpreted, report  # tests/ is on the path (pytest; the script's own dir)

pytest.importorskip("triton")

CHECKS = ["elementwise_fp32", "elementwise_fp16", "route_fp32", "route_fp16", "needs"]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _route_error(dtype, p: float, bias: bool, N: int = 37, k: int = 80, d: int = 24, r: int = 4) -> float:
    import torch

    from lorakit.ops import backends, triton_lora
    from lorakit.ops.swiglu import swiglu_lora_down
    from lorakit.ops.triton_lora import keep_mask

    backends.backend_for = lambda x: triton_lora  # the CUDA route, on CPU tensors through the interpreter
    gen = torch.Generator().manual_seed(int(p * 10) + bias)
    gate, up = torch.randn(N, k, generator=gen).to(dtype), torch.randn(N, k, generator=gen).to(dtype)
    W = (torch.randn(d, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(d, generator=gen).to(dtype) if bias else None
    A, B = torch.randn(r, k, generator=gen) / k**0.5, torch.randn(d, r, generator=gen)
    g = torch.randn(N, d, generator=gen).to(dtype)
    ts = [t.clone().requires_grad_() for t in (gate, up, A, B)]
    y = swiglu_lora_down(ts[0], ts[1], W, b, ts[2], ts[3], 0.7, p, 5)
    y.backward(g)
    got = (y.detach(), *(t.grad for t in ts))
    # float64 by hand, with the kernels' mask
    keep = keep_mask(N, k, p, 5, "cpu").double() if p else torch.ones(N, k, dtype=torch.float64)
    leaves = [t.double().requires_grad_() for t in (gate, up, A, B)]
    g64, u64, A64, B64 = leaves
    h = g64 * torch.sigmoid(g64) * u64
    ref = h @ W.double().t() + 0.7 * ((h * keep / (1 - p)) @ A64.t()) @ B64.t()
    if b is not None:
        ref = ref + b.double()
    ref.backward(g.double())
    expected = (ref.detach(), g64.grad, u64.grad, A64.grad, B64.grad)
    return max(_rel(a, e) for a, e in zip(got, expected))


def _check(name: str) -> str:  # runs in the subprocess; returns "" or what went wrong
    import torch
    import torch.nn.functional as F

    from lorakit.ops import backends, triton_lora
    from lorakit.ops import triton_swiglu as T
    from lorakit.ops.swiglu import swiglu_lora_down

    if name.startswith("elementwise"):
        dtype, tol = (torch.float32, 1e-6) if name.endswith("fp32") else (torch.float16, 1e-3)
        gen = torch.Generator().manual_seed(0)
        gate, up, gh = (torch.randn(3, 1500, generator=gen).to(dtype) * 4 for _ in range(3))  # not a multiple of the block
        e_h = _rel(T.swiglu_forward(gate, up), F.silu(gate) * up)
        g_gate, g_up = T.swiglu_backward(gh.clone(), gate, up)
        e_up = _rel(g_up, gh * F.silu(gate))
        e_gate = _rel(g_gate, torch.ops.aten.silu_backward(gh * up, gate))
        worst = max(e_h, e_up, e_gate)
        return "" if worst <= tol else f"h {e_h:.2e} ∂up {e_up:.2e} ∂gate {e_gate:.2e}"
    if name.startswith("route"):
        dtype, tol = (torch.float32, 1e-5) if name.endswith("fp32") else (torch.float16, 3e-3)
        bad = [f"p={p} bias={bias}: {err:.2e}" for p in (0.0, 0.25) for bias in (False, True)
               if not (err := _route_error(dtype, p, bias)) <= tol]
        return "; ".join(bad)
    if name == "needs":  # only ∂A and ∂B asked for (the MLP's input needs no gradient)
        gate, up, W = torch.randn(9, 16), torch.randn(9, 16), torch.randn(8, 16)
        A, B = torch.randn(2, 16).requires_grad_(), torch.randn(8, 2).requires_grad_()
        backends.backend_for = lambda x: triton_lora
        swiglu_lora_down(gate, up, W, None, A, B, 1.0, 0.0, 0).sum().backward()
        out = [gate.grad, up.grad, W.grad, A.grad, B.grad]
        return "" if [o is not None for o in out] == [False, False, False, True, True] else f"got {out}"
    return f"unknown check {name}"


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return interpreted(__file__)


@pytest.mark.parametrize("name", CHECKS)
def test_triton_swiglu_matches_references(results: dict[str, str], name: str) -> None:
    assert results[name] == "", results[name]


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is already in the environment
    report(CHECKS, _check)
