"""The Triton path of lora_linear (ops/triton_lora.py), on the CPU through Triton's interpreter.

Every check compares against float64 math with an explicit keep-mask taken from ``keep_mask`` (the
kernels' own mask): forward and backward kernels use different tile shapes, so agreement of h, ∂x, ∂A
and ∂B with one masked reference shows that the mask is a function of (seed, row, column) alone and
that backward regenerated the forward's mask.  The checks run in one subprocess with
TRITON_INTERPRET=1 (it must be set before triton is imported).  The interpreter's bf16 ``tl.dot`` is
wrong (triton 3.9), so half precision is covered by fp16 here and bf16 by benchmarks/gpu_lora.py on a GPU.
"""

from __future__ import annotations

import pytest
from triton_interpret import interpreted, report  # tests/ is on the path (pytest; the script's own dir)

pytest.importorskip("triton")

CHECKS = ["mask", "lora_fp32", "lora_fp16", "needs", "merge", "tall_product", "xa_blocks", "compiled_op"]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _reference(x, W, bias, A, B, s, keep, p, g):
    """float64 h, ∂x, ∂A, ∂B for h = x Wᵀ + b + s·(x ⊙ keep / (1-p)) Aᵀ Bᵀ."""
    x64 = x.double().requires_grad_()
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    h = s * ((x64 * keep.double() / (1 - p)) @ A64.t()) @ B64.t()
    if W is not None:
        h = h + x64 @ W.double().t()
    if bias is not None:
        h = h + bias.double()
    h.backward(g.double())
    return h.detach(), x64.grad, A64.grad, B64.grad


def _case(T, dtype, p, bias, with_weight, r=5, N=70, k=96, d=40, seed=1234):
    import torch

    gen = torch.Generator().manual_seed(seed + int(p * 100) + 7 * bias + 3 * with_weight)
    x = torch.randn(N, k, generator=gen).to(dtype)
    W = (torch.randn(d, k, generator=gen) / k**0.5).to(dtype) if with_weight else None
    b = torch.randn(d, generator=gen).to(dtype) if bias else None
    A = torch.randn(r, k, generator=gen) / k**0.5  # adapters stay float32, as lorakit keeps them
    B = torch.randn(d, r, generator=gen)  # ≠ 0, so the branch counts
    g = torch.randn(N, d, generator=gen).to(dtype)
    keep = T.keep_mask(N, k, p, seed, "cpu") if p else torch.ones(N, k, dtype=torch.bool)
    h, u = T.lora_forward(x, W, b, A, B, 0.7, p, seed, True)
    gx, gA, gB = T.lora_backward(g, x, W, A, B, u, 0.7, p, seed, True, True, True)
    ref = _reference(x, W, b, A, B, 0.7, keep, p, g)
    return max(_rel(a, e) for a, e in zip((h, gx, gA, gB), ref)), (h, gx, gA, gB)


