"""Several LoRA linears that read the same input, computed as one autograd node.

    h_i = x W_iᵀ + b_i + s_i · x A_iᵀ B_iᵀ        i = 1 … m   (q, k, v of attention; gate, up of an MLP)

Computed one layer at a time, every member reads x for its own u_i = x A_iᵀ, again for its own
∂L/∂A_i = v_iᵀ x, and autograd then adds the m input gradients with m − 1 full-size additions.  As one
node, with the members' A stacked into A_cat (Σr, k):

* forward: one pass over x, u_cat = x A_catᵀ (N, Σr); each h_i is the backend's single-layer forward
  given its slice of u_cat (with the Triton backend one GEMM against the merged weight W_i + s_i B_i A_i,
  which needs u only for backward);
* backward: ∂L/∂B_i and v_i = s_i g_i B_i per member (each reads its own g_i), one pass over x for all
  ∂L/∂A_i at once (v_catᵀ x), and the input gradient accumulates member by member into one buffer
  inside the GEMMs (``addmm_``) instead of through separate temporaries.

Dropout is not grouped (each member has its own mask): callers use this only when every member's
dropout is off, which is the case at inference and for the usual LoRA recipes with dropout 0.
Saved for backward: x, u_cat (N, Σr) and the (frozen) weights and factors, as for a single layer.  A
member's weight may be 4-bit (``NF4Tensors``, QLoRA): it is dequantised where it is used, in forward and
again for ∂L/∂x, and only the packed weight is kept, as in :func:`lorakit.ops.nf4.nf4_lora_linear`.
The arithmetic is the backend's (``backends.backend_for``): the pieces its single-layer functions are
made of (``input_product``, ``grad_B``, ``branch_grad``, ``grad_A``, ``add_grad_x``), composed per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from .nf4_dequantize import dense_weight
from .nf4_format import NF4Tensors


def lora_linear_group(
    x: Tensor,
    weights: Sequence[Tensor | NF4Tensors],
    biases: Sequence[Tensor | None],
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
) -> tuple[Tensor, ...]:
    """(h_1, …, h_m), h_i = x W_iᵀ + b_i + s_i · x A_iᵀ B_iᵀ over the last dimension of x (no dropout).

    Args:
        x: (..., k) input shared by every member.
        weights: m frozen (d_i, k) weights (tensors, or 4-bit ``NF4Tensors``).   biases: m (d_i,) tensors or None.
        As: m (r_i, k) factors.   Bs: m (d_i, r_i) factors.   scales: m floats s_i.

    Returns:
        m tensors (..., d_i) in x's dtype; the same values and gradients as m calls of
        :func:`lorakit.ops.lora_linear` with dropout 0.
    """
    m = len(weights)
    if not (len(biases) == len(As) == len(Bs) == len(scales) == m) or m == 0:
        raise ValueError("lora_linear_group needs one weight, bias, A, B and scale per member")
    if torch.is_autocast_enabled(x.device.type):  # compute in the autocast dtype, as F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear_group(x.to(dtype), weights, biases, As, Bs, scales)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    scales = tuple(float(s) for s in scales)
    if backends.records_grad(x, *(W for W in weights if isinstance(W, Tensor)), *biases, *As, *Bs):
        outs = _LoraGroup.apply(x2, scales, *weights, *biases, *As, *Bs)
    else:  # inference: the same forward without an autograd node (Function.apply's host time, per group and token)
        outs, _, _ = _group_forward(x2, scales, weights, biases, As, Bs, need_u=False)
    return tuple(h.view(*lead, h.shape[-1]) for h in outs)


def _group_forward(x2: Tensor, scales: Sequence[float], Ws: Sequence[Tensor | NF4Tensors], bs: Sequence[Tensor | None],
                   As: Sequence[Tensor], Bs: Sequence[Tensor], need_u: bool) -> tuple[list[Tensor], Tensor, object]:
    """(h_1 … h_m, u_cat, backend) for x2 (N, k); u_cat is (0, Σr) unless ``need_u`` or the backend needs it."""
    be = backends.backend_for(x2)
    if need_u or not be.MERGED_WEIGHT:  # one pass over x for every member
        u = be.input_product(x2, torch.cat([A.to(x2.dtype) for A in As]))  # (N, Σr)
    else:
        u = x2.new_empty((0, sum(A.shape[0] for A in As)))
    outs, start = [], 0
    for W, b, A, B, s in zip(Ws, bs, As, Bs, scales):
        r = A.shape[0]
        u_i = u[:, start:start + r] if u.shape[0] else None
        outs.append(be.lora_forward(x2, dense_weight(W, x2.dtype), b, A, B, s, 0.0, 0, False, u_i)[0])
        start += r
    return outs, u, be


class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, scales, *params):  # type: ignore[override]
        m = len(scales)
        Ws, bs, As, Bs = (params[i * m:(i + 1) * m] for i in range(4))
        # (only applied when autograd records the call: lora_linear_group's records_grad)
        outs, u, be = _group_forward(x2, scales, Ws, bs, As, Bs, need_u=any(ctx.needs_input_grad))
        ctx.save_for_backward(x2, u, *(W if isinstance(W, Tensor) else None for W in Ws), *As, *Bs)
        ctx.nf4 = [W if isinstance(W, NF4Tensors) else None for W in Ws]  # (not tensors: kept on ctx as they are)
        ctx.be, ctx.scales, ctx.has_bias = be, scales, [b is not None for b in bs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        x2, u, *params = ctx.saved_tensors
        be, scales = ctx.be, ctx.scales
        m = len(scales)
        Ws, As, Bs = (params[i * m:(i + 1) * m] for i in range(3))
        Ws = [W if t is None else t for W, t in zip(Ws, ctx.nf4)]
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_W, need_b, need_A, need_B = (needs[2 + i * m:2 + (i + 1) * m] for i in range(4))
        need_v = any(need_A) or (need_x and not be.MERGED_WEIGHT)  # (merged: ∂x is g W', v is not needed)
        N = x2.shape[0]
        grad_x = None
        grad_W: list[Tensor | None] = [None] * m
        grad_b: list[Tensor | None] = [None] * m
        grad_B: list[Tensor | None] = [None] * m
        vs, start = [], 0
        for i, (g, W, A, B, s) in enumerate(zip(grads, Ws, As, Bs, scales)):
            r = A.shape[0]
            u_i = u[:, start:start + r]
            start += r
            if g is None:  # this member's output did not reach the loss
                vs.append(x2.new_zeros(N, r))
                continue
            g = g.reshape(N, -1)
            if need_B[i]:
                grad_B[i] = be.grad_B(g, u_i, s, B.dtype)
            v = be.branch_grad(g, B, s) if need_v else None  # (N, r) = s·g B
            vs.append(v)
            if need_x:  # accumulated member by member into one buffer, inside the GEMMs
                grad_x = be.add_grad_x(grad_x, g, dense_weight(W, x2.dtype), A, B, v, s)
            if need_W[i]:  # only when a caller unfroze a base weight
                grad_W[i] = (g.t() @ x2).to(W.dtype)
            if need_b[i] and ctx.has_bias[i]:
                grad_b[i] = g.sum(0)
        grad_A: list[Tensor | None] = [None] * m
        if any(need_A):
            ga = be.grad_A(x2, torch.cat(vs, dim=1), torch.promote_types(x2.dtype, torch.float32))  # (Σr, k): one pass over x for every ∂A_i
            start = 0
            for i, A in enumerate(As):
                r = A.shape[0]
                if need_A[i]:
                    grad_A[i] = ga[start:start + r].to(A.dtype)
                start += r
        if need_x and grad_x is None:
            grad_x = torch.zeros_like(x2)
        return (grad_x, None, *grad_W, *grad_b, *grad_A, *grad_B)
