"""ΔW = s·BA, once: in the layout of the base weight it is added to (the merge math).

(Named for what it computes: ``lorakit.merge`` is the model-level operation in ``adapters.py``, and
``combine.py`` makes a new adapter out of several.)

One pure function, :func:`delta_weight`, serves forward-free merging, unmerging, merge-and-unload
and state-dict merging; the module-level operations live in ``adapters.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .errors import MergeError

#: How a layer's base weight relates to the (d, k) matrix W of the seed equation.
Layout = Literal["linear", "transposed", "embedding", "conv"]


def delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float, layout: Layout, weight_shape: torch.Size) -> Tensor:
    """s · B A, shaped like the base weight, computed in float32 (float64 stays float64).

    Args:
        lora_A: (r, k).  lora_B: (d, r).
        layout: "linear" — weight is (d, k); "transposed" — weight is (k, d) (transformers'
            Conv1D, PEFT's fan_in_fan_out); "embedding" — weight is (num_embeddings, dim) = (k, d);
            "conv" — weight is (d, in, kh, kw) with k = in·kh·kw.
        weight_shape: the base weight's shape, used for the conv reshape and checked.
    """
    dtype = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scale  # (d, k)
    if layout in ("transposed", "embedding"):
        delta = delta.t()
    elif layout == "conv":
        delta = delta.reshape(weight_shape)
    if delta.shape != weight_shape:
        raise MergeError(f"ΔW has shape {tuple(delta.shape)} but the base weight is {tuple(weight_shape)}")
    return delta


def add_delta(weight: Tensor, delta: Tensor, sign: int = 1, *, what: str = "weight") -> None:
    """weight ← weight ± delta in place, accumulated in float32; refuses to write non-finite values."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    new = weight.detach().to(acc) + sign * delta.to(device=weight.device, dtype=acc)
    if not torch.isfinite(new).all():
        raise MergeError(f"merging into {what} would produce non-finite values; the weight was left unchanged")
    with torch.no_grad():
        weight.copy_(new)