def _check(name: str) -> str:  # runs in the subprocess; returns "" or what went wrong
    import torch

    from lorakit.ops import triton_lora as T

    if name == "mask":
        m1, m2 = T.keep_mask(64, 256, 0.3, 11, "cpu"), T.keep_mask(64, 256, 0.3, 11, "cpu")
        m3 = T.keep_mask(64, 256, 0.3, 12, "cpu")
        drop = 1 - m1.float().mean().item()  # 16384 draws: σ ≈ 0.0036
        if not torch.equal(m1, m2):
            return "same seed gave different masks"
        if torch.equal(m1, m3):
            return "different seeds gave the same mask"
        if abs(drop - 0.3) > 0.02:
            return f"drop fraction {drop:.4f} for p = 0.3"
        if not T.keep_mask(8, 40, 0.0, 11, "cpu").all():
            return "p = 0 dropped something"
        if T.drop_threshold(0.05) != 3277:
            return f"threshold {T.drop_threshold(0.05)}"
        return ""
    if name in ("lora_fp32", "lora_fp16"):
        dtype, tol = (torch.float32, 1e-5) if name == "lora_fp32" else (torch.float16, 3e-3)
        bad = []
        for p in (0.0, 0.2):
            for bias in (False, True):
                for with_weight in (True, False):
                    err, _ = _case(T, dtype, p, bias and with_weight, with_weight)
                    if not err <= tol:
                        bad.append(f"p={p} bias={bias} weight={with_weight}: {err:.2e}")
        return "; ".join(bad)
    if name == "needs":  # gradients that are not asked for are not computed; the others are unchanged
        _, full = _case(T, torch.float32, 0.2, False, True)
        x, W, A, B = (torch.randn(70, 96), torch.randn(40, 96), torch.randn(5, 96), torch.randn(40, 5))
        for need in ((True, False, False), (False, True, False), (False, False, True), (False, False, False)):
            h, u = T.lora_forward(x, W, None, A, B, 0.7, 0.2, 1, True)
            out = T.lora_backward(torch.ones_like(h), x, W, A, B, u, 0.7, 0.2, 1, *need)
            if [o is not None for o in out] != list(need):
                return f"need {need} gave {[o is not None for o in out]}"
        h, u = T.lora_forward(x, W, None, A, B, 0.7, 0.0, 0, False)
        return "" if u.shape == (0, 5) else f"need_u=False still returned u {tuple(u.shape)}"
    if name == "merge":
        W = torch.randn(96, 70).t()  # a transposed view, as for transformers' Conv1D
        B, A = torch.randn(70, 5), torch.randn(5, 96)
        out = T.merged_weight(W, B, A, 0.3)
        err = _rel(out, W.double() + 0.3 * B.double() @ A.double())
        return "" if err <= 1e-6 and out.is_contiguous() else f"merge error {err:.2e}"
    if name == "tall_product":
        M, P, A = torch.randn(130, 72), torch.randn(130, 5), torch.randn(5, 72)
        out, gx = T.tall_product(M, P, 0.5, transpose_out=True)
        e1 = _rel(out, 0.5 * M.double().t() @ P.double())
        out2, gx2 = T.tall_product(M, P, 0.5, A=A)
        e2 = max(_rel(out2, 0.5 * P.double().t() @ M.double()), _rel(gx2, P.double() @ A.double()))
        return "" if e1 <= 1e-6 and e2 <= 1e-6 and gx is None else f"errors {e1:.2e} {e2:.2e}"
    if name == "xa_blocks":  # the mask does not depend on the kernel's tile shape
        x, A = torch.randn(50, 200), torch.randn(5, 200)
        keep = T.keep_mask(50, 200, 0.4, 99, "cpu")
        ref = (x.double() * keep) @ A.double().t()
        errs = [_rel(T.xa(x, A, 0.4, 99, block_m=bm, block_k=bk), ref) for bm, bk in ((16, 16), (32, 64), (16, 256))]
        return "" if max(errs) <= 1e-6 else f"errors {errs}"
    if name == "compiled_op":  # the custom ops with the Triton backend, eagerly: the same function as the kernels
        from lorakit.ops import backends, custom_ops as lora_op

        backends.backend_for = lambda x: T
        bad = []
        for p in (0.0, 0.2):
            x, W, b = torch.randn(70, 96), torch.randn(40, 96) / 10, torch.randn(40)
            A, B = (torch.randn(5, 96) / 10).requires_grad_(), torch.randn(40, 5).requires_grad_()
            x.requires_grad_()
            h = lora_op.lora_linear_op(x, W, b, A, B, 0.7, p, 1234)
            g = torch.randn_like(h)
            h.backward(g)
            keep = T.keep_mask(70, 96, p, 1234, "cpu") if p else torch.ones(70, 96, dtype=torch.bool)
            ref = _reference(x.detach(), W, b, A.detach(), B.detach(), 0.7, keep, p, g)
            err = max(_rel(a, e) for a, e in zip((h, x.grad, A.grad, B.grad), ref))
            if not err <= 1e-5:
                bad.append(f"p={p}: {err:.2e}")
        return "; ".join(bad)
    return f"unknown check {name}"


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return interpreted(__file__)


@pytest.mark.parametrize("name", CHECKS)
def test_triton_kernels_match_float64(results: dict[str, str], name: str) -> None:
    assert results[name] == "", results[name]


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is already in the environment
    report(CHECKS, _check)
