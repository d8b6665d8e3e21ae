"""Dropout masks that are regenerated from a seed instead of being stored.

The low-rank branch applies dropout to its input x.  Storing the mask (or the dropped-out copy of
x, as PEFT does) costs memory proportional to x; instead, forward and backward both call
:func:`dropped_positions` with the same seed and get the same mask back.

The mask is produced *sparsely*: the positions of dropped elements of an i.i.d. Bernoulli(p)
mask over ``numel`` elements are the partial sums of i.i.d. geometric gaps.  Drawing only
≈ p·numel gaps costs O(p·numel) random numbers instead of O(numel) — at p = 0.05 twenty times
fewer — and lets the LoRA function correct its dense low-rank products at just those positions.
"""

from __future__ import annotations

import math

import torch


def dropped_positions(numel: int, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices (int32 below 2³¹ elements, else int64; sorted, unique) of the elements a Bernoulli(p) dropout zeroes.

    Deterministic in (numel, p, seed, device type): calling it again returns the same tensor.
    Each element is dropped independently with probability p.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    inv_log_keep = 1.0 / math.log1p(-p)
    index_dtype = torch.int32 if numel < 2**31 - 2**20 else torch.int64
    mean = numel * p
    chunk = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 64)
    pieces: list[torch.Tensor] = []
    last = -1
    while True:
        # Gap to the next dropped element: Geometric(p) on {1, 2, ...} = 1 + floor(log(1 - U) / log(1-p)),
        # computed in place in the one buffer torch.rand returns (each temporary of ~p·numel floats costs
        # a fresh allocation, which measured slower than the arithmetic); float32 is plenty for the gap law.
        gaps = torch.rand(chunk, device=device, generator=gen).neg_().log1p_().mul_(inv_log_keep).floor_()
        positions = torch.cumsum(gaps.to(index_dtype).add_(1), 0, dtype=index_dtype).add_(last)
        pieces.append(positions)
        last = int(positions[-1])  # one host sync per chunk; almost always a single chunk
        if last >= numel:
            break
    positions = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return positions[: int(torch.searchsorted(positions, numel))]
