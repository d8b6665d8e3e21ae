"""The GPU path of NF4 weights (``ops.nf4``): dequantise for cuBLAS, or multiply straight from 4 bits.

    ŵ[i] = c[q_i] · m̂_{i // 64},   m̂_b = e[a_b] · M_{b // 256} + μ      (i: row-major index into W (d, k))

* :func:`dequantize` writes Ŵ (d, k) in one pass: 0.52 bytes read and 2 written per weight (bf16).  For
  many tokens the GEMM that follows (cuBLAS) is compute-bound and the pass is small beside it.
* :func:`merged` writes Ŵ' = Ŵ + s·B A instead: the LoRA update folded into the dequantisation pass, so a
  training step's forward and input gradient are one GEMM each, as on a bf16 base (``ops.triton_lora``).
* :func:`gemv` computes h = x Ŵᵀ + s·(x Aᵀ) Bᵀ + b for a few tokens (decode) from the packed codes, split
  along k over enough programs to fill the GPU, in two launches (partial sums, then their sum with the
  LoRA term and the bias): the weight is read once at 4.13 bits instead of being written and read back at 16.

Every value is formed as in :func:`lorakit.ops.nf4.dequantize_nf4_reference` (float32 product, rounded
once to the output dtype), so the kernels' Ŵ equals bitsandbytes' dequantisation bit for bit.
"""

from __future__ import annotations

