"""A SwiGLU MLP's LoRA down-projection that does not keep its input.

    y = lora_linear(h, W, b, A, B, s, p, seed),   h = silu(gate) ⊙ up
      = h Wᵀ + b + s · drop(h) Aᵀ Bᵀ                gate, up: (N, k)  W: (d, k)  A: (r, k)  B: (d, r)

Why (docs/gpu-notes.md, "Memory: the fused SwiGLU down-projection"): a LoRA linear must keep its
input for ∂L/∂A, and in ``down_proj(act_fn(gate) * up)`` that input h is an (N, k) tensor nothing else
keeps.  The frozen model's autograd already keeps gate (SiLU backward), silu(gate) and up (the
product's backward); this function keeps only gate, up and u = drop(h) Aᵀ (N, r), and recomputes h
in backward.  Per layer that is two (N, k) tensors fewer than the unfused module: silu(gate) and h.

Backward, with g = ∂L/∂y and g_h = ∂L/∂h from :func:`lora_linear`'s backward applied to the recomputed h:

    ∂L/∂up   = g_h ⊙ silu(gate)
    ∂L/∂gate = g_h ⊙ up ⊙ silu'(gate),   silu'(z) = σ(z) (1 + z (1 − σ(z)))

The LoRA arithmetic is not repeated here: it is the backend's ``lora_forward`` / ``lora_backward``
(``backends.backend_for``) applied to h, so the result and the dropout mask are the ones ``lora_linear``
gives for the same seed and input.  With the torch backend SiLU's derivative is ``aten.silu_backward``,
the kernel the unfused module's autograd runs, so fused and unfused gradients agree to the last bit
wherever the products do; with the Triton backend the elementwise part is one pass each way instead
(``triton_swiglu``: h in forward, ∂gate and ∂up together in backward), rounded the same way.

Under ``torch.compile`` it is ``lora_linear(h, …)`` with h = silu(gate) ⊙ up computed inside
``torch.utils.checkpoint``: that marks h for recomputation, so the partitioner rebuilds it in backward
from gate and up (which SiLU's and the product's backward keep anyway) instead of saving it — left to
itself it saves h, since its consumer in backward (∂A = vᵀh) is a matmul it cannot fuse into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backends import triton_lora

if backends.TRITON_USABLE:
    from . import triton_swiglu
from .lora_linear import lora_linear
from .nf4_dequantize import dense_weight
from .nf4_format import NF4Tensors


def swiglu_lora_down(
    gate: Tensor,
    up: Tensor,
    weight: Tensor | NF4Tensors | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | Tensor = 0,
) -> Tensor:
    """y = lora_linear(silu(gate) ⊙ up, W, b, A, B, s, p, seed), keeping gate and up instead of the product.

    Args:
        gate, up: (..., k) outputs of the MLP's gate and up projections (same shape).
        weight: (d, k) frozen down-projection weight (a tensor, or 4-bit ``NF4Tensors``: dequantised where it is
            used and kept packed, as :func:`lorakit.ops.nf4.nf4_lora_linear` does), or None for the low-rank
            term alone.
        bias: (d,) or None.   lora_A: (r, k).   lora_B: (d, r).   scale: s.
        dropout_p, seed: the branch's dropout, exactly as :func:`lorakit.ops.lora_linear` takes them
            (same seed, same device type → same mask).

    Returns:
        (..., d) in the dtype of silu(gate) ⊙ up (the autocast dtype under autocast).
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if torch.is_autocast_enabled(gate.device.type):
        # As lora_linear: compute in the autocast dtype (the projections' outputs already are), with
        # autocast off inside so every product sees one dtype.
        dtype = torch.get_autocast_dtype(gate.device.type)
        with torch.autocast(gate.device.type, enabled=False):
            return swiglu_lora_down(gate.to(dtype), up.to(dtype), weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    dtype = torch.promote_types(gate.dtype, up.dtype)  # the dtype silu(gate) * up would have
    k = gate.shape[-1]
    gate2, up2 = gate.to(dtype).reshape(-1, k), up.to(dtype).reshape(-1, k)  # (N, k)
    scale, dropout_p = float(scale), float(dropout_p)
    if torch.compiler.is_compiling():  # h marked for recomputation (see the module docstring)
        if isinstance(weight, NF4Tensors):  # and a 4-bit Ŵ likewise
            from .custom_ops import nf4_dense_recomputed

            weight = nf4_dense_recomputed(weight, dtype)
        h = torch.utils.checkpoint.checkpoint(_silu_mul, gate2, up2, use_reentrant=False)
        y = lora_linear(h, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    else:
        y = _SwigluLoraDown.apply(gate2, up2, weight, bias, lora_A, lora_B, scale, dropout_p, int(seed),
                                  torch.is_grad_enabled())
    return y.view(*gate.shape[:-1], y.shape[-1])


def _silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def _swiglu(gate: Tensor, up: Tensor, triton: bool) -> Tensor:
    """h = silu(gate) ⊙ up, rounded as the unfused module rounds it (silu first, then the product)."""
    return triton_swiglu.swiglu_forward(gate, up) if triton else F.silu(gate).mul_(up)


def _swiglu_backward(grad_h: Tensor, gate: Tensor, up: Tensor, triton: bool) -> tuple[Tensor, Tensor]:
    """(∂gate, ∂up) from ∂L/∂h; grad_h is ours (fresh from the LoRA backward) and is reused for ∂gate."""
    if triton:
        return triton_swiglu.swiglu_backward(grad_h, gate, up)
    grad_up = grad_h * F.silu(gate)
    return torch.ops.aten.silu_backward(grad_h.mul_(up), gate), grad_up  # the kernel unfused autograd runs


class _SwigluLoraDown(torch.autograd.Function):
    """The eager route: saves gate, up, W, A, B and u = c·drop(h) Aᵀ; h is recomputed in backward (and a 4-bit W
    dequantised again)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, A, B, scale, p, seed, grad_enabled):  # type: ignore[override]
        be = backends.backend_for(gate)
        triton = be is triton_lora
        # needs_input_grad is True for inputs that require grad even under torch.no_grad(): only the caller's
        # grad mode says whether backward can come
        need_u = grad_enabled and any(ctx.needs_input_grad[:6])
        h = _swiglu(gate, up, triton)
        y, u = be.lora_forward(h, dense_weight(weight, h.dtype), bias, A, B, scale, p, seed, need_u)
        ctx.save_for_backward(gate, up, None if isinstance(weight, NF4Tensors) else weight, A, B, u)
        ctx.nf4 = weight if isinstance(weight, NF4Tensors) else None  # (not a tensor: kept on ctx as it is)
        ctx.be, ctx.scale, ctx.p, ctx.seed, ctx.has_bias = be, scale, p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        gate, up, weight, A, B, u = ctx.saved_tensors
        nf4 = ctx.nf4
        need_gate, need_up, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        need_in = need_gate or need_up
        triton = ctx.be is triton_lora
        g = grad_y.contiguous()
        h = _swiglu(gate, up, triton)
        W = weight
        if nf4 is not None:  # a 4-bit W, dequantised again only for ∂gate and ∂up
            W = dense_weight(nf4, h.dtype) if need_in else None
        grad_h, grad_A, grad_B = ctx.be.lora_backward(g, h, W, A, B, u, ctx.scale, ctx.p, ctx.seed, need_in,
                                                      need_A, need_B)
        grad_w = (g.t() @ h).to(weight.dtype) if need_w else None  # only when a caller unfroze the base
        del h, W  # before the (N, k) gradients below are allocated
        grad_gate = grad_up = None
        if need_in:
            grad_gate, grad_up = _swiglu_backward(grad_h, gate, up, triton)
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        return grad_gate, grad_up, grad_w, grad_b, grad_A, grad_B, None, None, None, None
