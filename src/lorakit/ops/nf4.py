"""The linear over NF4 weights (the format: ``nf4_format``; dequantisation on any device: ``nf4_dequantize``).

The linear ``h = x Ŵᵀ + b + s · drop(x) Aᵀ Bᵀ`` keeps the packed weight for backward, never Ŵ: backward
dequantises again (∂L/∂x = g Ŵ + ...), so a layer's activation memory is that of the bf16 LoRA linear
and the base costs 4.13 bits a weight.  On CUDA the dequantisation is a Triton kernel
(``ops.triton_nf4``) feeding cuBLAS — with the update folded in (Ŵ + s·B A) where the LoRA pieces run on
``triton_lora`` — and up to ``GEMV_MAX_TOKENS`` tokens without autograd may use the fused
dequantise-GEMV ``triton_nf4.gemv`` instead (none do: measured slower on the H200, see the
constant).  The LoRA pieces follow ``backends.backend_for`` like a bf16 base, so a dropout seed names
the same mask on either base.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import backend_for, records_grad
from .nf4_dequantize import dequantize_nf4
from .nf4_format import (  # noqa: F401  (the format's names, for callers of the NF4 ops)
    BLOCK,
    NESTED_BLOCK,
    NF4_VALUES,
    NF4Tensors,
    absmax_of,
    bits_per_weight,
    dequantize_nf4_reference,
    dynamic_map,
    nf4_map,
    quantize_nf4,
)

# -- the linear ---------------------------------------------------------------------------------------

# Up to this many tokens the CUDA forward without autograd multiplies straight from the packed weight
# (``triton_nf4.gemv``: one pass over 4.13 bits a weight) instead of dequantising to bf16 for cuBLAS.
# Measured on the H200 (benchmarks/RESULTS.md, 2026-12-03, µs, N = 1 token, fused / dequantise + cuBLAS):
# 2048²: 68 / 16, 8192×2048: 37 / 30, 2048×8192: 35 / 31, 8192²: 107 / 103 — and further behind at N = 4
# and 16.  So no token count takes the fused route until a measurement says otherwise: decode dequantises.
GEMV_MAX_TOKENS = 0


class _NF4LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, bias, A, B, scale, p, seed, cuda):  # type: ignore[override]
        # cuda: whether the LoRA pieces run on triton_lora (as ``backends.backend_for`` picks for a bf16 base,
        # so a seed gives the same dropout mask as there) rather than torch_lora; tests pass True under the
        # interpreter.  Dequantisation runs the Triton kernel for any CUDA tensor.
        from . import torch_lora

        ctx.t, ctx.scale, ctx.p, ctx.seed, ctx.has_bias, ctx.cuda = t, scale, p, seed, bias is not None, cuda
        if A is None:  # the base alone: h = x Ŵᵀ + b
            ctx.save_for_backward(None, None, None)
            W = _dequantize(t, x.dtype, cuda)
            return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))
        if cuda:
            from . import triton_lora, triton_nf4

            need_u = any(ctx.needs_input_grad[3:5])
            if p == 0.0:  # h = x Ŵ'ᵀ + b with Ŵ' = Ŵ + s·B A formed by one dequantise-and-merge pass
                W = triton_nf4.merged(t, B, A, scale, x.dtype)
                h = torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))
                u = triton_lora.xa(x, A) if need_u else x.new_empty((0, A.shape[0]))
            else:
                W = triton_nf4.dequantize(t, x.dtype)
                h, u = triton_lora.lora_forward(x, W, bias, A, B, scale, p, seed, need_u)
            ctx.save_for_backward(x, A, B, u)
            return h
        h, u = torch_lora.lora_forward(x, dequantize_nf4(t, x.dtype), bias, A, B, scale, p, seed, True)
        ctx.save_for_backward(x, A, B, u)  # not Ŵ: backward dequantises again
        return h

    @staticmethod
    def backward(ctx, grad_h):  # type: ignore[override]
        from . import torch_lora

        saved = ctx.saved_tensors
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g = grad_h.contiguous()
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        if saved[0] is None:  # the base alone
            grad_x = g @ _dequantize(ctx.t, g.dtype, ctx.cuda) if need_x else None
            return grad_x, None, grad_b, None, None, None, None, None, None
        x, A, B, u = saved
        if ctx.cuda:
            from . import triton_lora, triton_nf4

            if ctx.p == 0.0:  # the backend's pieces, with ∂x = g Ŵ' from one dequantise-and-merge pass
                gB = triton_lora.grad_B(g, u, ctx.scale, B.dtype) if need_B else None
                gA = triton_lora.grad_A(x, triton_lora.branch_grad(g, B, ctx.scale), A.dtype) if need_A else None
                gx = torch.mm(g, triton_nf4.merged(ctx.t, B, A, ctx.scale, x.dtype)) if need_x else None
            else:
                W = triton_nf4.dequantize(ctx.t, x.dtype) if need_x else None
                gx, gA, gB = triton_lora.lora_backward(g, x, W, A, B, u, ctx.scale, ctx.p, ctx.seed, need_x,
                                                       need_A, need_B)
            return gx, None, grad_b, gA, gB, None, None, None, None
        W = dequantize_nf4(ctx.t, x.dtype) if need_x else None
        gx, gA, gB = torch_lora.lora_backward(g, x, W, A, B, u, ctx.scale, ctx.p, ctx.seed, need_x, need_A, need_B)
        return gx, None, grad_b, gA, gB, None, None, None, None


def _dequantize(t: NF4Tensors, dtype: torch.dtype, cuda: bool) -> Tensor:
    if cuda:
        from . import triton_nf4

        return triton_nf4.dequantize(t, dtype)
    return dequantize_nf4(t, dtype)


def _triton_ok() -> bool:
    from . import triton_nf4

    return triton_nf4.available()


def nf4_lora_linear(x: Tensor, t: NF4Tensors, bias: Tensor | None, lora_A: Tensor | None = None,
                    lora_B: Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                    seed: int | Tensor = 0) -> Tensor:
    """h = x Ŵᵀ + b + s · drop(x) Aᵀ Bᵀ over the last dimension of x, with Ŵ the NF4 weight ``t`` dequantised.

    Args:
        x: (..., k).  t: the (d, k) weight.  bias: (d,) or None.
        lora_A: (r, k) and lora_B: (d, r), or both None for the base alone.  scale: s.
        dropout_p, seed: as in :func:`lorakit.ops.lora_linear` (the same masks).

    Returns (..., d) in x's dtype (under autocast, the autocast dtype).  Ŵ gets no gradient and is not
    kept for backward; gradients flow to x, b, A and B.  Under ``torch.compile`` it is custom ops that the
    graph holds whole (``custom_ops.nf4_lora_linear_op``: no graph break), eagerly the autograd function below.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return nf4_lora_linear(x.to(dtype), t, bias, lora_A, lora_B, scale, dropout_p, seed)
    if torch.compiler.is_compiling():
        from .custom_ops import nf4_lora_linear_op  # (imported on first compile, as lora_linear's)

        return nf4_lora_linear_op(x, t, bias, lora_A, lora_B, scale, dropout_p, seed)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    needs_grad = records_grad(x, bias, lora_A, lora_B)
    if not needs_grad and x2.is_cuda and x2.shape[0] <= GEMV_MAX_TOKENS and (lora_A is None or not dropout_p) \
            and _triton_ok():
        from . import triton_nf4

        h = triton_nf4.gemv(x2, t, bias, lora_A, lora_B, float(scale))
    elif not needs_grad and lora_A is not None and not dropout_p:
        # Inference: dequantise, then the torch backend's forward (the op below, without an autograd node's
        # host time: decode runs this once per linear and token).
        from . import torch_lora

        h, _ = torch_lora.lora_forward(x2, dequantize_nf4(t, x2.dtype), bias, lora_A, lora_B, float(scale), 0.0, 0,
                                       False)
    else:
        from . import triton_lora

        h = _NF4LoraLinear.apply(x2, t, bias, lora_A, lora_B, float(scale), float(dropout_p), int(seed),
                                 _triton_ok() and backend_for(x2) is triton_lora)
    return h.view(*x.shape[:-1], h.shape[-1])
