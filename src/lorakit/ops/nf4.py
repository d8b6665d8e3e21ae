"""NF4 (4-bit NormalFloat, QLoRA) weights: quantisation, dequantisation and the linear over them.

The format is bitsandbytes' ``quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)``,
bit for bit, so checkpoints move between the two:

    W (d, k) is read row-major as w[0 .. n-1] and cut into blocks of 64.  Block b has
    m_b = max |w| over the block;  w_i ≈ c[q_i] · m_b,   q_i = argmin_j |w_i / m_b - c_j| (ties: the lower j),
    c = the 16 NF4 values (:data:`NF4_VALUES`).  Two codes share a byte, the first in the high nibble.
    Double quantisation: μ = mean(m), and m_b - μ is itself block-quantised, 256 per block, to 8-bit
    indices into bitsandbytes' signed dynamic map e (:func:`dynamic_map`) with a float32 absmax M_B each:
    m̂_b = e[a_b] · M_{b // 256} + μ.  That 8-bit step picks the index the way bitsandbytes' CPU kernel
    does — through a 65536-entry table of [-1, 1] (see :func:`_blockwise8`), which differs from the
    nearest code for values within ~2⁻¹⁶ of a midpoint — so the indices match it bit for bit.
    Dequantised: ŵ_i = (c[q_i] · m̂_{i // 64}) rounded to the dtype (each product rounded on its own:
    no fused multiply-add, as in bitsandbytes).

Storage per weight: 4 bits + 8/64 (a_b) + 32/16384 (M_B) + a float (μ) per matrix ≈ 4.127 bits.

The linear ``h = x Ŵᵀ + b + s · drop(x) Aᵀ Bᵀ`` keeps the packed weight for backward, never Ŵ: backward
dequantises again (∂L/∂x = g Ŵ + ...), so a layer's activation memory is that of the bf16 LoRA linear
and the base costs 4.13 bits a weight.  On CUDA the dequantisation is a Triton kernel
(``ops.triton_nf4``) feeding cuBLAS — with the update folded in (Ŵ + s·B A) where the LoRA pieces run on
``triton_lora`` — and up to ``GEMV_MAX_TOKENS`` tokens without autograd (decode) use a fused
dequantise-GEMV instead.  The LoRA pieces follow ``backends.backend_for`` like a bf16 base, so a dropout
seed names the same mask on either base.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

BLOCK = 64  # weights per absmax
NESTED_BLOCK = 256  # absmaxes per second-level absmax

#: bitsandbytes' NF4 code book (``get_4bit_type("nf4")``, from ``create_normal_map(0.9677083)``), float32.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def _dynamic_values() -> list[float]:
    """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``, same arithmetic."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return data


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    code = torch.tensor(NF4_VALUES, dtype=torch.float32)
    dyn = torch.tensor(_dynamic_values(), dtype=torch.float32)
    return code.to(device), ((code[:-1] + code[1:]) / 2).to(device), dyn.to(device)


def nf4_map(device: torch.device | str = "cpu") -> Tensor:
    """The 16 NF4 values c (float32), as bitsandbytes stores them in ``weight.quant_map``."""
    return _tables(torch.device(device))[0]


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' 256-value signed dynamic map e (float32): the nested absmaxes' code (``nested_quant_map``)."""
    return _tables(torch.device(device))[2]


@dataclasses.dataclass(frozen=True)
class NF4Tensors:
    """A quantised (d, k) weight as plain tensors (on one device).

    packed: uint8 (⌈n/2⌉,), two codes a byte, first in the high nibble.  absmax: uint8 (⌈n/64⌉,) — a_b.
    nested_absmax: float32 (⌈n/16384⌉,) — M_B.  offset: float32 (1,) — μ.  shape: (d, k).
    """

    packed: Tensor
    absmax: Tensor
    nested_absmax: Tensor
    offset: Tensor
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _blockwise(flat: Tensor, block: int, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """(codes int64 (n,), absmax float32 (⌈n/block⌉,)): the nearest code (ties to the lower one) of each
    w / m_b — bitsandbytes' 4-bit quantiser, on float32 values."""
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)  # zero padding keeps each max |w|
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).view(-1)[:n]
    return torch.bucketize(scaled, bounds, out_int32=True), absmax  # int32: half the memory of int64


_LUT_SIZE = 65536


@functools.lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> Tensor:
    """Entry i: the index of the code nearest to -1 + 2i/65535 (float32 arithmetic, as bitsandbytes builds it)."""
    dyn = dynamic_map("cpu")
    mids = 0.5 * (dyn[:-1] + dyn[1:])
    val = (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1) + (-1.0)
    return torch.searchsorted(mids, val, side="left").to(device)


