"""Triton kernels for :func:`lorakit.ops.segmented_lora` (SGMV-style shrink and expand).

    shrink:  u_p = x_{order[p]} A_{a}ᵀ              (per block of same-adapter tokens; u: (N, R) fp32)
    expand:  h_{order[p]} += s_a · u_p B_{a}ᵀ        (accumulated into the base output in place)

Tokens are never copied: ``order`` (the tokens sorted by adapter, from :class:`SegmentPlan`) is read
inside the kernels, and each program handles up to BLOCK_M consecutive sorted tokens of one adapter,
so its A_a / B_a tile is loaded once for all of them. The grid has a fixed size
(⌊N / BLOCK_M⌋ + n programs, surplus ones return at once), so nothing waits on the host.

The backward pass reuses the two kernels with the roles of A and B swapped (the input gradient is
g ↦ (s·g B_a) A_a, a shrink by Bᵀ and an expand by Aᵀ); the adapters' own gradients are two masked
dense products, as in the torch path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .grid import cdiv, next_pow2
from .segment_plan import SegmentPlan, column_scales

try:  # Triton is optional: without it CUDA uses the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def available() -> bool:
    """Whether the Triton kernels can run here."""
    return triton is not None


BLOCK_M = 16  # tokens per program: tl.dot needs ≥ 16; larger blocks waste work on small segments

if triton is not None:

    @triton.jit
    def _block_rows(pid, blk_start_ptr, blk_end_ptr, order_ptr, BLOCK_M: tl.constexpr):
        # sorted positions offs_m of block pid, their mask, and the token ids they stand for
        start = tl.load(blk_start_ptr + pid)
        end = tl.load(blk_end_ptr + pid)
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        rows = tl.load(order_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        return offs_m, m_mask, rows

    @triton.jit
    def _shrink_kernel(
        x_ptr, w_ptr, u_ptr, order_ptr, blk_adapter_ptr, blk_start_ptr, blk_end_ptr, ranks_ptr,
        K,
        stride_xm, stride_xk, stride_wn, stride_wr, stride_wk, stride_um,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        # u[p, :r_a] = x[order[p]] · W_aᵀ for sorted positions p of one block; W_a: (R, K) strided.
        # With SPLIT_K > 1, program (pid, j) sums every SPLIT_K-th K-tile from j and adds atomically.
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        a = tl.load(blk_adapter_ptr + pid)
        if a >= 0:
            offs_m, m_mask, rows = _block_rows(pid, blk_start_ptr, blk_end_ptr, order_ptr, BLOCK_M)
            r = tl.load(ranks_ptr + a)
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < r
            w_base = w_ptr + a.to(tl.int64) * stride_wn
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                xt = tl.load(  # (BLOCK_M, BLOCK_K)
                    x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                )
                wt = tl.load(  # (BLOCK_K, BLOCK_R) = W_aᵀ tile
                    w_base + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0,
                )
                if IEEE:
                    acc += tl.dot(xt, wt.to(xt.dtype), input_precision="ieee")
                else:
                    acc += tl.dot(xt, wt.to(xt.dtype))
            u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :]
            u_mask = m_mask[:, None] & (offs_r[None, :] < BLOCK_R)
            if SPLIT_K == 1:
                tl.store(u_ptrs, acc, mask=u_mask)
            else:
                tl.atomic_add(u_ptrs, acc, mask=u_mask)

    @triton.jit
    def _expand_kernel(
        u_ptr, w_ptr, out_ptr, order_ptr, blk_adapter_ptr, blk_start_ptr, blk_end_ptr, ranks_ptr, scales_ptr,
        D,
        stride_um, stride_wn, stride_wd, stride_wr, stride_om, stride_od,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    ):
        # out[order[p], n-tile] += s_a · u[p, :r_a] · W_a[n-tile, :r_a]ᵀ; W_a: (D, R) strided.
        pid = tl.program_id(0)
        pid_n = tl.program_id(1)
        a = tl.load(blk_adapter_ptr + pid)
        if a >= 0:
            offs_m, m_mask, rows = _block_rows(pid, blk_start_ptr, blk_end_ptr, order_ptr, BLOCK_M)
            r = tl.load(ranks_ptr + a)
            s = tl.load(scales_ptr + a)
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < r
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            w_base = w_ptr + a.to(tl.int64) * stride_wn
            wt = tl.load(  # (BLOCK_R, BLOCK_N) = W_aᵀ tile
                w_base + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wd,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0,
            )
            ut = tl.load(  # (BLOCK_M, BLOCK_R) fp32
                u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0,
            )
            # u is rounded to the weights' dtype like the torch path rounds x Aᵀ to x's dtype
            if IEEE:
                acc = tl.dot(ut.to(wt.dtype), wt, input_precision="ieee")
            else:
                acc = tl.dot(ut.to(wt.dtype), wt)
            o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_od
            o_mask = m_mask[:, None] & n_mask[None, :]
            o = tl.load(o_ptrs, mask=o_mask, other=0.0)
            tl.store(o_ptrs, (o.to(tl.float32) + acc * s).to(o.dtype), mask=o_mask)


def _block_r(R: int) -> int:
    return max(16, next_pow2(R))


def shrink(x2: Tensor, plan: SegmentPlan, W: Tensor, ranks: Tensor, deterministic: bool = True) -> Tensor:
    """u (N, BLOCK_R) fp32 in sorted order: u_p = x_{order[p]} W_aᵀ, W: (n, R, K) any strides.

    deterministic=False lets a small grid (decode: a few tokens per adapter) split K over more
    programs that add atomically — faster, but the summation order then varies run to run.
    """
    N, K = x2.shape
    n, R, _ = W.shape
    BR = _block_r(R)
    order, blk_a, blk_s, blk_e = plan.block_table(BLOCK_M)
    BK = 128 if K >= 128 else max(16, next_pow2(K))
    grid = blk_a.numel()
    # one program streams all of A_a (R·K) alone: with few programs the GPU idles, so split K
    split_k = 1 if deterministic or grid >= 256 else max(1, min(cdiv(K, BK * 2), cdiv(512, grid)))
    alloc = torch.zeros if split_k > 1 else torch.empty  # blocks write every row they own; others are never read
    u = alloc(N, BR, device=x2.device, dtype=torch.float32)
    _shrink_kernel[(grid, split_k)](
        x2, W, u, order, blk_a, blk_s, blk_e, ranks,
        K,
        x2.stride(0), x2.stride(1), W.stride(0), W.stride(1), W.stride(2), u.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=BR, BLOCK_K=BK, IEEE=x2.dtype == torch.float32, SPLIT_K=split_k, num_warps=4,
    )
    return u


def expand_(out: Tensor, u: Tensor, plan: SegmentPlan, W: Tensor, ranks: Tensor, scales: Tensor) -> Tensor:
    """out[order[p]] += s_a · u_p W_aᵀ in place; W: (n, D, R) any strides, out: (N, D)."""
    N, D = out.shape
    BR = u.shape[1]
    order, blk_a, blk_s, blk_e = plan.block_table(BLOCK_M)
    BN = 128 if D >= 128 else max(16, next_pow2(D))
    grid = (blk_a.numel(), cdiv(D, BN))
    _expand_kernel[grid](
        u, W, out, order, blk_a, blk_s, blk_e, ranks, scales,
        D,
        u.stride(0), W.stride(0), W.stride(1), W.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BN, BLOCK_R=BR, IEEE=out.dtype == torch.float32, num_warps=4,
    )
    return out


@functools.lru_cache(maxsize=64)
def _full_ranks(n: int, R: int, device: torch.device) -> Tensor:
    return torch.full((n,), R, dtype=torch.int32, device=device)


def segmented_lora_triton(
    x2: Tensor,
    plan: SegmentPlan,
    A: Tensor,
    B: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    base2: Tensor | None,
    inplace: bool = False,
) -> Tensor:
    """(N, d) = base + segmented update, through the kernels; differentiable like the torch path.

    inplace: accumulate into base2 and skip autograd (the caller checked no gradient is needed).
    """
    n, R, _ = A.shape
    ranks = _full_ranks(n, R, x2.device) if ranks is None else ranks.to(device=x2.device, dtype=torch.int32)
    scales = scales.to(device=x2.device, dtype=torch.float32)
    if base2 is None:
        base2 = x2.new_zeros(x2.shape[0], B.shape[1])
    if inplace:  # serving: no autograd, so the faster non-deterministic split-K shrink is fine
        return forward_into(base2, x2, plan, A, B, scales, ranks, deterministic=False)
    return _SegmentedTriton.apply(x2, A, B, base2, scales, ranks, plan)


def forward_into(
    out: Tensor, x2: Tensor, plan: SegmentPlan, A: Tensor, B: Tensor, scales: Tensor, ranks: Tensor,
    deterministic: bool = False,
) -> Tensor:
    """out += segmented update, in place, no autograd: the serving path, two launches.

    out: (N, d) contiguous; x2: (N, k); A: (n, R, k), B: (n, d, R); scales (n,) float32 and ranks (n,)
    int32 on x2's device. The caller has validated the plan against the stacks (``segmented_lora``
    does). deterministic=False allows the split-K shrink (its float32 atomics add in varying order).
    """
    u = shrink(x2, plan, A.to(x2.dtype), ranks, deterministic)  # (N, BR) fp32, sorted order
    return expand_(out, u, plan, B.to(x2.dtype), ranks, scales)


class _SegmentedTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, A, B, base2, scales, ranks, plan):  # type: ignore[override]
        out = base2.to(x2.dtype).clone(memory_format=torch.contiguous_format)  # autograd must see base unchanged
        forward_into(out, x2, plan, A, B, scales, ranks, deterministic=True)
        ctx.save_for_backward(x2, A, B, scales, ranks)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x2, A, B, scales, ranks = ctx.saved_tensors
        plan: SegmentPlan = ctx.plan
        need_x, need_A, need_B, need_base = ctx.needs_input_grad[:4]
        g = g.contiguous()
        dt = x2.dtype
        A_, B_ = A.to(dt), B.to(dt)
        n, R, k = A.shape
        d = B.shape[1]
        grad_x = grad_A = grad_B = None
        if need_x:  # g ↦ (s_a g B_a) A_a: shrink by B_aᵀ (R, d), expand by A_aᵀ (k, R)
            v = shrink(g, plan, B_.transpose(1, 2), ranks)
            grad_x = expand_(torch.zeros_like(x2), v, plan, A_.transpose(1, 2), ranks, scales)
        if need_A or need_B:
            # Masked dense products: token t contributes only to its own adapter's columns.
            idx = plan.index.to(x2.device)
            own = torch.nn.functional.one_hot(idx + 1, n + 1)[:, 1:].to(dt).unsqueeze(-1)  # (N, n, 1)
            col = column_scales(scales, ranks, R).to(dt)  # (n, R)
            if need_A:
                v = ((g @ B_.transpose(1, 2).reshape(n * R, d).t()).view(-1, n, R) * (own * col)).reshape(-1, n * R)
                grad_A = (v.t() @ x2).view(n, R, k).to(A.dtype)
            if need_B:
                u = ((x2 @ A_.reshape(n * R, k).t()).view(-1, n, R) * (own * col)).reshape(-1, n * R)
                grad_B = (g.t() @ u).view(d, n, R).permute(1, 0, 2).to(B.dtype)
        return grad_x, grad_A, grad_B, (g if need_base else None), None, None, None
