"""A token → adapter assignment for mixed-adapter batches, shared by the torch and Triton segmented ops.

Its own module because both ``segmented`` (the op and its torch path) and ``triton_segmented`` (the
kernels) need it: neither imports the other for it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import SegmentError


@dataclasses.dataclass
class SegmentPlan:
    """A token → adapter assignment, prepared once and reused by every layer of a forward.

    All layers of a model see the same token layout, so the sort and the Triton block table are
    computed once per forward, not once per layer.  Build it with :func:`plan_segments`.

    Attributes:
        index: (N,) int64 adapter of each token, -1 = base only.
        n_adapters: n, the number of stacked adapters the index refers to.
    """

    index: Tensor
    n_adapters: int
    _tables: dict[int, tuple[Tensor, ...]] = dataclasses.field(default_factory=dict, repr=False)

    def block_table(self, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(order, blk_adapter, blk_start, blk_end) for blocks of ≤ block_m same-adapter tokens.

        order: (N,) int32 token ids sorted by adapter (base-only tokens last, never visited);
        block b covers sorted positions [blk_start[b], blk_end[b]) of adapter blk_adapter[b]
        (-1: an unused block). Computed on the device without a host sync, for a fixed grid of
        ⌊N / block_m⌋ + n blocks, an upper bound of Σ_i ⌈N_i / block_m⌉.
        """
        if block_m not in self._tables:
            self._tables[block_m] = _block_table(self.index, self.n_adapters, block_m)
        return self._tables[block_m]  # type: ignore[return-value]


def plan_segments(adapter_index: Tensor, n_adapters: int) -> SegmentPlan:
    """Validate a token → adapter assignment and wrap it for reuse across layers.

    Args:
        adapter_index: integer tensor of any shape (flattened in row-major order to the tokens
            of x); values in [-1, n_adapters).
        n_adapters: how many adapters the stacks hold.
    """
    if adapter_index.dtype.is_floating_point or adapter_index.dtype == torch.bool:
        raise SegmentError(f"adapter_index must be an integer tensor, got {adapter_index.dtype}")
    index = adapter_index.reshape(-1).to(torch.int64)
    if index.device.type == "cpu" and index.numel():  # on a GPU this check would cost a host sync
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= n_adapters:
            raise SegmentError(
                f"adapter_index values must lie in [-1, {n_adapters}) (-1 = base only), got [{lo}, {hi}]"
            )
    return SegmentPlan(index=index, n_adapters=int(n_adapters))


def column_scales(scales: Tensor, ranks: Tensor | None, R: int) -> Tensor:
    """(n, R) factor for each rank column: s_i where j < r_i, else 0 (the padding)."""
    col = scales.reshape(-1, 1).expand(-1, R)
    if ranks is None:
        return col
    keep = torch.arange(R, device=scales.device).reshape(1, R) < ranks.reshape(-1, 1).to(scales.device)
    return col * keep


def _block_table(index: Tensor, n: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    N = index.numel()
    key = torch.where(index >= 0, index, torch.full_like(index, n))  # base-only tokens sort last
    order = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.bincount(key, minlength=n + 1)[:n]
    seg_start = torch.cumsum(counts, 0) - counts
    nblk = (counts + block_m - 1) // block_m
    blk_cum = torch.cumsum(nblk, 0)
    b = torch.arange(N // block_m + n, device=index.device)
    a = torch.searchsorted(blk_cum, b, right=True)  # adapter owning block b (n: unused block)
    a_c = a.clamp(max=n - 1)
    j = b - (blk_cum[a_c] - nblk[a_c])
    blk_start = seg_start[a_c] + j * block_m
    blk_end = seg_start[a_c] + counts[a_c]
    blk_adapter = torch.where(a < n, a, torch.full_like(a, -1))
    i32 = torch.int32
    return order, blk_adapter.to(i32), blk_start.to(i32), blk_end.to(i32)