def _blockwise8(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(indices into the dynamic map, absmax): bitsandbytes' CPU ``quantize_blockwise``.  A value v is
    scaled, v' = v · (1/M_B), then rounded to a table cell, i = ⌊(v' + 1) · ½ · 65535 + ½⌋, whose entry
    is the code nearest to the cell's centre."""
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # an all-zero block gets index 0
    v = torch.clamp(blocks * inv[:, None], -1, 1)
    cell = ((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).long()
    idx = _dynamic_lut(flat.device)[cell]
    idx = torch.where((absmax > 0)[:, None], idx, torch.zeros_like(idx))
    return idx.view(-1)[:n], absmax


@torch.no_grad()
def quantize_nf4(weight: Tensor) -> NF4Tensors:
    """NF4 with double quantisation of a 2-d weight, on its device (the module docstring has the equations)."""
    d, k = weight.shape
    bounds = _tables(weight.device)[1]
    flat = weight.detach().reshape(-1).float()
    q, absmax = _blockwise(flat, BLOCK, bounds)
    del flat
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q8 = q.to(torch.uint8)
    del q
    packed = (q8[0::2] << 4) | q8[1::2]
    offset = absmax.mean()
    a, nested = _blockwise8(absmax - offset, NESTED_BLOCK)
    return NF4Tensors(packed.contiguous(), a.to(torch.uint8), nested, offset.reshape(1), (d, k))


def absmax_of(t: NF4Tensors) -> Tensor:
    """m̂ (float32, one per block of 64): e[a_b] · M_{b // 256} + μ."""
    dyn = dynamic_map(t.absmax.device)
    n = t.absmax.numel()
    scales = t.nested_absmax.repeat_interleave(NESTED_BLOCK)[:n]
    return dyn[t.absmax.long()] * scales + t.offset


def dequantize_nf4_reference(t: NF4Tensors, dtype: torch.dtype = torch.float32) -> Tensor:
    """Ŵ (d, k) in ``dtype``, in plain torch: the reference the kernels are tested against."""
    code = nf4_map(t.packed.device)
    q = torch.stack((t.packed >> 4, t.packed & 0xF), dim=1).view(-1)[: t.numel].long()
    m = absmax_of(t).repeat_interleave(BLOCK)[: t.numel]
    return (code[q] * m).to(dtype).view(t.shape)


def dequantize_nf4(t: NF4Tensors, dtype: torch.dtype = torch.float32) -> Tensor:
    """Ŵ (d, k) in ``dtype``: a Triton kernel for CUDA tensors, :func:`dequantize_nf4_reference` elsewhere."""
    if t.packed.is_cuda:
        from . import triton_nf4

        if triton_nf4.available():
            return triton_nf4.dequantize(t, dtype)
    return dequantize_nf4_reference(t, dtype)


def bits_per_weight(t: NF4Tensors) -> float:
    """Stored bits per weight, every buffer counted."""
    size = sum(x.numel() * x.element_size() for x in (t.packed, t.absmax, t.nested_absmax, t.offset))
    return 8.0 * size / t.numel


# -- the linear ---------------------------------------------------------------------------------------

# Up to this many tokens the CUDA forward without autograd multiplies straight from the packed weight
# (one pass over 4.13 bits a weight) instead of dequantising to bf16 for cuBLAS (a write and a read of
# 16 bits a weight more): decode and small batches are bound by reading the weight.
GEMV_MAX_TOKENS = 16


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


# Runs eagerly under torch.compile (a graph break).  torch._disable_dynamo is torch.compiler.disable that
# imports Dynamo on the first call instead of at decoration: importing it costs seconds, and `import lorakit`
# must not pay that.
@torch._disable_dynamo
def nf4_lora_linear(x: Tensor, t: NF4Tensors, bias: Tensor | None, lora_A: Tensor | None = None,
                    lora_B: Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                    seed: int | Tensor = 0) -> Tensor:
    """h = x Ŵᵀ + b + s · drop(x) Aᵀ Bᵀ over the last dimension of x, with Ŵ the NF4 weight ``t`` dequantised.

    Args:
        x: (..., k).  t: the (d, k) weight.  bias: (d,) or None.
        lora_A: (r, k) and lora_B: (d, r), or both None for the base alone.  scale: s.
        dropout_p, seed: as in :func:`lorakit.ops.lora_linear` (the same masks).

    Returns (..., d) in x's dtype (under autocast, the autocast dtype).  Ŵ gets no gradient and is not
    kept for backward; gradients flow to x, b, A and B.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return nf4_lora_linear(x.to(dtype), t, bias, lora_A, lora_B, scale, dropout_p, seed)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    needs_grad = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, bias, lora_A, lora_B))
    if not needs_grad and x2.is_cuda and x2.shape[0] <= GEMV_MAX_TOKENS and (lora_A is None or not dropout_p) \
            and _triton_ok():
        from . import triton_nf4

        h = triton_nf4.gemv(x2, t, bias, lora_A, lora_B, float(scale))
    else:
        from .backends import backend_for
        from . import triton_lora

        h = _NF4LoraLinear.apply(x2, t, bias, lora_A, lora_B, float(scale), float(dropout_p), int(seed),
                                 _triton_ok() and backend_for(x2) is triton_lora)
    return h.view(*x.shape[:-1], h.shape[-1])
