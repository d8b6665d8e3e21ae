"""The GPU path of :func:`lorakit.ops.lora_linear`: cuBLAS for the big products, Triton for the skinny ones.

    h = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ          x: (N, k)  W: (d, k)  A: (r, k)  B: (d, r)

Where the time goes (N = 8192, d = k = 4096, r = 16, bf16; docs/gpu-notes.md has the counts): the two
frozen products x Wᵀ and g W are 275 GFLOP each (≈ 0.34 ms at the measured ≈ 700-740 TFLOP/s);
every other step is a memory-bound pass over an (N, k) or (N, d) tensor, 64 MiB ≈ 16 µs at the
measured 4.2 TB/s (these kernels reach ≈ 21 µs).  So the design minimises the number of full-size passes:

* no dropout: the low-rank term is folded into the weight, W' = W + s·B A (one (d, k) pass, which is
  cheaper than an (N, d) one whenever N > k), so the forward is ONE GEMM, x W'ᵀ, and the input
  gradient is ONE GEMM, g W'.  Backward rebuilds W' rather than keeping forward's: keeping it saved one
  (d, k) pass (1.14× → 1.11× the frozen limit for one 4096² layer at N = 8192) but held d·k more memory
  per layer until backward, +1.9 GiB on the 1.14B Llama for no measurable throughput
  (docs/gpu-notes.md).  In bf16 this rounds W + sBA once, which loses no more of a small update than
  PEFT's bf16 path, whose sum x Wᵀ + s·u Bᵀ is rounded to bf16 just the same.
* dropout: u = c·(x⊙m) Aᵀ is one Triton pass over x (:func:`xa`), with the keep-mask m drawn from
  Philox(seed, position) inside the kernel; h = u (s·B)ᵀ is written once and x Wᵀ accumulates into
  it (``addmm_``, so no second full-size temporary).  Backward regenerates the same mask from the seed:
  one Triton pass over x (:func:`tall_product`) gives both ∂L/∂A = vᵀ(x⊙m) (v = s·c·g B) and the
  branch's input gradient m⊙(v A), into which g W then accumulates.
* ∂L/∂B = s·gᵀu is the same kind of product (long axis N reduced, float32 atomics across row
  slices), so it too is one Triton pass over g, straight into a float32 (d, r) result.
* few launches: scales ride on the r-sized factors and the kernels cast the (float32) adapters
  themselves.  Each launch still costs host time, which is why ``ops/backends.py`` sends small token
  counts to the torch backend instead.
* under ``torch.compile`` the same functions run inside the ``lorakit::lora_linear_*`` ops, which
  Inductor decomposes: the kernels are launched through ``wrap_triton`` (:func:`_launch`), so they are
  nodes of its graph (scheduled, CUDA-graphed) rather than calls hidden in an opaque op.
* Philox with 7 rounds (see ``_PHILOX_ROUNDS``); p is rounded to a multiple of 2⁻¹⁶ (0.05 → 3277/65536).

Masks: each Philox call gives 4×32 random bits, used as eight 16-bit numbers for eight consecutive
columns of one row; an element is dropped when its number is < round(p·2¹⁶).  The mask is a function
of (seed, row, column) alone — not of tile sizes — so the forward and backward kernels, whatever
their blocks, see the same mask (:func:`keep_mask` materialises it, for tests and references).  It is
not the CPU path's mask (``ops.dropout``): a seed names a mask per device type.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from .grid import cdiv, next_pow2

try:  # Triton is optional: without it CUDA uses the torch path of lora_linear.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

_MASK_BITS = 16  # resolution of the dropout probability: p is rounded to a multiple of 2⁻¹⁶
# Philox-4x32 with 7 rounds, the fewest that pass BigCrush (Salmon et al., SC'11), not Triton's default 10:
# mask generation is the compute-bound part of the dropout kernels.
_PHILOX_ROUNDS = 7  # (made a tl.constexpr below: a jitted function may read only constexpr globals)


def available() -> bool:
    """Whether the Triton kernels can run here."""
    return triton is not None


def drop_threshold(p: float) -> int:
    """The integer t with P(drop) = t / 2¹⁶ that the kernels use for dropout probability p."""
    return int(round(p * (1 << _MASK_BITS)))


if triton is not None:
    _PHILOX_ROUNDS_C = tl.constexpr(_PHILOX_ROUNDS)

    @triton.jit
    def _keep(seed, rows, k0, threshold, BM: tl.constexpr, BK: tl.constexpr):
        """(BM, BK) keep-mask of the elements (rows, k0 + arange(BK)); k0 must be a multiple of 8."""
        # One Philox call per (row, group of 8 columns): counter = (group, row, 0, 0).
        groups = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.uint32)
        c0 = tl.broadcast_to(groups[None, :], (BM, BK // 8))
        c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BM, BK // 8))
        zero = c0 * 0
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, _PHILOX_ROUNDS_C)
        # Column 8g + j takes 16-bit half (j % 2) of word j // 2: lo/hi of r0, r1, r2, r3 in order.
        lo = 0xFFFF
        w01 = tl.join(tl.join(r0 & lo, r0 >> 16), tl.join(r1 & lo, r1 >> 16))  # (BM, BK/8, 2, 2)
        w23 = tl.join(tl.join(r2 & lo, r2 >> 16), tl.join(r3 & lo, r3 >> 16))
        bits = tl.reshape(tl.join(w01, w23), (BM, BK))  # (BM, BK/8, 2, 2, 2) → (BM, BK), row-major
        return bits >= threshold

    @triton.jit
    def _mask_kernel(out_ptr, N, K, seed, threshold, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        k0 = tl.program_id(1) * BK
        cols = k0 + tl.arange(0, BK)
        keep = _keep(seed, rows, k0, threshold, BM, BK)
        ok = (rows < N)[:, None] & (cols < K)[None, :]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.int8), mask=ok)

    @triton.jit
    def _xa_kernel(
        x_ptr, a_ptr, u_ptr, N, K, R, stride_xn, seed, threshold, scale,
        HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # u[rows] = scale · (x[rows] ⊙ m) Aᵀ     x: (N, K)  A: (R, K), any float dtype  u: (N, R) in x's dtype
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R_PAD)
        row_ok = rows < N
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xn
        acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            col_ok = cols < K
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BM, BK)
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, rows, k0, threshold, BM, BK), x, tl.zeros_like(x))
            a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a.to(x.dtype)), acc, input_precision=PRECISION)  # (BM, R_PAD)
        acc = acc * scale
        out = u_ptr + rows[:, None].to(tl.int64) * R + rr[None, :]
        tl.store(out, acc.to(u_ptr.dtype.element_ty), mask=row_ok[:, None] & (rr < R)[None, :])

    @triton.jit
    def _tall_kernel(
        m_ptr, p_ptr, a_ptr, gx_ptr, out_ptr, N, C, R, stride_mn, stride_or, stride_oc, seed, threshold, scale,
        HAS_DROPOUT: tl.constexpr, WRITE_GX: tl.constexpr, R_PAD: tl.constexpr, BM: tl.constexpr,
        BC: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One column block of M and a slice of its rows:
        #   out[:, cols] += scale · Pᵀ (M ⊙ m)[:, cols]          (R, BC), float32, atomics across row slices
        #   gx[:, cols]   = m ⊙ (P A)[:, cols]                    (only if WRITE_GX)
        # M: (N, C), P: (N, R), A: (R, C).  ∂A = vᵀ drop(x) and ∂B = s·gᵀu are both this product.
        c0 = tl.program_id(0) * BC
        n_split = tl.num_programs(1)
        per_split = tl.cdiv(tl.cdiv(N, n_split), BM) * BM
        row_lo = tl.program_id(1) * per_split
        row_hi = tl.minimum(row_lo + per_split, N)
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < C
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        if WRITE_GX:
            a = tl.load(a_ptr + rr[:, None] * C + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            a = a.to(m_ptr.dtype.element_ty)
        acc = tl.zeros((R_PAD, BC), dtype=tl.float32)
        for m0 in range(row_lo, row_hi, BM):
            rows = m0 + tl.arange(0, BM)
            row_ok = rows < row_hi
            ok = row_ok[:, None] & col_ok[None, :]
            m = tl.load(m_ptr + rows[:, None].to(tl.int64) * stride_mn + cols[None, :], mask=ok, other=0.0)
            p_offs = rows[:, None].to(tl.int64) * R + rr[None, :]  # (BM, R_PAD)
            p_ok = row_ok[:, None] & r_ok[None, :]
            if HAS_DROPOUT:
                keep = _keep(seed, rows, c0, threshold, BM, BC)
                m = tl.where(keep, m, tl.zeros_like(m))
            # Pᵀ is loaded as such (a strided 2 KiB read that L1 serves) instead of tl.trans: no layout shuffle.
            pt = tl.load(p_ptr + tl.trans(p_offs), mask=tl.trans(p_ok), other=0.0).to(m.dtype)  # (R_PAD, BM)
            acc = tl.dot(pt, m, acc, input_precision=PRECISION)
            if WRITE_GX:
                pm = tl.load(p_ptr + p_offs, mask=p_ok, other=0.0).to(m.dtype)  # (BM, R_PAD)
                gx = tl.dot(pm, a, input_precision=PRECISION)  # (BM, BC)
                if HAS_DROPOUT:
                    gx = tl.where(keep, gx, tl.zeros_like(gx))
                tl.store(gx_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], gx.to(gx_ptr.dtype.element_ty),
                         mask=ok)
        out = out_ptr + rr[:, None] * stride_or + cols[None, :] * stride_oc
        tl.atomic_add(out, acc * scale, mask=r_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _merge_kernel(w_ptr, b_ptr, a_ptr, out_ptr, D, K, R, stride_wd, stride_wk, scale,
                      R_PAD: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        # W'[rows, cols] = W[rows, cols] + s · B[rows] A[:, cols]     W, W': (D, K)  B: (D, R)  A: (R, K)
        rows = tl.program_id(0) * BD + tl.arange(0, BD)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, R_PAD)
        ok = (rows < D)[:, None] & (cols < K)[None, :]
        b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=(rows < D)[:, None] & (rr < R)[None, :], other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None] & (cols < K)[None, :], other=0.0)
        b, a = b.to(tl.float32), a.to(tl.float32)  # the adapters' own precision (fp32 by default)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wd + cols[None, :] * stride_wk, mask=ok, other=0.0)
        merged = w.to(tl.float32) + scale * tl.dot(b, a, input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], merged.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(kernel, like: Tensor):
    """``kernel`` ready to launch: itself on real tensors, ``wrap_triton(kernel)`` while torch.compile traces
    (fake or functional tensors), so the launch becomes a node of Inductor's graph that it schedules itself."""
    if isinstance(like, (FakeTensor, FunctionalTensor)):
        return torch.library.wrap_triton(kernel)
    return kernel


