"""The LoRA linear as a pair of ``torch.library`` custom ops: what ``lora_linear`` runs under ``torch.compile``.

    lorakit::lora_linear_fwd(x, W, b, A, B, s, p, seed, need_u) -> (h, u)
    lorakit::lora_linear_bwd(g, x, W, A, B, u, s, p, seed, need_x, need_A, need_B) -> (∂x, ∂A, ∂B)

Both are ``torch.library.triton_op``s whose bodies are the backend functions (``backends.backend_for``):
Inductor decomposes them, so it sees the aten products (and fuses the small ones with their neighbours)
and the Triton kernels (launched through ``wrap_triton``), and schedules them itself — which is also what
makes them safe under CUDA graphs (``mode="reduce-overhead"``): every output is a fresh tensor that
Inductor allocated, never an alias of an input or of another output.  The autograd formula is registered on
the forward op (``register_autograd``), so what is saved is the eager route's: x, W, A, B and u.

Dropout reads its seed on the host (a 0-d int64 CPU tensor drawn by the layer with ``torch.randint``, so
drawing it does not break the graph), which a traced body cannot do; with p > 0 the pair calls the opaque
``lorakit::lora_linear_dropout_fwd/bwd`` instead, whose fake implementations promise fresh, contiguous
outputs, as the real ones return.  Without dropout the seed is None: no CPU tensor enters the graph.
On CUDA that opaque pair broke CUDA graph trees (H200, torch 2.11, mode="reduce-overhead": "storage data
ptrs are not allocated in pool", one per LoRA linear), so compiled CUDA code with dropout uses
:func:`dense_dropout_lora` instead: plain differentiable ops, Inductor's own random numbers, and a saved
one-byte mask — more memory than the seed, less than PEFT's dropped-out copy of x.
Gradients that are not needed come back as empty tensors (a custom op cannot return None), each its own.

A 4-bit (NF4) weight enters compiled code through one more op, ``lorakit::nf4_dequantize`` (opaque: the
Triton dequantisation kernel on CUDA, torch elsewhere), called inside ``torch.utils.checkpoint`` so the
compiled backward dequantises again instead of keeping Ŵ, as the eager NF4 linear does
(:func:`nf4_dense_recomputed`).  So a QLoRA model compiles without graph breaks and can run under CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .nf4_dequantize import dequantize_nf4
from .nf4_format import NF4Tensors


def seed_tensor(seed: int | Tensor) -> Tensor:
    """The dropout seed as the custom ops take it: a 0-d int64 tensor on the CPU."""
    if isinstance(seed, Tensor):
        return seed.to(device="cpu", dtype=torch.int64).reshape(())
    return torch.tensor(int(seed), dtype=torch.int64)


def _filled(g: Tensor, grads) -> tuple[Tensor, ...]:
    """The gradients with a fresh (0,) tensor for each one not computed (None)."""
    return tuple(g.new_empty(0) if t is None else t for t in grads)


@torch.library.triton_op("lorakit::lora_linear_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
         seed: Tensor | None, need_u: bool) -> tuple[Tensor, Tensor]:
    if p:
        return torch.ops.lorakit.lora_linear_dropout_fwd(x, weight, bias, A, B, scale, p, seed, need_u)
    return backends.backend_for(x).lora_forward(x, weight, bias, A, B, scale, 0.0, 0, need_u)


@torch.library.triton_op("lorakit::lora_linear_bwd", mutates_args=())
def _bwd(g: Tensor, x: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, u: Tensor, scale: float, p: float,
         seed: Tensor | None, need_x: bool, need_A: bool, need_B: bool) -> tuple[Tensor, Tensor, Tensor]:
    if p:
        return torch.ops.lorakit.lora_linear_dropout_bwd(g, x, weight, A, B, u, scale, p, seed, need_x, need_A,
                                                         need_B)
    return _filled(g, backends.backend_for(x).lora_backward(g, x, weight, A, B, u, scale, 0.0, 0, need_x, need_A,
                                                            need_B))


@torch.library.custom_op("lorakit::lora_linear_dropout_fwd", mutates_args=())
def _dropout_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
                 seed: Tensor, need_u: bool) -> tuple[Tensor, Tensor]:
    return backends.backend_for(x).lora_forward(x, weight, bias, A, B, scale, p, int(seed), need_u)


@_dropout_fwd.register_fake
def _(x, weight, bias, A, B, scale, p, seed, need_u):
    d = (weight if weight is not None else B).shape[0]
    return x.new_empty((x.shape[0], d)), x.new_empty((x.shape[0] if need_u else 0, A.shape[0]))


@torch.library.custom_op("lorakit::lora_linear_dropout_bwd", mutates_args=())
def _dropout_bwd(g: Tensor, x: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, u: Tensor, scale: float,
                 p: float, seed: Tensor, need_x: bool, need_A: bool, need_B: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = backends.backend_for(x).lora_backward(g, x, weight, A, B, u, scale, p, int(seed), need_x, need_A, need_B)
    return tuple(t.contiguous() for t in _filled(g, grads))  # contiguous, as the fake promises (∂B may be a view)


@_dropout_bwd.register_fake
def _(g, x, weight, A, B, u, scale, p, seed, need_x, need_A, need_B):
    fresh = lambda t, need: torch.empty_like(t, memory_format=torch.contiguous_format) if need else g.new_empty(0)  # noqa: E731
    return fresh(x, need_x), fresh(A, need_A), fresh(B, need_B)


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


def dense_dropout_lora(x: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                       p: float) -> Tensor:
    """h = x Wᵀ + b + s · dropout(x, p) Aᵀ Bᵀ as plain differentiable ops (x: (N, k) → (N, d), x's dtype).

    What compiled CUDA code runs with dropout: Inductor draws the mask with its own random numbers and
    autograd keeps it (one byte per element of x) — no host-side seed, nothing opaque in the graph."""
    dt = x.dtype
    low = F.linear(F.linear(F.dropout(x, p, training=True), A.to(dt)), B.to(dt)) * scale  # (N, d)
    if weight is None:
        return low if bias is None else low + bias.to(dt)
    return F.linear(x, weight.to(dt), None if bias is None else bias.to(dt)) + low


def lora_linear_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                   scale: float, dropout_p: float, seed: int | Tensor) -> Tensor:
    """:func:`lorakit.ops.lora_linear` through the custom ops (same arguments, same result): its route under
    ``torch.compile`` (on CUDA with dropout: :func:`dense_dropout_lora`, the same function with other masks)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (N, k)
    scale, dropout_p = float(scale), float(dropout_p)
    if dropout_p and x.is_cuda and torch.compiler.is_compiling():
        h = dense_dropout_lora(x2, weight, bias, lora_A, lora_B, scale, dropout_p)
        return h.view(*x.shape[:-1], h.shape[-1])
    need_u = backends.records_grad(x, weight, bias, lora_A, lora_B)
    h, _ = torch.ops.lorakit.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scale, dropout_p,
                                             seed_tensor(seed) if dropout_p else None, need_u)
    return h.view(*x.shape[:-1], h.shape[-1])


