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

The LoRA arithmetic is not repeated here: on CUDA with Triton it is ``triton_lora.lora_forward`` /
``lora_backward`` on h, elsewhere the reference ``_LoraLinear.forward`` / ``backward`` (called with a
plain namespace as ctx, as ``lora_op`` does), so the result and the dropout mask are the ones
``lora_linear`` gives for the same seed and device.  SiLU's derivative is ``aten.silu_backward``, the
kernel the unfused module's autograd runs, so fused and unfused gradients agree to the last bit
wherever the products do.  On CUDA with Triton the elementwise part is one pass each way instead
(``triton_swiglu``: h in forward, ∂gate and ∂up together in backward), rounded the same way.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_lora, triton_swiglu
from .lora_linear import _LoraLinear
from .lora_op import seed_tensor


def swiglu_lora_down(
    gate: Tensor,
    up: Tensor,
    weight: Tensor | None,
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
        weight: (d, k) frozen down-projection weight, or None for the low-rank term alone.
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
    if torch.compiler.is_compiling():  # the custom ops: no graph break, whatever the host code does
        need_u = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (gate, up, weight, bias, lora_A, lora_B))
        y, _ = torch.ops.lorakit.swiglu_lora_down_fwd(gate2, up2, weight, bias, lora_A, lora_B, scale, dropout_p,
                                                     seed_tensor(seed), need_u)
    else:  # eager: an autograd.Function, without the custom ops' per-call dispatch cost (see lora_op)
        y = _SwigluLoraDown.apply(gate2, up2, weight, bias, lora_A, lora_B, scale, dropout_p, int(seed),
                                  _use_triton(gate2), torch.is_grad_enabled())
    return y.view(*gate.shape[:-1], y.shape[-1])


_use_triton = triton_lora.use_triton  # module attribute: tests patch it to exercise the route on CPU


def _swiglu(gate: Tensor, up: Tensor, triton: bool = False) -> Tensor:
    """h = silu(gate) ⊙ up, rounded as the unfused module rounds it (silu first, then the product)."""
    return triton_swiglu.swiglu_forward(gate, up) if triton else F.silu(gate).mul_(up)


def _swiglu_backward(grad_h: Tensor, gate: Tensor, up: Tensor, triton: bool) -> tuple[Tensor, Tensor]:
    """(∂gate, ∂up) from ∂L/∂h; grad_h is ours (fresh from the LoRA backward) and is reused for ∂gate."""
    if triton:
        return triton_swiglu.swiglu_backward(grad_h, gate, up)
    grad_up = grad_h * F.silu(gate)
    return torch.ops.aten.silu_backward(grad_h.mul_(up), gate), grad_up  # the kernel unfused autograd runs


def _forward(gate: Tensor, up: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor, B: Tensor,
             scale: float, p: float, seed: int, need_u: bool, triton: bool) -> tuple[Tensor, Tensor]:
    """(y, u) for gate, up: (N, k); u = drop(h) Aᵀ as the LoRA route returns it ((0, r) if not need_u)."""
    h = _swiglu(gate, up, triton)
    if triton:
        return triton_lora.lora_forward(h, weight, bias, A, B, scale, p, seed, need_u)[:2]
    ctx = SimpleNamespace()  # the reference forward, called as autograd would, to reuse its arithmetic
    ctx.save_for_backward = lambda *ts: setattr(ctx, "saved", ts)
    y = _LoraLinear.forward(ctx, h, weight, bias, A, B, scale, p, seed)
    return y, (ctx.saved[-1] if need_u else h.new_empty((0, A.shape[0])))  # saved: (h, weight, A, B, u)


