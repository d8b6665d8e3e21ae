"""The Triton NF4 kernels (ops/triton_nf4.py) and the Triton route of the NF4 LoRA linear, on the CPU through
Triton's interpreter, against the torch path (``dequantize_nf4_reference``, float64 math).

One subprocess with TRITON_INTERPRET=1; tl.dot in fp32 and fp16 only (the interpreter's bf16 dot is wrong),
dequantisation bit-exact in fp32 and fp16 (the interpreter truncates float32 to bf16 where the GPU rounds, so
bf16 exactness is checked on the GPU by benchmarks/gpu_qlora.py --check).
"""

from __future__ import annotations

import pytest
from triton_interpret import interpreted, report  # tests/ is on the path (pytest; the script's own dir)

pytest.importorskip("triton")

CHECKS = ["dequantize_exact", "merged", "gemv_fp32", "gemv_fp16", "gemv_bf16", "gemv_unaligned_k", "route_fp32",
          "route_dropout_fp32"]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _nf4(d: int, k: int, seed: int = 0):
    import torch

    from lorakit.ops.nf4 import quantize_nf4

    gen = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(d, k, generator=gen) * 0.05)


def _route(p: float) -> str:
    import torch

    from lorakit.ops.nf4 import _NF4LoraLinear, dequantize_nf4_reference
    from lorakit.ops.triton_lora import keep_mask

    N, k, d, r = 37, 192, 40, 4
    t = _nf4(d, k, 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, k, generator=gen).requires_grad_()
    A = (torch.randn(r, k, generator=gen) / k**0.5).requires_grad_()
    B = torch.randn(d, r, generator=gen).requires_grad_()
    b = torch.randn(d, generator=gen).requires_grad_()
    h = _NF4LoraLinear.apply(x, t, b, A, B, 0.7, p, 5, True)
    g = torch.randn(N, d, generator=gen)
    h.backward(g)
    W = dequantize_nf4_reference(t, torch.float64)
    keep = keep_mask(N, k, p, 5, "cpu").double() if p else torch.ones(N, k, dtype=torch.float64)
    leaves = [v.detach().double().requires_grad_() for v in (x, A, B, b)]
    x64, A64, B64, b64 = leaves
    ref = x64 @ W.t() + b64 + 0.7 * ((x64 * keep / (1 - p)) @ A64.t()) @ B64.t()
    ref.backward(g.double())
    errs = [_rel(h, ref)] + [_rel(v.grad, l.grad) for v, l in zip((x, A, B, b), leaves)]
    return "" if max(errs) <= 2e-5 else f"p={p}: errors {['%.1e' % e for e in errs]}"


# (d, k, r, N, lora, bias, gemv keywords): k a multiple of 64 but not a power of two, d not a multiple of the
# row tile; k tiles that end inside a slice (k=320 in tiles of 128: 5 blocks in slices of 2 tiles); more A
# rows than programs along d (r=5, d=37: 3 programs); 67·320/64 = 335 blocks, so two nested absmaxes;
# N=1 and 3 elementwise or through tl.dot, N=16 both ways, N=19 over two token tiles.
_GEMV_CASES = (
    (67, 320, 3, 1, True, True, dict(block_k=128, split_k=2)),
    (37, 320, 5, 3, True, False, dict(block_k=128, split_k=1)),
    (37, 320, 5, 3, True, True, dict(block_k=128, split_k=3, dot_tokens=1)),
    (67, 192, 4, 16, True, True, dict(block_k=128)),
    (67, 192, 4, 16, False, True, dict(block_k=64, dot_tokens=17)),
    (40, 192, 2, 19, True, False, dict(block_d=32, block_k=128, split_k=2)),
    (37, 320, 3, 1, False, False, {}),
)


def _gemv(name: str) -> str:
    """gemv against float64 math on the reference Ŵ rounded to x's dtype (and A rounded to it)."""
    import torch

    from lorakit.ops import triton_nf4 as T
    from lorakit.ops.nf4 import dequantize_nf4_reference

    # the interpreter's bf16 tl.dot is wrong and its float32 → bf16 conversion truncates: bf16 runs the
    # elementwise path only, with a looser bound (rounding the weights by truncation: ~2⁻⁸ relative)
    dtype, tol = {"gemv_fp32": (torch.float32, 1e-6), "gemv_fp16": (torch.float16, 2e-3),
                  "gemv_bf16": (torch.bfloat16, 1e-2), "gemv_unaligned_k": (torch.float32, 1e-6)}[name]
    cases = _GEMV_CASES
    if name == "gemv_bf16":
        cases = [c[:6] + (dict(c[6], dot_tokens=64),) for c in cases]
    if name == "gemv_unaligned_k":  # blocks straddle rows: the dequantise + GEMM route
        cases = [(20, 70, 2, 2, True, True, {}), (9, 130, 3, 1, False, True, {})]
    bad = []
    for i, (d, k, r, N, lora, bias, kw) in enumerate(cases):
        t = _nf4(d, k, i)
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(N, k, generator=gen).to(dtype)
        A = torch.randn(r, k, generator=gen) / 16 if lora else None
        B = torch.randn(d, r, generator=gen) if lora else None
        b = torch.randn(d, generator=gen) if bias else None
        got = T.gemv(x, t, b, A, B, 0.5, **kw)
        ref = x.double() @ dequantize_nf4_reference(t, dtype).double().t()
        if lora:
            ref = ref + 0.5 * (x.double() @ A.to(dtype).double().t()) @ B.double().t()
        if bias:
            ref = ref + b.double()
        err = _rel(got, ref)
        if got.dtype != dtype or got.shape != (N, d) or not err <= tol:
            bad.append(f"{d}x{k} N={N} lora={lora} bias={bias} {kw}: {got.dtype} {tuple(got.shape)} {err:.2e}")
    return "; ".join(bad)


def _check(name: str) -> str:  # runs in the subprocess; returns "" or what went wrong
    import torch

    from lorakit.ops import triton_nf4 as T
    from lorakit.ops.nf4 import dequantize_nf4_reference

    if name == "dequantize_exact":
        bad = []
        for shape in ((24, 320), (7, 70), (130, 64)):  # odd sizes: partial blocks, a nibble split across rows
            t = _nf4(*shape)
            for dtype in (torch.float32, torch.float16):  # the interpreter truncates to bf16 (the GPU rounds)
                if not torch.equal(T.dequantize(t, dtype, block=256), dequantize_nf4_reference(t, dtype)):
                    bad.append(f"{shape} {dtype}")
        return "; ".join(bad)
    if name == "merged":
        t = _nf4(40, 200, 1)
        gen = torch.Generator().manual_seed(2)
        A, B = torch.randn(3, 200, generator=gen), torch.randn(40, 3, generator=gen)
        got = T.merged(t, B, A, 0.3, torch.float32, block_d=16, block_k=64)
        ref = dequantize_nf4_reference(t, torch.float64) + 0.3 * B.double() @ A.double()
        err = _rel(got, ref)
        return "" if err <= 1e-6 else f"{err:.2e}"
    if name.startswith("gemv"):
        return _gemv(name)
    if name == "route_fp32":
        return _route(0.0)
    if name == "route_dropout_fp32":
        return _route(0.25)
    return f"unknown check {name}"


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return interpreted(__file__)


@pytest.mark.parametrize("name", CHECKS)
def test_triton_nf4_matches_the_torch_path(results: dict[str, str], name: str) -> None:
    assert results[name] == "", results[name]


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is already in the environment
    report(CHECKS, _check)