def _r_pad(r: int) -> int:
    return max(16, next_pow2(r))  # tl.dot needs every dimension ≥ 16


def _precision(dtype: torch.dtype) -> str:
    # A float32 dot would default to tf32 (≈ 3e-4 relative error); the fp32 path promises ≈ 1e-6.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index or 0).multi_processor_count
    return 4  # the interpreter: a few programs are enough to exercise the split


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.type, device.index)


def merged_weight(weight: Tensor, B: Tensor, A: Tensor, scale: float, dtype: torch.dtype | None = None, *,
                  block_d: int = 32, block_k: int = 256, num_warps: int = 4) -> Tensor:
    """W' = W + s·B A in one pass over W (read once, written once), rounded once to ``dtype`` (W's by default).

    W: (d, k) with any strides, B: (d, r), A: (r, k) in any float dtype; the product is taken in float32
    (tf32 units for a half-precision result, exact float32 for a float32 one).
    """
    D, K = weight.shape
    R = A.shape[0]
    dtype = dtype or weight.dtype
    out = torch.empty((D, K), dtype=dtype, device=weight.device)
    _launch(_merge_kernel, out)[(cdiv(D, block_d), cdiv(K, block_k))](
        weight, B.contiguous(), A.contiguous(), out, D, K, R, weight.stride(0), weight.stride(1), float(scale),
        R_PAD=_r_pad(R), BD=block_d, BK=block_k, PRECISION=_precision(dtype), num_warps=num_warps,
    )
    return out


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def keep_mask(n: int, k: int, p: float, seed: int, device: torch.device | str) -> Tensor:
    """The (n, k) boolean keep-mask the kernels use for (p, seed): True where an input is kept."""
    out = torch.empty((n, k), dtype=torch.int8, device=device)
    if n and k:
        BM, BK = 16, 64
        _launch(_mask_kernel, out)[(cdiv(n, BM), cdiv(k, BK))](out, n, k, int(seed), drop_threshold(p), BM=BM, BK=BK)
    return out.bool()