@torch.library.custom_op("lorakit::nf4_dequantize", mutates_args=())
def _nf4_dequantize(packed: Tensor, absmax: Tensor, nested_absmax: Tensor, offset: Tensor, d: int, k: int,
                    dtype: torch.dtype) -> Tensor:
    return dequantize_nf4(NF4Tensors(packed, absmax, nested_absmax, offset, (d, k)), dtype)


@_nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, offset, d, k, dtype):
    return packed.new_empty((d, k), dtype=dtype)


def nf4_dense_recomputed(t: NF4Tensors, dtype: torch.dtype) -> Tensor:
    """Ŵ (d, k) in ``dtype`` for compiled code: the dequantisation op inside ``torch.utils.checkpoint``, which
    marks it for recomputation, so the partitioner dequantises again in backward rather than saving Ŵ."""
    return torch.utils.checkpoint.checkpoint(torch.ops.lorakit.nf4_dequantize, t.packed, t.absmax, t.nested_absmax,
                                             t.offset, t.shape[0], t.shape[1], dtype, use_reentrant=False)


def nf4_lora_linear_op(x: Tensor, t: NF4Tensors, bias: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None,
                       scale: float, dropout_p: float, seed: int | Tensor) -> Tensor:
    """:func:`lorakit.ops.nf4.nf4_lora_linear` under ``torch.compile``: Ŵ from :func:`nf4_dense_recomputed`, then
    the LoRA linear's compiled route (:func:`lora_linear_op`), or the base product alone without factors."""
    W = nf4_dense_recomputed(t, x.dtype)
    if lora_A is None:
        return F.linear(x, W, None if bias is None else bias.to(x.dtype))
    return lora_linear_op(x, W, bias, lora_A, lora_B, scale, dropout_p, seed)
