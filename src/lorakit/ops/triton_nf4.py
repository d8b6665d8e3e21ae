"""The GPU path of NF4 weights (``ops.nf4``): dequantise for cuBLAS, or multiply straight from 4 bits.

    ŵ[i] = c[q_i] · m̂_{i // 64},   m̂_b = e[a_b] · M_{b // 256} + μ      (i: row-major index into W (d, k))

* :func:`dequantize` writes Ŵ (d, k) in one pass: 0.52 bytes read and 2 written per weight (bf16).  For
  many tokens the GEMM that follows (cuBLAS) is compute-bound and the pass is small beside it.
* :func:`merged` writes Ŵ' = Ŵ + s·B A instead: the LoRA update folded into the dequantisation pass, so a
  training step's forward and input gradient are one GEMM each, as on a bf16 base (``ops.triton_lora``).
* :func:`gemv` computes h = x Ŵᵀ + s·(x Aᵀ) Bᵀ + b for a few tokens (decode) from the packed codes, in one
  launch: the weight is read once at 4.13 bits instead of being written and read back at 16, and the host
  (which bounds eager decode) issues one kernel a layer.

Every value is formed as in :func:`lorakit.ops.nf4.dequantize_nf4_reference` (float32 product, rounded
once to the output dtype), so the kernels' Ŵ equals bitsandbytes' dequantisation bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import cdiv, next_pow2
from .nf4_format import BLOCK, NESTED_BLOCK, NF4Tensors, dynamic_map, nf4_map

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def available() -> bool:
    """Whether the Triton kernels can run here."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _weights(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, idx, ok):
        """ŵ (float32) at flat indices ``idx`` (any shape, int64) where ``ok``; 0 elsewhere."""
        byte = tl.load(packed_ptr + idx // 2, mask=ok, other=0).to(tl.int32)
        q = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
        blk = idx // 64
        a = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + blk // 256, mask=ok, other=0.0)
        m = tl.load(dyn_ptr + a, mask=ok, other=0.0) * nested + tl.load(offset_ptr)
        return tl.load(code_ptr + q, mask=ok, other=0.0) * m

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, out_ptr, n,
                        BLOCK_N: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = idx < n
        w = _weights(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, idx, ok)
        tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _merged_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, b_ptr, a_ptr, out_ptr,
                       D, K, R, scale, R_PAD: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
        # Ŵ'[rows, cols] = Ŵ[rows, cols] + s · B[rows] A[:, cols]      B: (D, R)  A: (R, K)
        rows = tl.program_id(0) * BD + tl.arange(0, BD)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, R_PAD)
        ok = (rows < D)[:, None] & (cols < K)[None, :]
        idx = rows[:, None].to(tl.int64) * K + cols[None, :]
        w = _weights(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, idx, ok)
        b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=(rows < D)[:, None] & (rr < R)[None, :], other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None] & (cols < K)[None, :], other=0.0)
        merged = w + scale * tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
        tl.store(out_ptr + idx, merged.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, a_ptr, b_ptr,
                     bias_ptr, out_ptr, N, D, K, R, stride_xn, scale, HAS_LORA: tl.constexpr,
                     HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     BK: tl.constexpr, PRECISION: tl.constexpr):
        # out[tok, rows] = x[tok] Ŵ[rows]ᵀ (+ s · (x[tok] Aᵀ) B[rows]ᵀ) (+ bias[rows])
        # Every program also forms u = x Aᵀ (r·k, read from L2 by each): one launch for the whole layer.
        tok = tl.program_id(1) * BN + tl.arange(0, BN)
        rows = tl.program_id(0) * BD + tl.arange(0, BD)
        tok_ok, row_ok = tok < N, rows < D
        rr = tl.arange(0, R_PAD)
        acc = tl.zeros((BN, BD), dtype=tl.float32)
        u = tl.zeros((BN, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            col_ok = cols < K
            x = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xn + cols[None, :],
                        mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
            idx = rows[:, None].to(tl.int64) * K + cols[None, :]
            w = _weights(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, idx,
                         row_ok[:, None] & col_ok[None, :])
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
            if HAS_LORA:
                a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None] & col_ok[None, :], other=0.0)
                u = tl.dot(x, tl.trans(a.to(x.dtype)), u, input_precision=PRECISION)
        if HAS_LORA:
            b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)
            acc += scale * tl.dot(u, tl.trans(b.to(tl.float32)), input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + tok[:, None].to(tl.int64) * D + rows[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & row_ok[None, :])


# m̂ = e[a]·M + μ and ŵ = c[q]·m̂ are two roundings each in bitsandbytes (and the torch reference); a fused
# multiply-add would round once and differ in the last bit (seen on the H200: 5 % of float32 values).
_EXACT = {"enable_fp_fusion": False}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _tables(t: NF4Tensors) -> tuple[Tensor, Tensor]:
    dev = t.packed.device
    return nf4_map(dev), dynamic_map(dev)


def _state(t: NF4Tensors) -> tuple[Tensor, ...]:
    code, dyn = _tables(t)
    return t.packed, t.absmax, t.nested_absmax, t.offset, code, dyn


def dequantize(t: NF4Tensors, dtype: torch.dtype = torch.bfloat16, *, block: int = 1024) -> Tensor:
    """Ŵ (d, k) in ``dtype``, one Triton pass."""
    out = torch.empty(t.shape, dtype=dtype, device=t.packed.device)
    n = t.numel
    if n:
        _dequant_kernel[(cdiv(n, block),)](*_state(t), out, n, BLOCK_N=block, **_EXACT)
    return out


def merged(t: NF4Tensors, B: Tensor, A: Tensor, scale: float, dtype: torch.dtype, *, block_d: int = 32,
           block_k: int = 128, num_warps: int = 4) -> Tensor:
    """Ŵ' = Ŵ + s·B A (d, k) in ``dtype``, one Triton pass; B: (d, r), A: (r, k) in any float dtype (the
    product is taken in float32)."""
    D, K = t.shape
    R = A.shape[0]
    out = torch.empty((D, K), dtype=dtype, device=t.packed.device)
    _merged_kernel[(cdiv(D, block_d), cdiv(K, block_k))](
        *_state(t), B.contiguous(), A.contiguous(), out, D, K, R, float(scale), R_PAD=max(16, next_pow2(R)),
        BD=block_d, BK=block_k, PRECISION=_precision(torch.float32), num_warps=num_warps, **_EXACT)
    return out


def gemv(x: Tensor, t: NF4Tensors, bias: Tensor | None = None, A: Tensor | None = None, B: Tensor | None = None,
         scale: float = 1.0, *, block_d: int = 16, block_k: int = 128, num_warps: int = 4) -> Tensor:
    """h = x Ŵᵀ + s · (x Aᵀ) Bᵀ + b for x: (N, k) with few rows, from the packed weight, in one launch;
    A: (r, k), B: (d, r) (both or neither; x Aᵀ is kept in float32).  Returns (N, d) in x's dtype."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    N, K = x.shape
    D = t.shape[0]
    out = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    BN = 16  # tl.dot's smallest tile; decode's single row is padded to it
    R = B.shape[1] if B is not None else 1
    _gemv_kernel[(cdiv(D, block_d), cdiv(N, BN))](
        x, *_state(t), A.contiguous() if A is not None else x, B.contiguous() if B is not None else x,
        bias if bias is not None else x, out, N, D, K, R, x.stride(0), float(scale),
        HAS_LORA=A is not None, HAS_BIAS=bias is not None, R_PAD=max(16, next_pow2(R)), BN=BN, BD=block_d,
        BK=block_k, PRECISION=_precision(x.dtype), num_warps=num_warps, **_EXACT)
    return out


__all__ = ["available", "dequantize", "gemv", "merged", "BLOCK", "NESTED_BLOCK"]
