"""The LoRA linear, computed once for every layer and device.

    h = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ          x: (N, k)  W: (d, k)  A: (r, k)  B: (d, r)

What is kept for backward is the point of this module:

* x itself (the caller holds it anyway) and u = c·drop(x) Aᵀ, an (N, r) matrix — never a dropped-out
  copy of x and never the (N, d) product B(Ax);
* the dropout mask is not kept: backward regenerates it from ``seed`` (see ``ops.dropout``);
* W is frozen: it gets no gradient (unless a caller unfroze it), so nothing is kept for it.

Backward, with g = ∂L/∂h (N, d), c = 1/(1-p) and v = s·c · g B (N, r):

    ∂L/∂B = s · gᵀ u                                   (d, r)
    ∂L/∂A = vᵀ drop(x)                                 (r, k)
    ∂L/∂x = g W + drop(v A)   (zero at dropped inputs, × c elsewhere)
    ∂L/∂b = Σ_rows g                                   (d,)

The arithmetic lives in the backends (``torch_lora``, ``triton_lora``; ``backends.backend_for`` picks one
from x).  Eagerly it runs through one autograd function, :class:`_LoraLinear`; under ``torch.compile``
through the custom-op pair of ``custom_ops`` — the same backend functions in both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .torch_lora import _as


def lora_linear(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | Tensor = 0,
) -> Tensor:
    """h = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ over the last dimension of x.

    Args:
        x: (..., k) input.
        weight: (d, k) frozen base weight (a transposed view is fine), or None to compute the
            low-rank term alone (how a second active adapter is added).
        bias: (d,) or None.
        lora_A: (r, k).   lora_B: (d, r).   scale: s.
        dropout_p: dropout probability on the branch's input; the mask is a function of ``seed``
            (and of the backend, ``ops.backends``: device type and row count): the same seed gives the
            same mask for the same input shape and device.
        seed: identifies the dropout mask; pass a fresh one for every training call (an int, or a
            0-d integer CPU tensor — what a layer passes under ``torch.compile``, so that drawing it
            does not break the graph).

    Returns:
        (..., d) in x's dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        # Under autocast the LoRA linear computes in the autocast dtype, like F.linear would; the
        # kernels then run with autocast off so every product inside sees one dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x.to(dtype), weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    if torch.compiler.is_compiling():  # the custom ops: Inductor sees inside them, no graph break
        # imported on first compile: registering its triton_ops loads Inductor (seconds)
        from .custom_ops import lora_linear_op

        return lora_linear_op(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    if not backends.records_grad(x, weight, bias, lora_A, lora_B):
        # Inference (decode, evaluation): the backend's forward alone.  An autograd node would record nothing,
        # yet Function.apply costs host time per call — the pace of batch-1 decoding.
        x2 = x.reshape(-1, x.shape[-1])
        h, _ = backends.backend_for(x2).lora_forward(x2, weight, bias, lora_A, lora_B, float(scale),
                                                     float(dropout_p), int(seed), False)
        return h.view(*x.shape[:-1], h.shape[-1])
    return _LoraLinear.apply(x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), int(seed))


class _LoraLinear(torch.autograd.Function):
    """The eager route on every device: one autograd node whose forward and backward are the backend's.

    (Not the custom ops: their dispatch costs ≈ 0.3 ms of host time per forward+backward, measured on the
    H200 host — more than the GPU work of a 4096² layer's low-rank branch.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, p, seed):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, k)
        be = backends.backend_for(x2)
        ctx.dtypes = A.dtype, B.dtype
        if not be.MERGED_WEIGHT:  # aten products: cast the small factors once, for forward and backward alike
            A, B = _as(A, x.dtype), _as(B, x.dtype)  # (each cast is a kernel launch: host time, per call)
        # Only applied when autograd records the call (lora_linear's records_grad), so backward can come.
        need_u = any(ctx.needs_input_grad[:5])
        h, u = be.lora_forward(x2, weight, bias, A, B, scale, p, seed, need_u)
        ctx.save_for_backward(x2, weight, A, B, u)
        ctx.x_shape, ctx.be, ctx.scale, ctx.p, ctx.seed, ctx.has_bias = x.shape, be, scale, p, seed, bias is not None
        return h.view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, weight, A, B, u = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d)
        grad_x, grad_A, grad_B = ctx.be.lora_backward(g, x2, weight, A, B, u, ctx.scale, ctx.p, ctx.seed,
                                                      need_x, need_A, need_B)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if grad_A is not None:
            grad_A = _as(grad_A, ctx.dtypes[0])
        if grad_B is not None:
            grad_B = _as(grad_B, ctx.dtypes[1])
        grad_w = (g.t() @ x2).to(weight.dtype) if need_w else None  # only when a caller unfroze the base
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None