def _backward(g: Tensor, gate: Tensor, up: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, u: Tensor,
              scale: float, p: float, seed: int, need_in: bool, need_w: bool, need_A: bool, need_B: bool,
              triton: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(∂gate, ∂up, ∂W, ∂A, ∂B) for g = ∂L/∂y: (N, d); None where not needed. h is recomputed here."""
    h = _swiglu(gate, up, triton)
    if triton:
        grad_h, grad_A, grad_B = triton_lora.lora_backward(g, h, weight, A, B, u, scale, p, seed, need_in, need_A,
                                                           need_B)
        grad_w = (g.t() @ h).to(weight.dtype) if need_w else None  # only when a caller unfroze the base
    else:
        ctx = SimpleNamespace(saved_tensors=(h, weight, A, B, u), scale=scale, p=p, seed=seed, has_bias=False,
                              needs_input_grad=(need_in, need_w, False, need_A, need_B, False, False, False))
        grad_h, grad_w, _, grad_A, grad_B, *_ = _LoraLinear.backward(ctx, g)
    del h  # before the (N, k) gradients below are allocated
    grad_gate = grad_up = None
    if need_in:
        grad_gate, grad_up = _swiglu_backward(grad_h, gate, up, triton)
    return grad_gate, grad_up, grad_w, grad_A, grad_B


class _SwigluLoraDown(torch.autograd.Function):
    """The eager route (CPU reference arithmetic, or Triton on CUDA); saves gate, up, W, A, B and u."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, A, B, scale, p, seed, triton, grad_enabled):  # type: ignore[override]
        need_u = grad_enabled and any(ctx.needs_input_grad[:6])  # (see lora_op._TritonLoraLinear)
        y, u = _forward(gate, up, weight, bias, A, B, scale, p, seed, need_u, triton)
        ctx.save_for_backward(gate, up, weight, A, B, u)
        ctx.scale, ctx.p, ctx.seed, ctx.triton, ctx.has_bias = scale, p, seed, triton, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        gate, up, weight, A, B, u = ctx.saved_tensors
        need_gate, need_up, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        g = grad_y.contiguous()
        grad_gate, grad_up, grad_w, grad_A, grad_B = _backward(
            g, gate, up, weight, A, B, u, ctx.scale, ctx.p, ctx.seed, need_gate or need_up, need_w, need_A, need_B,
            ctx.triton)
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        return grad_gate, grad_up, grad_w, grad_b, grad_A, grad_B, None, None, None, None, None


# --- torch.compile: the same functions as custom ops (see lora_op.py for why ops and not the Function) -----
@torch.library.custom_op("lorakit::swiglu_lora_down_fwd", mutates_args=())
def _fwd_op(gate: Tensor, up: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
            p: float, seed: Tensor, need_u: bool) -> tuple[Tensor, Tensor]:
    return _forward(gate, up, weight, bias, A, B, scale, p, int(seed), need_u, _use_triton(gate))


@_fwd_op.register_fake
def _(gate, up, weight, bias, A, B, scale, p, seed, need_u):
    d = (weight if weight is not None else B).shape[0]
    return gate.new_empty((gate.shape[0], d)), gate.new_empty((gate.shape[0] if need_u else 0, A.shape[0]))


@torch.library.custom_op("lorakit::swiglu_lora_down_bwd", mutates_args=())
def _bwd_op(g: Tensor, gate: Tensor, up: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, u: Tensor,
            scale: float, p: float, seed: Tensor, need_in: bool, need_A: bool, need_B: bool,
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_gate, grad_up, _, grad_A, grad_B = _backward(g, gate, up, weight, A, B, u, scale, p, int(seed), need_in, False,
                                                      need_A, need_B, _use_triton(gate))
    # A custom op cannot return None: a fresh empty tensor per output (one shared placeholder would make the
    # outputs alias each other); results contiguous, as the fake impl promises.
    return tuple(g.new_empty(0) if t is None else t.contiguous() for t in (grad_gate, grad_up, grad_A, grad_B))


@_bwd_op.register_fake
def _(g, gate, up, weight, A, B, u, scale, p, seed, need_in, need_A, need_B):
    fresh = lambda t, need: torch.empty_like(t, memory_format=torch.contiguous_format) if need else g.new_empty(0)  # noqa: E731
    return fresh(gate, need_in), fresh(up, need_in), fresh(A, need_A), fresh(B, need_B)


def _setup_context(ctx, inputs, output) -> None:
    gate, up, weight, bias, A, B, scale, p, seed, _need_u = inputs
    ctx.save_for_backward(gate, up, weight, A, B, output[1], seed)
    ctx.scale, ctx.p, ctx.has_bias = scale, p, bias is not None


def _op_backward(ctx, grad_y: Tensor, _grad_u: Tensor):
    gate, up, weight, A, B, u, seed = ctx.saved_tensors
    need_gate, need_up, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
    g = grad_y.contiguous()
    grad_gate, grad_up, grad_A, grad_B = torch.ops.lorakit.swiglu_lora_down_bwd(
        g, gate, up, weight, A, B, u, ctx.scale, ctx.p, seed, need_gate or need_up, need_A, need_B)
    grad_w = (g.t() @ _swiglu(gate, up)).to(weight.dtype) if need_w else None  # only for an unfrozen base
    grad_b = g.sum(0) if need_b and ctx.has_bias else None
    return (grad_gate if need_gate else None, grad_up if need_up else None, grad_w, grad_b,
            grad_A if need_A else None, grad_B if need_B else None, None, None, None, None)


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)