def xa(x: Tensor, A: Tensor, p: float = 0.0, seed: int = 0, scale: float = 1.0, *, block_m: int | None = None,
       block_k: int = 128, num_warps: int = 4, num_stages: int = 4) -> Tensor:
    """u = scale · (x ⊙ m) Aᵀ in one pass over x:  x: (N, k), A: (r, k) any float dtype → u: (N, r) in x's dtype.

    m = :func:`keep_mask`(N, k, p, seed) (all ones for p = 0); for drop(x) Aᵀ pass scale = 1/(1-p).
    """
    x = _rows_contiguous(x)
    N, K = x.shape
    R = A.shape[0]
    u = torch.empty((N, R), dtype=x.dtype, device=x.device)
    if N == 0:
        return u
    if block_m is None:  # enough programs to give every SM a couple of row blocks
        block_m = 64 if cdiv(N, 64) >= 2 * _sm_count(x.device) else 32
    block_k = max(16, min(block_k, next_pow2(K)))
    _launch(_xa_kernel, u)[(cdiv(N, block_m),)](
        x, A.contiguous(), u, N, K, R, x.stride(0), int(seed), drop_threshold(p), float(scale),
        HAS_DROPOUT=p > 0, R_PAD=_r_pad(R), BM=block_m, BK=block_k, PRECISION=_precision(x.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return u


def tall_product(M: Tensor, P: Tensor, scale: float = 1.0, p: float = 0.0, seed: int = 0, A: Tensor | None = None,
                 transpose_out: bool = False, *, block_m: int = 64, block_c: int = 64, num_warps: int = 4,
                 num_stages: int = 3) -> tuple[Tensor, Tensor | None]:
    """scale · Pᵀ (M ⊙ m) in one pass over M, and optionally m ⊙ (P A) in the same pass.

    M: (N, C), P: (N, r) (N ≫ C ≫ r), m = :func:`keep_mask`(N, C, p, seed), A: (r, C); small operands are
    cast to M's dtype.  Returns (the float32 product, (r, C) — or (C, r) if ``transpose_out``; m ⊙ (P A),
    (N, C) in M's dtype, if A is given).  ∂A = vᵀ drop(x) with the branch's input gradient, and
    ∂B = s·gᵀu, are both this product.  (v and ∂B from one pass over g, v by float32 atomics, measured
    64 µs against 22 + 23 µs for the two separate passes at N = 8192, d = 4096: not done.)
    """
    M = _rows_contiguous(M)
    N, C = M.shape
    R = P.shape[1]
    out = torch.zeros((C, R) if transpose_out else (R, C), dtype=torch.float32, device=M.device)
    gx = torch.empty((N, C), dtype=M.dtype, device=M.device) if A is not None else None
    if N == 0:
        return out, gx
    if A is not None and block_c == 64:  # the input-gradient pass does best with narrower column blocks (sweep)
        block_c, num_stages = 32, 4
    n_cb = cdiv(C, block_c)
    n_split = max(1, min(cdiv(N, block_m), cdiv(2 * _sm_count(M.device), n_cb)))
    stride_or, stride_oc = (1, R) if transpose_out else (C, 1)
    _launch(_tall_kernel, out)[(n_cb, n_split)](
        M, P.contiguous(), A.contiguous() if A is not None else P, gx if gx is not None else out, out,
        N, C, R, M.stride(0), stride_or, stride_oc, int(seed), drop_threshold(p), float(scale),
        HAS_DROPOUT=p > 0, WRITE_GX=A is not None, R_PAD=_r_pad(R), BM=block_m, BC=block_c,
        PRECISION=_precision(M.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, gx


def _scaled(t: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """scale · t in ``dtype`` as one kernel (t is a small adapter factor)."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return torch.mul(t, scale, out=out)


# --- the backend interface (the same functions as ops/torch_lora.py; see ops/backends.py) ----------------------
# Forward without dropout multiplies by the merged weight, so it needs u = x Aᵀ only for backward.
MERGED_WEIGHT = True


def input_product(x: Tensor, A: Tensor) -> Tensor:
    """u = x Aᵀ (N, r) in x's dtype, one pass over x."""
    return xa(x, A)


def lora_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                 p: float, seed: int, need_u: bool, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(h, u) for x: (N, k): h = x Wᵀ + b + s·u Bᵀ with u = drop(x) Aᵀ (N, r, dropout's 1/(1-p) included);
    u comes back empty, (0, r), unless ``need_u``.  A caller that already holds u = x Aᵀ passes it (p = 0)."""
    r = A.shape[0]
    bias_ = None if bias is None else bias.to(x.dtype)
    if p == 0.0 and weight is not None:  # h = x W'ᵀ + b, W' = W + s·B A: one GEMM
        if need_u and u is None:
            u = xa(x, A)
        h = F.linear(x, merged_weight(weight, B, A, scale, x.dtype), bias_)
        return h, (u if need_u else x.new_empty((0, r)))
    if u is None:
        u = xa(x, A, p, seed, 1.0 / (1.0 - p))  # (N, r)
    sB = _scaled(B, scale, x.dtype)  # (d, r): the scale goes on the small factor
    h = torch.addmm(bias_, u, sB.t()) if bias_ is not None else torch.mm(u, sB.t())  # (N, d)
    if weight is not None:
        h.addmm_(x, weight.to(x.dtype).t())  # the big GEMM accumulates into the low-rank term
    return h, (u if need_u else x.new_empty((0, r)))


def grad_B(g: Tensor, u: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """∂L/∂B = s·gᵀu (d, r) in ``dtype``: one pass over g, accumulated in float32."""
    return tall_product(g, u, scale, transpose_out=True)[0].to(dtype)


def branch_grad(g: Tensor, B: Tensor, scale: float) -> Tensor:
    """v = s·g B (N, r) in g's dtype."""
    return torch.mm(g, _scaled(B, scale, g.dtype))


def grad_A(x: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """∂L/∂A = vᵀx (r, k) in ``dtype``: one pass over x, accumulated in float32."""
    return tall_product(x, v)[0].to(dtype)


def add_grad_x(acc: Tensor | None, g: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, v: Tensor | None,
               scale: float) -> Tensor:
    """acc + g W + v A (acc None: a fresh tensor): with a weight one GEMM, g (W + s·B A); v is then unused."""
    dt = g.dtype
    if weight is not None:
        Wm = merged_weight(weight, B, A, scale, dt)
        return torch.mm(g, Wm) if acc is None else acc.addmm_(g, Wm)
    return torch.mm(v, A.to(dt)) if acc is None else acc.addmm_(v, A.to(dt))


def lora_backward(g: Tensor, x: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, u: Tensor, scale: float,
                  p: float, seed: int, need_x: bool, need_A: bool, need_B: bool,
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(∂L/∂x, ∂L/∂A, ∂L/∂B) for g = ∂L/∂h: (N, d); None where not needed. See ``lora_linear``'s docstring."""
    grad_x = grad_a = grad_b = None
    if need_B:
        grad_b = grad_B(g, u, scale, B.dtype)
    if not (need_x or need_A):
        return grad_x, grad_a, grad_b
    if p == 0.0:
        v = branch_grad(g, B, scale) if need_A or weight is None else None  # (N, r) = s·g B
        if need_A:
            grad_a = grad_A(x, v, A.dtype)
        if need_x:
            grad_x = add_grad_x(None, g, weight, A, B, v, scale)
        return grad_x, grad_a, grad_b
    v = branch_grad(g, B, scale / (1.0 - p))  # (N, r) = s·c·g B
    ga, low = tall_product(x, v, 1.0, p, seed, A if need_x else None)  # vᵀ(x ⊙ m) and m ⊙ (v A): one pass over x
    grad_a = ga.to(A.dtype) if need_A else None
    if need_x:
        grad_x = low if weight is None else low.addmm_(g, weight.to(x.dtype))  # + g W, accumulated in place
    return grad_x, grad_a, grad_b
