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

CHECKS = ["mask", "lora_fp32", "lora_fp16", "needs", "routes", "merge", "tall_product", "xa_blocks"]


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


def _case(T, dtype, p, bias, with_weight, r=5, N=70, k=96, d=40, seed=1234, keep_merged=False):
    import torch

    gen = torch.Generator().manual_seed(seed + int(p * 100) + 7 * bias + 3 * with_weight)
    x = torch.randn(N, k, generator=gen).to(dtype)
    W = (torch.randn(d, k, generator=gen) / k**0.5).to(dtype) if with_weight else None
    b = torch.randn(d, generator=gen).to(dtype) if bias else None
    A = torch.randn(r, k, generator=gen) / k**0.5  # adapters stay float32, as lorakit keeps them
    B = torch.randn(d, r, generator=gen)  # ≠ 0, so the branch counts
    g = torch.randn(N, d, generator=gen).to(dtype)
    keep = T.keep_mask(N, k, p, seed, "cpu") if p else torch.ones(N, k, dtype=torch.bool)
    h, u, merged = T.lora_forward(x, W, b, A, B, 0.7, p, seed, True, keep_merged)
    if (merged is not None) != (keep_merged and p == 0 and with_weight):
        raise AssertionError(f"keep_merged={keep_merged}, p={p}, weight={with_weight}: W' {merged is not None}")
    gx, gA, gB = T.lora_backward(g, x, W, A, B, u, 0.7, p, seed, True, True, True, merged)
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
                    for keep in (False, True):  # W' rebuilt in backward, or handed over by forward
                        err, _ = _case(T, dtype, p, bias and with_weight, with_weight, keep_merged=keep)
                        if not err <= tol:
                            bad.append(f"p={p} bias={bias} weight={with_weight} keep={keep}: {err:.2e}")
        return "; ".join(bad)
    if name == "needs":  # gradients that are not asked for are not computed; the others are unchanged
        _, full = _case(T, torch.float32, 0.2, False, True)
        x, W, A, B = (torch.randn(70, 96), torch.randn(40, 96), torch.randn(5, 96), torch.randn(40, 5))
        for need in ((True, False, False), (False, True, False), (False, False, True), (False, False, False)):
            h, u, _ = T.lora_forward(x, W, None, A, B, 0.7, 0.2, 1, True)
            out = T.lora_backward(torch.ones_like(h), x, W, A, B, u, 0.7, 0.2, 1, *need)
            if [o is not None for o in out] != list(need):
                return f"need {need} gave {[o is not None for o in out]}"
        h, u, _ = T.lora_forward(x, W, None, A, B, 0.7, 0.0, 0, False)
        return "" if u.shape == (0, 5) else f"need_u=False still returned u {tuple(u.shape)}"
    if name == "routes":  # the alternative host routes compute the same function
        bad = []
        base = {p: _case(T, torch.float32, p, True, True)[1] for p in (0.0, 0.2)}
        for flag in ("SKINNY_BY_CUBLAS", "FUSED_G_PASS"):
            setattr(T, flag, True)
            try:
                for p in (0.0, 0.2):
                    err = max(_rel(a, b) for a, b in zip(_case(T, torch.float32, p, True, True)[1], base[p]))
                    if not err <= 1e-5:
                        bad.append(f"{flag} p={p}: {err:.2e}")
            finally:
                setattr(T, flag, False)
        return "; ".join(bad)
    if name == "merge":
        W = torch.randn(96, 70).t()  # a transposed view, as for transformers' Conv1D
        B, A = torch.randn(70, 5), torch.randn(5, 96)
        out = T.merged_weight(W, B, A, 0.3)
        err = _rel(out, W.double() + 0.3 * B.double() @ A.double())
        return "" if err <= 1e-6 and out.is_contiguous() else f"merge error {err:.2e}"
    if name == "tall_product":
        M, P, Fm = torch.randn(130, 72), torch.randn(130, 5), torch.randn(72, 5)
        out, gx, y = T.tall_product(M, P, 0.5, transpose_out=True, F=Fm)
        e1 = _rel(out, 0.5 * M.double().t() @ P.double())
        e2 = _rel(y, 0.5 * M.double() @ Fm.double())
        return "" if e1 <= 1e-6 and e2 <= 1e-6 and gx is None else f"errors {e1:.2e} {e2:.2e}"
    if name == "xa_blocks":  # the mask does not depend on the kernel's tile shape
        x, A = torch.randn(50, 200), torch.randn(5, 200)
        keep = T.keep_mask(50, 200, 0.4, 99, "cpu")
        ref = (x.double() * keep) @ A.double().t()
        errs = [_rel(T.xa(x, A, 0.4, 99, block_m=bm, block_k=bk), ref) for bm, bk in ((16, 16), (32, 64), (16, 256))]
        return "" if max(errs) <= 1e-6 else f"errors {errs}"
    return f"unknown check {name}"


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return interpreted(__file__)


@pytest.mark.parametrize("name", CHECKS)
def test_triton_kernels_match_float64(results: dict[str, str], name: str) -> None:
    assert results[name] == "", results[name]


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is already in the environment
    report(CHECKS, _check)
