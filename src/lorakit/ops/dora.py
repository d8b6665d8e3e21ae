"""DoRA, weight-decomposed LoRA (Liu et al. 2024), as HF PEFT computes it.

    W' = m ⊙ (W + s·B A) / n,    n = ‖W + s·B A‖ per output row (d,), detached from the graph
    h  = x W'ᵀ + b = f ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b,   f = m / n          x: (N, k)  W: (d, k)  m, n: (d,)

With dropout on the branch (training), PEFT's formula — and the DoRA authors' — routes only the dropped
input x̃ = drop(x) through the decomposed weight and the rest through W:

    h = (x − x̃) Wᵀ + f ⊙ (x̃ Wᵀ + s · x̃ Aᵀ Bᵀ) + b

which costs a second product with W, in PEFT as here.  The norm n is treated as a constant (DoRA §4.3):
no gradient flows through it.  Backward, with g = ∂L/∂h and y = x̃ (W + sBA)ᵀ (x̃ = x without dropout):

    ∂L/∂m = Σ_rows (g ⊙ y) / n                        (d,)
    ∂L/∂B = s · (g ⊙ f)ᵀ u,    u = x̃ Aᵀ                (d, r)
    ∂L/∂A = s · ((g ⊙ f) B)ᵀ x̃                          (r, k)
    ∂L/∂x = g W + drop'[(g ⊙ (f − 1)) W + s (g ⊙ f) B A]   (without dropout: (g ⊙ f) W + s (g ⊙ f) B A)

Memory: without dropout the function keeps what LoRA keeps — x and the (N, r) product u — and backward
recomputes y = x Wᵀ + s·u Bᵀ for ∂L/∂m (one more product with W).  It does not keep its output h to
recover y = (h − b) / f: later kernels may overwrite a layer's output in place without autograd seeing
it (liger-kernel's RoPE rotates q and k in place; its SwiGLU backward writes its gradients into gate's
and up's outputs), which would silently corrupt ∂m.  With dropout it keeps y (its own tensor).

The norm never materialises W + sBA on the CPU path: row-wise

    ‖W + sBA‖² = ‖W‖² + 2s · rowdot(W A ᵀ, B) + s² · rowdot(B (A Aᵀ), B)

which needs only the (d, r) product W Aᵀ and the (r, r) Gram matrix A Aᵀ, in float32 (float64 for float64
inputs) whatever W's dtype.  The CUDA path (``triton_dora``) forms the rows of W + sBA tile by tile in
float32 instead, which also avoids the expansion's cancellation, and writes f ⊙ (W + sBA) in the same pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import TRITON_MIN_ROWS
from .dropout import dropped_positions


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.no_grad()
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                     weight_sq: Tensor | None = None) -> Tensor:
    """n = ‖W + s·B A‖ over each row, without forming W + s·B A (see the module docstring).

    Args:
        weight: (d, k) (any strides; a conv weight flattened to (d, in·kh·kw)).
        lora_A: (r, k).   lora_B: (d, r).   scale: s.
        weight_sq: ‖W‖² per row (d,) when the caller has it cached (W is frozen).

    Returns:
        (d,) float32 (float64 if any input is float64), no grad.
    """
    acc = _acc_dtype(weight, lora_A, lora_B)
    W, A, B = weight.to(acc), lora_A.to(acc), lora_B.to(acc)
    wsq = weight_sq.to(acc) if weight_sq is not None else row_sq_norm(W)
    cross = (torch.mm(W, A.t()) * B).sum(1)  # rowdot(W, BA) = Σ_r B[j,r] (W Aᵀ)[j,r]
    quad = (torch.mm(B, torch.mm(A, A.t())) * B).sum(1)  # ‖(BA)_j‖² = B_j (A Aᵀ) B_jᵀ
    return (wsq + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min_(0).sqrt_()


@torch.no_grad()
def row_sq_norm(weight: Tensor) -> Tensor:
    """‖W_j‖² for each row of a (d, k) weight, accumulated in float32 (float64 stays float64)."""
    acc = _acc_dtype(weight)
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for lo in range(0, weight.shape[0], 1024):  # row blocks: a float32 copy of W is never made whole
        block = weight[lo:lo + 1024].to(acc)
        out[lo:lo + 1024] = (block * block).sum(1)
    return out


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    magnitude: Tensor,
    weight_norm: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """The DoRA linear (module docstring) over the last dimension of x.

    Args:
        x: (..., k).   weight: (d, k) frozen (a transposed view is fine).   bias: (d,) or None.
        lora_A: (r, k).   lora_B: (d, r).   scale: s.
        magnitude: m, (d,), trainable.
        weight_norm: n = ‖W + s·B A‖ per row, (d,), treated as a constant; None: computed here
            (:func:`dora_weight_norm`, or in the CUDA path's pass over W).
        dropout_p, seed: dropout on the branch's input; the mask is a function of ``seed``.

    Returns:
        (..., d) in x's dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(x.to(dtype), weight, bias, lora_A, lora_B, scale, magnitude, weight_norm,
                               dropout_p, seed)
    # CUDA without dropout: the Triton route (one pass over W for n and W_f, one GEMM).  With n given and
    # few rows (decode), the aten route is cheaper: it never writes W_f, and the GEMV reads W once.
    few_rows = weight_norm is not None and x.numel() < TRITON_MIN_ROWS * x.shape[-1]
    if dropout_p == 0.0 and x.is_cuda and not few_rows and not torch.compiler.is_compiling():
        from . import triton_dora

        if triton_dora.use_triton(x):
            return triton_dora.dora_linear_cuda(x, weight, bias, lora_A, lora_B, float(scale), magnitude,
                                                weight_norm)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scale)
    return _DoraLinear.apply(x, weight, bias, lora_A, lora_B, magnitude, weight_norm.detach(), float(scale),
                             float(dropout_p), int(seed))


