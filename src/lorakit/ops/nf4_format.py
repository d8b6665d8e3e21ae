"""The NF4 format (4-bit NormalFloat, QLoRA): code books, packing, quantisation and the reference dequantisation.

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

Plain torch only: the Triton kernels (``triton_nf4``) and the linear over NF4 weights (``nf4``) build on it.
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


def bits_per_weight(t: NF4Tensors) -> float:
    """Stored bits per weight, every buffer counted."""
    size = sum(x.numel() * x.element_size() for x in (t.packed, t.absmax, t.nested_absmax, t.offset))
    return 8.0 * size / t.numel
