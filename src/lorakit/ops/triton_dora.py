"""The CUDA path of :func:`lorakit.ops.dora_linear` without dropout: one GEMM forward, one GEMM backward, as LoRA.

    W_f = f ⊙ (W + s·B A),   f = m / n,   n = ‖W + s·B A‖ per row        h = x W_fᵀ + b

* forward: one Triton pass over W (:func:`scaled_weight`) computes each row block's norm (the rows of
  W + sBA formed tile by tile in float32, so nothing of size (d, k) is kept and nothing cancels) and then
  writes W_f; h is then ONE GEMM — the same work as lorakit's LoRA forward, which folds W + sBA the same way.
* backward: ∂x = g W_f (W_f rebuilt from the saved n: one pass, as LoRA rebuilds its W + sBA);
  ∂B = s·f ⊙ (gᵀu) and ∂A = s·((g ⊙ f) B)ᵀ x put f on the small factors (no (N, d) pass);
  ∂m = Σ_rows g ⊙ (x W_fᵀ) / m: x W_fᵀ = f ⊙ y is recomputed (one GEMM, its (N, d) result freed at once)
  and reduced against g in one Triton pass (:func:`column_dot`).  The layer's output h is not kept
  for this, though it holds the same values: kernels after the layer may overwrite it in place unseen
  by autograd (ops/dora.py's docstring), so only recomputation is safe.  (∂m divides by m: m ≠ 0, as at
  init where m = n > 0; a zero m gives a non-finite ∂m, never a silently wrong one.)

So DoRA keeps exactly what LoRA keeps (x, u) and adds to LoRA's step one (d, k) norm loop, one GEMM and
one read of g in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .grid import cdiv, next_pow2
from .triton_lora import _precision, _r_pad, _sm_count, tall_product, xa

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def use_triton(x: Tensor) -> bool:
    """Whether the CUDA route runs for ``x``: a CUDA tensor and Triton installed."""
    return x.is_cuda and triton is not None


if triton is not None:

    @triton.jit
    def _merged_tile(w_rows, a_ptr, b, rows, rr, k0, D, K, R, stride_wk, scale, BK: tl.constexpr,
                     PRECISION: tl.constexpr):
        # (W + s·B A)[rows, k0:k0+BK] in float32, and its in-bounds mask
        cols = k0 + tl.arange(0, BK)
        ok = (rows < D)[:, None] & (cols < K)[None, :]
        a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None] & (cols < K)[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :] * stride_wk, mask=ok, other=0.0).to(tl.float32)
        return w + scale * tl.dot(b, a, input_precision=PRECISION), cols, ok

    @triton.jit
    def _scaled_weight_kernel(w_ptr, b_ptr, a_ptr, m_ptr, n_ptr, out_ptr, D, K, R, stride_wd, stride_wk, scale,
                              HAVE_NORM: tl.constexpr, WRITE: tl.constexpr, R_PAD: tl.constexpr,
                              BD: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        # Row block `rows` of: n = ‖W + s·B A‖ (unless HAVE_NORM: read), then W_f = (m / n) ⊙ (W + s·B A) (if WRITE).
        rows = tl.program_id(0) * BD + tl.arange(0, BD)
        rr = tl.arange(0, R_PAD)
        row_ok = rows < D
        b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)
        b = b.to(tl.float32)
        w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wd
        if HAVE_NORM:
            norm = tl.load(n_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        else:
            acc = tl.zeros((BD,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                t, cols, ok = _merged_tile(w_rows, a_ptr, b, rows, rr, k0, D, K, R, stride_wk, scale, BK, PRECISION)
                acc += tl.sum(t * t, axis=1)
            norm = tl.sqrt(acc)
            tl.store(n_ptr + rows, norm, mask=row_ok)
        if WRITE:
            f = tl.load(m_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) / norm
            for k0 in range(0, K, BK):
                t, cols, ok = _merged_tile(w_rows, a_ptr, b, rows, rr, k0, D, K, R, stride_wk, scale, BK, PRECISION)
                tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                         (t * f[:, None]).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _column_dot_kernel(g_ptr, h_ptr, bias_ptr, div_ptr, out_ptr, N, C, stride_g, stride_h,
                           HAS_BIAS: tl.constexpr, HAS_DIV: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        # out[cols] += Σ_{rows in this slice} g[rows, cols] · (h[rows, cols] − bias[cols]) / div[cols], float32
        # atomics (each slice's partial sum is divided before it is added: the sum of the quotients is the quotient).
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        col_ok = cols < C
        n_split = tl.num_programs(1)
        per_split = tl.cdiv(tl.cdiv(N, n_split), BM) * BM
        row_lo = tl.program_id(1) * per_split
        row_hi = tl.minimum(row_lo + per_split, N)
        acc = tl.zeros((BM, BC), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        for m0 in range(row_lo, row_hi, BM):
            rows = m0 + tl.arange(0, BM)
            ok = (rows < row_hi)[:, None] & col_ok[None, :]
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + cols[None, :], mask=ok, other=0.0)
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :], mask=ok, other=0.0)
            h = h.to(tl.float32)
            if HAS_BIAS:
                h = tl.where(ok, h - bias[None, :], 0.0)
            acc += g.to(tl.float32) * h
        total = tl.sum(acc, axis=0)
        if HAS_DIV:
            total = total / tl.load(div_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
        tl.atomic_add(out_ptr + cols, total, mask=col_ok)


def scaled_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float, magnitude: Tensor | None,
                  norm: Tensor | None = None, dtype: torch.dtype | None = None, *, block_d: int = 16,
                  block_k: int = 128, num_warps: int = 4) -> tuple[Tensor, Tensor | None]:
    """(n, W_f): n = ‖W + s·B A‖ per row (float32; read from ``norm`` if given, else computed), and
    W_f = (m / n) ⊙ (W + s·B A) in ``dtype`` (W's by default) if ``magnitude`` is given, else None.

    One pass over W for each of the two (a row block's norm, then its scaled rows while W is in cache).
    W: (d, k) any strides; A: (r, k), B: (d, r), m: (d,) any float dtypes; products in float32.
    """
    D, K = weight.shape
    R = A.shape[0]
    dtype = dtype or weight.dtype
    have_norm = norm is not None
    n = norm.float().contiguous() if have_norm else torch.empty(D, dtype=torch.float32, device=weight.device)
    out = torch.empty((D, K), dtype=dtype, device=weight.device) if magnitude is not None else None
    if D == 0 or K == 0:
        return n, out
    block_k = max(16, min(block_k, next_pow2(K)))
    _scaled_weight_kernel[(cdiv(D, block_d),)](
        weight, B.contiguous(), A.contiguous(), magnitude.contiguous() if magnitude is not None else n, n,
        out if out is not None else n, D, K, R, weight.stride(0), weight.stride(1), float(scale),
        HAVE_NORM=have_norm, WRITE=magnitude is not None, R_PAD=_r_pad(R), BD=block_d, BK=block_k,
        PRECISION=_precision(dtype), num_warps=num_warps,
    )
    return n, out


def column_dot(g: Tensor, h: Tensor, bias: Tensor | None = None, divisor: Tensor | None = None, *,
               block_m: int = 32, block_c: int = 128, num_warps: int = 4) -> Tensor:
    """Σ over rows of g ⊙ (h − b), divided by ``divisor`` (C,) if given: (C,) float32, in one pass over g and h
    (each (N, C), rows contiguous)."""
    N, C = g.shape
    out = torch.zeros(C, dtype=torch.float32, device=g.device)
    if N == 0 or C == 0:
        return out
    g = g if g.stride(-1) == 1 else g.contiguous()
    h = h if h.stride(-1) == 1 else h.contiguous()
    block_c = max(16, min(block_c, next_pow2(C)))
    n_cb = cdiv(C, block_c)
    n_split = max(1, min(cdiv(N, block_m), cdiv(4 * _sm_count(g.device), n_cb)))
    _column_dot_kernel[(n_cb, n_split)](
        g, h, bias if bias is not None else out, divisor if divisor is not None else out, out, N, C, g.stride(0),
        h.stride(0), HAS_BIAS=bias is not None, HAS_DIV=divisor is not None, BM=block_m, BC=block_c,
        num_warps=num_warps,
    )
    return out


def weight_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """n = ‖W + s·B A‖ per row (float32) in one pass over W."""
    return scaled_weight(weight, A, B, scale, None)[0]


class _DoraLinearCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, m, n, scale, grad_enabled):  # type: ignore[override]
        n, Wf = scaled_weight(weight, A, B, scale, m.detach(), n, x.dtype)
        h = F.linear(x, Wf, None if bias is None else bias.to(x.dtype))
        del Wf
        need_u = grad_enabled and ctx.needs_input_grad[4]  # u = x Aᵀ serves ∂B only
        u = xa(x, A) if need_u else x.new_empty((0, A.shape[0]))
        ctx.save_for_backward(x, weight, bias, A, B, m, n, u)
        ctx.scale = scale
        return h

    @staticmethod
    def backward(ctx, grad_h):  # type: ignore[override]
        x, weight, bias, A, B, m, n, u = ctx.saved_tensors
        s = ctx.scale
        need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        g = grad_h.contiguous()
        # Few launches on purpose (each eager op costs the host more than these small ones cost the GPU):
        # fs = s·f (d,) carries both scales onto the (d, r) factors.
        fs = torch.div(m.detach(), n).mul_(s)  # (d,) float32
        grad_x = grad_w = grad_b = grad_A = grad_B = grad_m = None
        Wf = scaled_weight(weight, A, B, s, m.detach(), n, x.dtype)[1] if need_m or need_x else None
        if need_m:  # Σ_rows g ⊙ (x W_fᵀ) / m = Σ_rows g ⊙ y / n
            grad_m = column_dot(g, torch.mm(x, Wf.t()), None, m.detach()).to(m.dtype)
        if need_B:  # s·f ⊙ (gᵀu)
            grad_B = tall_product(g, u, 1.0, transpose_out=True)[0].mul_(fs[:, None]).to(B.dtype)
        if need_A:
            v = torch.mm(g, torch.mul(B, fs[:, None], out=torch.empty(B.shape, dtype=x.dtype, device=x.device)))
            grad_A = tall_product(x, v, 1.0)[0].to(A.dtype)  # vᵀx, v = s·(g ⊙ f) B: (N, r)
        if need_x:
            grad_x = torch.mm(g, Wf)
        if need_w:  # only when a caller unfroze the base
            grad_w = (g * (fs / s).to(g.dtype)).t().mm(x).to(weight.dtype)
        if need_b and bias is not None:
            grad_b = g.sum(0).to(bias.dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, grad_m, None, None, None


def dora_linear_cuda(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                     magnitude: Tensor, weight_norm: Tensor | None) -> Tensor:
    """:func:`lorakit.ops.dora_linear` without dropout through the Triton kernels (same arguments, same result)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    n = None if weight_norm is None else weight_norm.detach()
    h = _DoraLinearCuda.apply(x2, weight, bias, A, B, magnitude, n, float(scale), torch.is_grad_enabled())
    return h.view(*x.shape[:-1], h.shape[-1])