def dropped_copy(x2: Tensor, p: float, seed: int) -> Tensor:
    """x̃ = drop(x) = x ⊙ keep / (1 − p) as a new tensor, with the mask :func:`dropped_positions` gives."""
    xt = x2.clone()
    xt.view(-1)[dropped_positions(x2.numel(), p, seed, x2.device)] = 0
    return xt.mul_(1.0 / (1.0 - p))


def magnitude_grad(g: Tensor, y: Tensor, weight_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """∂L/∂m = Σ_rows (g ⊙ y) / n, accumulated in float32 (float64 stays float64)."""
    acc = _acc_dtype(g, weight_norm)
    return (torch.linalg.vecdot(g.t().to(acc), y.t().to(acc)) / weight_norm.to(acc)).to(dtype)


class _DoraLinear(torch.autograd.Function):
    """The reference (CPU, and CUDA-with-dropout) path; see the module docstring for the equations."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, m, n, scale, p, seed):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, k)
        W, A_, B_ = weight.to(x.dtype), A.to(x.dtype), B.to(x.dtype)
        f = (m.detach().to(n.dtype) / n).to(x.dtype)  # (d,)
        if not p:
            h = x2 @ W.t()
            u = x2 @ A_.t()  # (N, r)
            h.addmm_(u, B_.t(), alpha=scale).mul_(f)  # f ⊙ y
            if bias is not None:
                h.add_(bias.to(x.dtype))
            kept = None  # y is recomputed in backward (module docstring)
        else:
            xt = dropped_copy(x2, p, seed)  # x̃ (N, k), freed after forward
            zt = xt @ W.t()  # x̃ Wᵀ
            u = xt @ A_.t()  # x̃ Aᵀ
            del xt
            y = torch.addmm(zt, u, B_.t(), alpha=scale)  # x̃ (W + sBA)ᵀ
            h = torch.addmm(bias.to(x.dtype), x2, W.t()) if bias is not None else x2 @ W.t()
            h.addcmul_(y, f).sub_(zt)
            kept = y
        ctx.save_for_backward(x, weight, bias, A, B, m, n, u, kept)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return h.view(*shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bias, A, B, m, n, u, kept = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d)
        W, A_, B_ = weight.to(x.dtype), A.to(x.dtype), B.to(x.dtype)
        f = (m.to(n.dtype) / n).to(x.dtype)
        grad_x = grad_w = grad_b = grad_A = grad_B = grad_m = None
        if need_m:
            y = kept if p else torch.addmm(x2 @ W.t(), u, B_.t(), alpha=s)  # x̃ (W + sBA)ᵀ
            grad_m = magnitude_grad(g, y, n, m.dtype)
            del y
        gf = g * f  # (N, d): the gradient reaching x̃ (W + sBA)ᵀ
        v = (gf @ B_).mul_(s)  # (N, r)
        if need_B:
            grad_B = (u.t() @ gf).mul_(s).t().to(B.dtype)
        xt = dropped_copy(x2, p, ctx.seed) if p and (need_A or need_x or need_w) else x2
        if need_A:
            grad_A = (v.t() @ xt).to(A.dtype)
        if need_x:
            if p:
                branch = (g * (f - 1)) @ W  # through (f − 1) ⊙ x̃ Wᵀ
                branch.addmm_(v, A_)
                keep = torch.ones_like(x2)
                keep.view(-1)[dropped_positions(x2.numel(), p, ctx.seed, x2.device)] = 0
                grad_x = branch.mul_(keep).mul_(1.0 / (1.0 - p)).addmm_(g, W)
            else:
                grad_x = (gf @ W).addmm_(v, A_)
            grad_x = grad_x.view(x.shape)
        if need_w:
            gw = gf.t() @ x2 if not p else g.t() @ x2 + (g * (f - 1)).t() @ xt
            grad_w = gw.to(weight.dtype)
        if need_b and bias is not None:
            grad_b = g.sum(0).to(bias.dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, grad_m, None, None, None, None
