"""NF4 dequantisation on any device, and the frozen weight as a dense tensor for ops that take either kind.

Below both the NF4 linear (``ops.nf4``) and the custom ops that compiled code runs (``ops.custom_ops``), which
both dequantise: the format itself is ``ops.nf4_format``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .nf4_format import NF4Tensors, dequantize_nf4_reference


def dequantize_nf4(t: NF4Tensors, dtype: torch.dtype = torch.float32) -> Tensor:
    """Ŵ (d, k) in ``dtype``: a Triton kernel for CUDA tensors, :func:`dequantize_nf4_reference` elsewhere."""
    if t.packed.is_cuda:
        from . import triton_nf4

        if triton_nf4.available():
            return triton_nf4.dequantize(t, dtype)
    return dequantize_nf4_reference(t, dtype)


def dense_weight(weight: Tensor | NF4Tensors, dtype: torch.dtype) -> Tensor:
    """A frozen weight as a tensor: an NF4 weight dequantised into a new ``dtype`` tensor, any other returned
    as it is (the LoRA backends cast it).  Ops that take either (the shared-input group, the fused SwiGLU
    down-projection) call this where they use the weight and drop the result at once, so an NF4 weight is
    never kept dense between forward and backward."""
    return dequantize_nf4(weight, dtype) if isinstance(weight, NF4Tensors) else weight