import functools

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
    def _nf4_tile(packed_ptr, absmax_ptr, nested_ptr, rows64, row_ok, blk, blk_ok, KB, KBLK):
        """The raw tile of rows × 64-weight blocks ``blk`` of a row-major weight whose rows are whole
        blocks: bytes (rows, blocks, 32) as int32, absmax codes and nested absmaxes (rows, blocks)."""
        ok = row_ok[:, None] & blk_ok[None, :]
        byte = tl.load(packed_ptr + rows64[:, None, None] * KB + (blk * 32)[None, :, None]
                       + tl.arange(0, 32)[None, None, :], mask=ok[:, :, None], other=0).to(tl.int32)
        g = rows64[:, None] * KBLK + blk[None, :]
        a = tl.load(absmax_ptr + g, mask=ok, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + g // 256, mask=ok, other=0.0)
        return byte, a, nested

    @triton.jit
    def _gemv_partial_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, a_ptr,
                             part_ptr, upart_ptr, N, D, K, KB, KBLK, R, stride_xn, ITERS, HAS_LORA: tl.constexpr,
                             DOT: tl.constexpr, ONE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, NB: tl.constexpr,
                             PRECISION: tl.constexpr):
        # Program (i, s, j): rows i·BD.., k-slice s (ITERS tiles of NB 64-weight blocks), tokens j·BN..
        #   part[s, tok, rows] = Σ_{cols in slice} x[tok, cols] Ŵ[rows, cols]            (float32)
        #   upart[s, tok, r]   = Σ_{cols in slice} x[tok, cols] A[r, cols]  for r = i, i + #programs(0), ..
        # k is a multiple of 64, so a row holds KBLK = k/64 whole blocks and KB = k/2 bytes: a tile is
        # (BD, NB, 32) contiguous bytes a row, one m̂ per (row, block), both nibbles of each byte used.  The
        # bytes and scales of the next two tiles are loaded before this one is multiplied: a waiting tile
        # costs a quarter of a register a byte, an unpacked one several, so prefetching, not a bigger tile,
        # is what puts more bytes in flight.
        pid_d, pid_s = tl.program_id(0), tl.program_id(1)
        tok0 = tl.program_id(2) * BN
        tok_end = tl.minimum(tok0 + BN, N)
        toks = tok0 + tl.arange(0, BN)
        xdt = x_ptr.dtype.element_ty
        rows = pid_d * BD + tl.arange(0, BD)
        row_ok = rows < D
        rows64 = rows.to(tl.int64)
        j = tl.arange(0, 32)
        first = pid_s * ITERS * NB
        limit = tl.minimum(KBLK, first + ITERS * NB)  # this slice's blocks end here
        blk = first + tl.arange(0, NB)
        byte, a, nested = _nf4_tile(packed_ptr, absmax_ptr, nested_ptr, rows64, row_ok, blk, blk < limit, KB, KBLK)
        byte1, a1, nested1 = _nf4_tile(packed_ptr, absmax_ptr, nested_ptr, rows64, row_ok, blk + NB,
                                       blk + NB < limit, KB, KBLK)
        offset = tl.load(offset_ptr)
        acc = tl.zeros((BN, BD), dtype=tl.float32)
        acc3 = tl.zeros((BD, NB, 32), dtype=tl.float32)
        for _ in range(0, ITERS):
            blk_ok = blk < limit
            ahead = blk + 2 * NB
            byte2, a2, nested2 = _nf4_tile(packed_ptr, absmax_ptr, nested_ptr, rows64, row_ok, ahead, ahead < limit,
                                           KB, KBLK)
            m = (tl.load(dyn_ptr + a) * nested + offset)[:, :, None]  # m̂ once per block
            # ŵ at even columns (high nibble) and odd columns (low nibble), rounded to x's dtype
            # code_ptr: the byte-indexed table c[b >> 4] (256 entries) then c[b & 15] (256 more): one
            # address a byte for both nibbles, the second load at a constant offset
            w_hi = (tl.load(code_ptr + byte) * m).to(xdt)
            w_lo = (tl.load(code_ptr + 256 + byte) * m).to(xdt)
            even = (blk * 64)[:, None] + 2 * j[None, :]  # (NB, 32): the column of each high nibble
            if DOT:  # tokens × tile on the tensor cores (BN ≥ 16 rows; the missing ones are masked)
                ev = tl.reshape(even, (NB * 32,))
                xm = (toks < N)[:, None] & (ev < limit * 64)[None, :]
                xt = x_ptr + toks[:, None].to(tl.int64) * stride_xn + ev[None, :]
                acc = tl.dot(tl.load(xt, mask=xm, other=0.0), tl.trans(tl.reshape(w_hi, (BD, NB * 32))), acc,
                             input_precision=PRECISION)
                acc = tl.dot(tl.load(xt + 1, mask=xm, other=0.0), tl.trans(tl.reshape(w_lo, (BD, NB * 32))), acc,
                             input_precision=PRECISION)
            elif ONE:  # a single token: elementwise products, summed once after the loop
                x_e = tl.load(x_ptr + even, mask=blk_ok[:, None], other=0.0).to(tl.float32)
                x_o = tl.load(x_ptr + even + 1, mask=blk_ok[:, None], other=0.0).to(tl.float32)
                # explicit fmas: the compile flag that keeps ŵ's two roundings apart forbids contracting
                acc3 = tl.fma(w_hi.to(tl.float32), x_e[None, :, :],
                              tl.fma(w_lo.to(tl.float32), x_o[None, :, :], acc3))
            else:  # one token at a time: elementwise products and a sum (a few tokens are not padded to 16)
                wf_hi = w_hi.to(tl.float32)
                wf_lo = w_lo.to(tl.float32)
                for n in range(tok0, tok_end):
                    xrow = x_ptr + n * stride_xn + even
                    x_e = tl.load(xrow, mask=blk_ok[:, None], other=0.0).to(tl.float32)
                    x_o = tl.load(xrow + 1, mask=blk_ok[:, None], other=0.0).to(tl.float32)
                    s = tl.sum(tl.sum(tl.fma(wf_hi, x_e[None, :, :], wf_lo * x_o[None, :, :]), axis=2), axis=1)
                    acc = tl.where((toks == n)[:, None], acc + s[None, :], acc)
            blk = blk + NB
            byte, a, nested = byte1, a1, nested1
            byte1, a1, nested1 = byte2, a2, nested2
        if ONE:
            acc += tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]
        dst = part_ptr + (pid_s * N + toks[:, None]).to(tl.int64) * D + rows[None, :]
        tl.store(dst, acc, mask=(toks < N)[:, None] & row_ok[None, :])
        if HAS_LORA:  # x Aᵀ over this slice, A's rows dealt out among the programs along d
            for r in range(pid_d, R, tl.num_programs(0)):
                u = tl.zeros((BN,), dtype=tl.float32)
                for it in range(0, ITERS):
                    ablk = first + it * NB + tl.arange(0, NB)
                    aok = (ablk < limit)[:, None]
                    cols = (ablk * 64)[:, None] + 2 * j[None, :]
                    a_e = tl.load(a_ptr + r * K + cols, mask=aok, other=0.0).to(xdt).to(tl.float32)
                    a_o = tl.load(a_ptr + r * K + cols + 1, mask=aok, other=0.0).to(xdt).to(tl.float32)
                    for n in range(tok0, tok_end):
                        xrow = x_ptr + n * stride_xn + cols
                        x_e = tl.load(xrow, mask=aok, other=0.0).to(tl.float32)
                        x_o = tl.load(xrow + 1, mask=aok, other=0.0).to(tl.float32)
                        un = tl.sum(tl.sum(tl.fma(x_e, a_e, x_o * a_o), axis=1), axis=0)
                        u = tl.where(toks == n, u + un, u)
                tl.store(upart_ptr + (pid_s * N + toks) * R + r, u, mask=toks < N)

    @triton.jit
    def _gemv_finish_kernel(part_ptr, upart_ptr, b_ptr, bias_ptr, out_ptr, N, D, R, S, scale,
                            HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BF: tl.constexpr):
        # out[tok, rows] = Σ_s part[s, tok, rows] (+ s·(Σ_s upart[s, tok]) B[rows]ᵀ) (+ bias[rows])
        n = tl.program_id(1)
        rows = tl.program_id(0) * BF + tl.arange(0, BF)
        ok = rows < D
        acc = tl.zeros((BF,), dtype=tl.float32)
        for s in range(0, S):
            acc += tl.load(part_ptr + (s * N + n).to(tl.int64) * D + rows, mask=ok, other=0.0)
        if HAS_LORA:
            rr = tl.arange(0, R_PAD)
            r_ok = rr < R
            u = tl.zeros((R_PAD,), dtype=tl.float32)
            for s in range(0, S):
                u += tl.load(upart_ptr + (s * N + n) * R + rr, mask=r_ok, other=0.0)
            b = tl.load(b_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], mask=ok[:, None] & r_ok[None, :],
                        other=0.0)
            acc += scale * tl.sum(b.to(tl.float32) * u[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n.to(tl.int64) * D + rows, acc.to(out_ptr.dtype.element_ty), mask=ok)


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


@functools.lru_cache(maxsize=None)
def _nibble_table(device: torch.device) -> Tensor:
    """(512,) float32: c[b >> 4] for the bytes b = 0..255, then c[b & 15]: both codes of a byte by its value."""
    code = nf4_map(device)
    b = torch.arange(256, device=device)
    return torch.cat((code[b >> 4], code[b & 15]))


def _gemv_state(t: NF4Tensors) -> tuple[Tensor, ...]:
    return t.packed, t.absmax, t.nested_absmax, t.offset, _nibble_table(t.packed.device), dynamic_map(t.packed.device)


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
         scale: float = 1.0, *, block_d: int = 16, block_k: int = 256, split_k: int | None = None,
         programs: int | None = None, dot_tokens: int = 4, num_warps: int = 4, block_f: int = 256) -> Tensor:
    """h = x Ŵᵀ + s · (x Aᵀ) Bᵀ + b for x: (N, k) with few rows (decode), from the packed weight.

    A: (r, k), B: (d, r) (both or neither); bias: (d,).  Returns (N, d) in x's dtype.  Ŵ's values are
    rounded to x's dtype (as :func:`dequantize` writes them), A is rounded to x's dtype, products are
    summed in float32 and u = x Aᵀ stays float32.

    Two launches, split-K.  The first reads the weight once, as 4-bit codes: program (i, s) takes rows
    i·block_d.. and the s-th of ``split_k`` slices of k, walked in tiles of block_k columns (block_k/2
    contiguous bytes a row, both nibbles of a byte used, one m̂ per 64 weights, the next two tiles loaded
    while one is multiplied), and writes float32 partial sums part[s, N, d]; with LoRA it also sums u over
    its slice (A's r rows dealt out over the programs along d).  Fewer than ``dot_tokens`` tokens are
    multiplied elementwise (one token: products accumulated elementwise and summed once; a few: a sum per
    token and tile); more go through ``tl.dot`` in tiles of 16 tokens.  The second launch sums the
    partials, adds s·u Bᵀ and the bias and casts (block_f outputs a program).

    split_k defaults to ⌈programs / ⌈d / block_d⌉⌉ (``programs``: 8 per SM unless given), at most one
    slice a tile.  k must be a multiple of 64 (every real layer); other widths take :func:`dequantize` and
    a GEMM.
    block_d, block_k: powers of two, block_d ≥ 16 and block_k ≥ 64 (block_k ≥ 128 where tl.dot is used).
    """
    x = x if x.stride(-1) == 1 else x.contiguous()
    N, K = x.shape
    D = t.shape[0]
    if K % BLOCK:
        return _gemv_unaligned(x, t, bias, A, B, scale)
    out = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    nblk = K // BLOCK
    nb = min(max(block_k // BLOCK, 1), next_pow2(nblk))
    tiles_d, tiles_k = cdiv(D, block_d), cdiv(nblk, nb)
    if split_k is None:  # enough programs to keep every SM's memory pipe busy, no more (each adds partials)
        split_k = cdiv(programs if programs is not None else _programs(x.device), tiles_d)
    iters = cdiv(tiles_k, max(1, min(split_k, tiles_k)))
    splits = cdiv(tiles_k, iters)
    R = B.shape[1] if B is not None else 1
    part = torch.empty((splits, N, D), dtype=torch.float32, device=x.device)
    upart = torch.empty((splits, N, R), dtype=torch.float32, device=x.device) if A is not None else part
    BN = 16  # token tile: tl.dot's smallest
    _gemv_partial_kernel[(tiles_d, splits, cdiv(N, BN))](
        x, *_gemv_state(t), A.contiguous() if A is not None else x, part, upart, N, D, K, K // 2, nblk, R, x.stride(0),
        iters,
        HAS_LORA=A is not None, DOT=N >= dot_tokens, ONE=N == 1 and dot_tokens > 1, BN=BN, BD=block_d, NB=nb,
        PRECISION=_precision(x.dtype),
        num_warps=num_warps, **_EXACT)
    _gemv_finish_kernel[(cdiv(D, block_f), N)](
        part, upart, B.contiguous() if B is not None else part, bias if bias is not None else part, out, N, D, R,
        splits, float(scale), HAS_LORA=A is not None, HAS_BIAS=bias is not None, R_PAD=max(2, next_pow2(R)),
        BF=block_f)
    return out


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """8 programs per SM.  The default tile (16 rows × 256 columns, 4 warps: 16 bytes a thread, 110
    registers a thread on sm_90) lets 4 programs reside on an SM, each with two 2 KiB tiles in flight while
    it multiplies a third (16 KiB an SM); 8 an SM keeps the programs short, so the last wave's tail is small."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return 8 * sms


def _gemv_unaligned(x: Tensor, t: NF4Tensors, bias: Tensor | None, A: Tensor | None, B: Tensor | None,
                    scale: float) -> Tensor:
    """:func:`gemv`'s arithmetic for k not a multiple of 64 (blocks then straddle rows): Ŵ in x's dtype
    from :func:`dequantize`, then cuBLAS."""
    acc = torch.nn.functional.linear(x, dequantize(t, x.dtype)).float()
    if A is not None:
        acc += scale * (x.float() @ A.to(x.dtype).float().t()) @ B.float().t()
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype)


__all__ = ["available", "dequantize", "gemv", "merged", "BLOCK", "NESTED_BLOCK"]
