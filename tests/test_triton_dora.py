"""The Triton path of dora_linear (ops/triton_dora.py), on the CPU through Triton's interpreter.

Every check compares with float64 math written from the equations (ops/dora.py's docstring).  fp32 and
fp16 here; the interpreter's bf16 ``tl.dot`` is wrong (see test_triton_lora.py), bf16 runs on the GPU.
"""

from __future__ import annotations

import pytest
from triton_interpret import interpreted, report  # tests/ is on the path (pytest; the script's own dir)

pytest.importorskip("triton")

CHECKS = ["scaled_weight", "column_dot", "dora_fp32", "dora_fp16", "needs"]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _case(dtype, bias, transposed, N=70, k=96, d=40, r=5, seed=0):
    """(ours, reference): h and the gradients of x, A, B, m for one random ∂L/∂h."""
    import torch

    from lorakit.ops import triton_dora as T

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, k, generator=gen).to(dtype)
    W = (torch.randn(k, d, generator=gen).t() if transposed else torch.randn(d, k, generator=gen)) / k**0.5
    W = W.to(dtype)
    b = torch.randn(d, generator=gen).to(dtype) if bias else None
    A = torch.randn(r, k, generator=gen) / k**0.5
    B = torch.randn(d, r, generator=gen) * 0.3
    m = torch.rand(d, generator=gen) + 0.5
    g = torch.randn(N, d, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
    h = T.dora_linear_cuda(leaves[0], W, b, leaves[1], leaves[2], 0.7, leaves[3], None)
    h.backward(g)
    ours = [h.detach()] + [t.grad for t in leaves]
    ref_leaves = [t.double().requires_grad_() for t in (x, A, B, m)]
    x64, A64, B64, m64 = ref_leaves
    W64 = W.double()
    n = torch.linalg.norm(W64 + 0.7 * B64 @ A64, dim=1).detach()
    ref = (m64 / n) * (x64 @ W64.t() + 0.7 * x64 @ A64.t() @ B64.t())
    if b is not None:
        ref = ref + b.double()
    ref.backward(g.double())
    return ours, [ref.detach()] + [t.grad for t in ref_leaves]


def _check(name: str) -> str:  # runs in the subprocess; returns "" or what went wrong
    import torch

    from lorakit.ops import triton_dora as T

    if name == "scaled_weight":
        bad = []
        for transposed in (False, True):
            W = torch.randn(70, 45).t() if transposed else torch.randn(45, 70)  # (45, 70) either way
            A, B, m = torch.randn(3, 70), torch.randn(45, 3), torch.rand(45) + 0.5
            merged = W.double() + 0.4 * B.double() @ A.double()
            n_ref = merged.norm(dim=1)
            n, Wf = T.scaled_weight(W, A, B, 0.4, m, block_d=16, block_k=32)
            _, Wf2 = T.scaled_weight(W, A, B, 0.4, m, n)  # the saved-norm route of backward
            e = [_rel(n, n_ref), _rel(Wf, (m.double() / n_ref)[:, None] * merged), _rel(Wf2, Wf),
                 _rel(T.weight_norm(W, A, B, 0.4), n_ref)]
            if max(e) > 1e-6:
                bad.append(f"transposed={transposed}: {e}")
        return "; ".join(bad)
    if name == "column_dot":
        g, h, b = torch.randn(130, 72), torch.randn(130, 72), torch.randn(72)
        e1 = _rel(T.column_dot(g, h), (g.double() * h.double()).sum(0))
        d = torch.rand(72) + 0.5
        e2 = _rel(T.column_dot(g, h, b, d, block_m=16, block_c=32),
                  (g.double() * (h.double() - b.double())).sum(0) / d.double())
        return "" if max(e1, e2) <= 1e-6 else f"errors {e1:.2e} {e2:.2e}"
    if name in ("dora_fp32", "dora_fp16"):
        dtype, tol = (torch.float32, 1e-5) if name == "dora_fp32" else (torch.float16, 3e-3)
        bad = []
        for bias in (False, True):
            for transposed in (False, True):
                ours, ref = _case(dtype, bias, transposed)
                errs = [_rel(a, e) for a, e in zip(ours, ref)]
                if max(errs) > tol:
                    bad.append(f"bias={bias} transposed={transposed}: h, ∂x, ∂A, ∂B, ∂m errors {errs}")
        return "; ".join(bad)
    if name == "needs":  # a frozen input gets no gradient and forward keeps no u when B is frozen
        x, W, A, B, m = torch.randn(20, 32), torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4), torch.rand(16)
        m.requires_grad_()
        h = T.dora_linear_cuda(x, W, None, A, B, 1.0, m, None)
        loss = h.sum()
        ok = m.grad is None
        h.data.fill_(7.0)  # a raw in-place write into the output (as liger's RoPE does) must not change ∂m
        loss.backward()
        merged = W.double() + B.double() @ A.double()  # s = 1
        expected = (x.double() @ merged.t()).sum(0) / torch.linalg.norm(merged, dim=1)
        if not ok or m.grad is None or x.grad is not None:
            return "gradients where none were asked for"
        return "" if _rel(m.grad, expected) < 1e-5 else f"∂m after a write into h: {_rel(m.grad, expected):.2e}"
    return f"unknown check {name}"


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return interpreted(__file__)


@pytest.mark.parametrize("name", CHECKS)
def test_triton_dora_kernels_match_float64(results: dict[str, str], name: str) -> None:
    assert results[name] == "", results[name]


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is already in the environment
    report(CHECKS, _check)
