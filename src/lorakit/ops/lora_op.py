"""The LoRA linear as a pair of ``torch.library`` custom ops, so ``torch.compile`` keeps it whole.

    lorakit::lora_linear_fwd(x, W, b, A, B, s, p, seed, need_u) -> (h, u)
    lorakit::lora_linear_bwd(g, x, W, A, B, u, s, p, seed, need_x, need_A, need_B) -> (∂x, ∂A, ∂B)

The dropout seed is a 0-d int64 CPU tensor in the ops' schema, not an int: a layer under
``torch.compile`` draws it with ``torch.randint`` (traced, no graph break), and the ops read its value
inside, where Dynamo does not look.

The ops are opaque to Dynamo (no graph break inside a LoRA layer, whatever the dropout code does on
the host) and carry their own autograd (``register_autograd``) and shape functions (``register_fake``).
Each op computes on the device it is given: CUDA with Triton runs ``triton_lora``; anything else runs
the torch reference path of ``lora_linear`` itself, so CPU training compiles too.  The saved state is
the same as the reference path's: x, W, A, B and u = drop(x) Aᵀ — never a mask (it is a seed).
Gradients that are not needed come back as empty tensors, since a custom op cannot return None.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from . import triton_lora
from .lora_linear import _LoraLinear


_use_triton = triton_lora.use_triton  # module attribute: tests patch it to exercise the route on CPU


def seed_tensor(seed: int | Tensor) -> Tensor:
    """The dropout seed as the custom ops take it: a 0-d int64 tensor on the CPU."""
    if isinstance(seed, Tensor):
        return seed.to(device="cpu", dtype=torch.int64).reshape(())
    return torch.tensor(int(seed), dtype=torch.int64)


@torch.library.custom_op("lorakit::lora_linear_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
         seed: Tensor, need_u: bool) -> tuple[Tensor, Tensor]:
    seed = int(seed)
    if _use_triton(x):
        return triton_lora.lora_forward(x, weight, bias, A, B, scale, p, seed, need_u)[:2]
    ctx = SimpleNamespace()  # the reference forward, called as autograd would, to reuse its arithmetic
    ctx.save_for_backward = lambda *ts: setattr(ctx, "saved", ts)
    h = _LoraLinear.forward(ctx, x, weight, bias, A, B, scale, p, seed)
    u = ctx.saved[-1]  # (x, weight, A, B, u)
    return h, (u if need_u else x.new_empty((0, A.shape[0])))


@_fwd.register_fake
def _(x, weight, bias, A, B, scale, p, seed, need_u):
    d = (weight if weight is not None else B).shape[0]
    return x.new_empty((x.shape[0], d)), x.new_empty((x.shape[0] if need_u else 0, A.shape[0]))


@torch.library.custom_op("lorakit::lora_linear_bwd", mutates_args=())
def _bwd(g: Tensor, x: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, u: Tensor, scale: float, p: float,
         seed: Tensor, need_x: bool, need_A: bool, need_B: bool) -> tuple[Tensor, Tensor, Tensor]:
    seed = int(seed)
    if _use_triton(x):
        gx, gA, gB = triton_lora.lora_backward(g, x, weight, A, B, u, scale, p, seed, need_x, need_A, need_B)
    else:
        ctx = SimpleNamespace(saved_tensors=(x, weight, A, B, u), scale=scale, p=p, seed=seed, has_bias=False,
                              needs_input_grad=(need_x, False, False, need_A, need_B, False, False, False))
        gx, _, _, gA, gB, *_ = _LoraLinear.backward(ctx, g)
    # Results contiguous, as the fake impl promises (∂B is a transposed view), and each a fresh tensor: a
    # placeholder shared by two outputs would make them alias each other, which the schema forbids (CUDA
    # graph trees then lose track of the storage).
    return tuple(g.new_empty(0) if t is None else t.contiguous() for t in (gx, gA, gB))


@_bwd.register_fake
def _(g, x, weight, A, B, u, scale, p, seed, need_x, need_A, need_B):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else g.new_empty(0),
            torch.empty_like(A, memory_format=torch.contiguous_format) if need_A else g.new_empty(0),
            torch.empty_like(B, memory_format=torch.contiguous_format) if need_B else g.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, A, B, scale, p, seed, _need_u = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], seed)
    ctx.scale, ctx.p, ctx.has_bias = scale, p, bias is not None


def _backward(ctx, grad_h: Tensor, _grad_u: Tensor):
    x, weight, A, B, u, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    g = grad_h.contiguous()
    gx, gA, gB = torch.ops.lorakit.lora_linear_bwd(g, x, weight, A, B, u, ctx.scale, ctx.p, seed,
                                                  need_x, need_A, need_B)
    grad_w = (g.t() @ x).to(weight.dtype) if need_w else None  # only when a caller unfroze the base
    grad_b = g.sum(0) if need_b and ctx.has_bias else None
    return (gx if need_x else None, grad_w, grad_b, gA if need_A else None, gB if need_B else None,
            None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _TritonLoraLinear(torch.autograd.Function):
    """The eager CUDA route: the same functions as the custom ops, without their per-call dispatch cost
    (≈ 0.3 ms a forward+backward on the host, measured: more than the GPU work of a 4096² layer's
    low-rank branch)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, p, seed, grad_enabled):  # type: ignore[override]
        # needs_input_grad is True for inputs that require grad even under torch.no_grad(); only the
        # caller's grad mode (forward itself always runs without grad) says whether backward can come.
        need_u = grad_enabled and any(ctx.needs_input_grad[:5])
        keep = grad_enabled and ctx.needs_input_grad[0] and triton_lora.keeps_merged(weight, p)
        h, u, merged = triton_lora.lora_forward(x, weight, bias, A, B, scale, p, seed, need_u, keep)
        ctx.save_for_backward(x, weight, A, B, u, merged)
        ctx.scale, ctx.p, ctx.seed, ctx.has_bias = scale, p, seed, bias is not None
        return h

    @staticmethod
    def backward(ctx, grad_h):  # type: ignore[override]
        x, weight, A, B, u, merged = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g = grad_h.contiguous()
        gx, gA, gB = triton_lora.lora_backward(g, x, weight, A, B, u, ctx.scale, ctx.p, ctx.seed,
                                               need_x, need_A, need_B, merged)
        grad_w = (g.t() @ x).to(weight.dtype) if need_w else None
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        return gx, grad_w, grad_b, gA, gB, None, None, None, None


def lora_linear_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                   scale: float, dropout_p: float, seed: int | Tensor) -> Tensor:
    """:func:`lorakit.ops.lora_linear` for CUDA tensors and under ``torch.compile`` (same arguments, same result).

    Under ``torch.compile`` it goes through the custom ops; in eager mode on CUDA with Triton, through
    :class:`_TritonLoraLinear`, which runs the same kernels with less host overhead.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (N, k)
    scale, dropout_p = float(scale), float(dropout_p)
    if not torch.compiler.is_compiling() and _use_triton(x):
        h = _TritonLoraLinear.apply(x2, weight, bias, lora_A, lora_B, scale, dropout_p, int(seed),
                                    torch.is_grad_enabled())
    else:
        need_u = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B))
        h, _ = torch.ops.lorakit.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scale, dropout_p,
                                                 seed_tensor(seed), need_u)
    return h.view(*x.shape[:-1], h.shape[-1])
