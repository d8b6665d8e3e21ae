"""Many adapters in one batch: each token goes through its own adapter's low-rank branch.

    h_t = base_t + s_{a(t)} · B_{a(t)} A_{a(t)} x_t        (a(t) = -1: h_t = base_t)

    x: (N, k)   a: (N,) adapter of each token, -1 = base only
    A: (n, R, k)   B: (n, d, R)   s: (n,)   r: (n,) ranks, r_i ≤ R

The n adapters are held as stacked tensors padded to a common rank R; ``ranks`` says how many rows
of A_i / columns of B_i are real, so what lies in the padding never matters (it gets neither a say
in the output nor a gradient).  This is what punica's SGMV and vLLM's shrink/expand kernels do for
serving; here it also trains: the gradient of adapter i only ever sees the tokens with a(t) = i.

Two torch strategies, chosen by a cost estimate (both compute the same function; tests check each):

* ``dense`` — one shrink against every adapter at once, u = x [A_1; …; A_n]ᵀ (N, n·R), a mask keeps
  each token's own R columns (scaled by s and cut at r), and one expand u [B_1 … B_n]ᵀ accumulates
  into the base output.  No gather or scatter of x; costs n× the FLOPs of one adapter's branch,
  which is small next to the base GEMM while n·R ≪ d.
* ``grouped`` — tokens sorted by adapter and packed into an (n, L, k) buffer (L = the largest
  segment), then two ``bmm``.  The FLOPs of one adapter's branch, plus a gather of x and a scatter of
  the result; it wins when n·R grows towards d.

On CUDA the Triton kernels of :mod:`lorakit.ops.triton_segmented` do the forward (SGMV-style: one
program per block of same-adapter tokens, no copy of x).  Kernels are chosen by device, never by the
caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import SegmentError
from .segment_plan import SegmentPlan, column_scales, plan_segments

# What the grouped strategy's gather of x and scatter of h cost per element, in multiply-adds: measured
# on 2 CPU cores (benchmarks/multi_adapter_cpu.py: 8 adapters, N = 512, k = d = 1024, the grouped op
# took ≈ 8× the dense one), so grouped wins only with many adapters of large rank (m·R ≳ 512 + R).
_MOVE_COST = 512.0

def segmented_lora(
    x: Tensor,
    adapter_index: Tensor | SegmentPlan,
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor | Sequence[float],
    ranks: Tensor | Sequence[int] | None = None,
    base: Tensor | None = None,
    inplace: bool = False,
) -> Tensor:
    """h_t = base_t + s_{a(t)} · B_{a(t)} A_{a(t)} x_t for every token t; tokens with a(t) = -1 get base_t.

    Args:
        x: (..., k) input; its leading dimensions are the tokens.
        adapter_index: the adapter of each token, an integer tensor of x's leading shape (or one
            that broadcasts to it, e.g. (batch, 1) for one adapter per sample), or a
            :class:`SegmentPlan` built from such an index for N = x.numel() // k tokens.
        lora_A: (n, R, k) stacked A matrices, zero-padded (or not: see ``ranks``) to rank R.
        lora_B: (n, d, R) stacked B matrices.
        scales: (n,) s_i of each adapter (a tensor: changing it recompiles nothing).
        ranks: (n,) true rank r_i ≤ R of each adapter; rows ≥ r_i of A_i and columns ≥ r_i of B_i
            are ignored. None: all R are used.
        base: (..., d) base output W x + b the update accumulates into; None: zeros.
        inplace: when no gradient is needed and base has x's dtype, accumulate into ``base`` itself
            and return it (saves an (N, d) copy: what a serving layer wants for its fresh output).

    Returns:
        (..., d) in x's dtype. Differentiable in x, lora_A, lora_B and base; adapter i's gradient
        comes only from the tokens assigned to it.
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    n, R, kA = lora_A.shape
    if kA != k:
        raise SegmentError(f"lora_A is (n, R, k) = {tuple(lora_A.shape)} but x has k = {k} features")
    if lora_B.dim() != 3 or lora_B.shape[0] != n or lora_B.shape[2] != R:
        raise SegmentError(f"lora_B must be (n, d, R) = ({n}, d, {R}), got {tuple(lora_B.shape)}")
    d = lora_B.shape[1]
    x2 = x.reshape(-1, k)
    N = x2.shape[0]
    plan, scale_t, rank_t = _prepare(adapter_index, lead, n, scales, ranks, x.device)
    base2 = None
    if base is not None:
        if base.shape[:-1] != lead or base.shape[-1] != d:
            raise SegmentError(f"base must have shape {(*lead, d)}, got {tuple(base.shape)}")
        base2 = base.reshape(-1, d)
    tensors = (x2, lora_A, lora_B) if base2 is None else (x2, lora_A, lora_B, base2)
    inplace = inplace and base2 is not None and base2.dtype == x2.dtype and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    )
    if x2.device.type == "cuda" and N and n:
        from . import triton_segmented

        if triton_segmented.available():
            h = triton_segmented.segmented_lora_triton(x2, plan, lora_A, lora_B, scale_t, rank_t, base2, inplace)
            return h.view(*lead, d)
    h = _torch_segmented(x2, plan, lora_A, lora_B, scale_t, rank_t, base2, strategy=None, inplace=inplace)
    return h.view(*lead, d)


def _prepare(
    adapter_index: Tensor | SegmentPlan,
    lead: torch.Size,
    n: int,
    scales: Tensor | Sequence[float],
    ranks: Tensor | Sequence[int] | None,
    device: torch.device,
) -> tuple[SegmentPlan, Tensor, Tensor | None]:
    """The plan for tokens of leading shape ``lead`` and the scales / ranks as device tensors, checked."""
    N = lead.numel()
    if isinstance(adapter_index, SegmentPlan):
        plan = adapter_index
        if plan.index.numel() != N or plan.n_adapters != n:
            raise SegmentError(
                f"the SegmentPlan is for {plan.index.numel()} tokens and {plan.n_adapters} adapters; "
                f"the input has {N} tokens and the stacks {n} adapters"
            )
    else:
        plan = plan_segments(torch.broadcast_to(adapter_index, lead), n)
    # float64 scales stay float64 (a float64 model's s = α/√r is not a float32 number); others are float32
    wide = not isinstance(scales, Tensor) or scales.dtype == torch.float64
    scale_t = torch.as_tensor(scales, dtype=torch.float64 if wide else torch.float32, device=device).reshape(-1)
    rank_t = None if ranks is None else torch.as_tensor(ranks, dtype=torch.int32, device=device).reshape(-1)
    if scale_t.numel() != n or (rank_t is not None and rank_t.numel() != n):
        raise SegmentError(f"scales and ranks must have one entry per adapter ({n})")
    return plan, scale_t, rank_t


def _torch_segmented(
    x2: Tensor,
    plan: SegmentPlan,
    A: Tensor,
    B: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    base2: Tensor | None,
    strategy: str | None,
    inplace: bool = False,
) -> Tensor:
    """The torch reference path (plain autograd ops). strategy: 'dense', 'grouped' or None (by cost);
    inplace: accumulate into base2 (only when the caller checked that no gradient is needed)."""
    N, k = x2.shape
    n, R, _ = A.shape
    d = B.shape[1]
    idx = plan.index.to(x2.device)
    colscale = column_scales(scales, ranks, R).to(x2.dtype)  # (n, R)
    A_, B_ = A.to(x2.dtype), B.to(x2.dtype)
    if x2.device.type == "cpu" and N:  # reading the counts costs a host sync: CPU only
        counts = torch.bincount(idx + 1, minlength=n + 1)[1:]
        present = torch.nonzero(counts).flatten()
        m = present.numel()
        if m < n:  # drop the adapters no token uses: both strategies would compute them for nothing
            remap = torch.full((n + 1,), -1, dtype=idx.dtype)
            remap[present + 1] = torch.arange(m, dtype=idx.dtype)
            idx, n = remap[idx + 1], m
            A_, B_, colscale = A_[present], B_[present], colscale[present]
            plan = SegmentPlan(index=idx, n_adapters=m)
        if strategy is None:
            dense_cost = N * m * R * (k + d)
            grouped_cost = m * int(counts.max()) * R * (k + d) + _MOVE_COST * N * (k + d)
            strategy = "grouped" if grouped_cost < dense_cost else "dense"
    strategy = strategy or "dense"
    if n == 0:  # no token has an adapter
        return x2.new_zeros(N, d) if base2 is None else (base2 if inplace else base2.to(x2.dtype).clone())
    if strategy == "dense":
        # u = x [A_1; …; A_n]ᵀ, then each token keeps its own adapter's columns, scaled.
        u = (x2 @ A_.reshape(n * R, k).t()).view(N, n, R)  # (N, n, R)
        own = torch.nn.functional.one_hot(idx + 1, n + 1)[:, 1:].to(x2.dtype)  # (N, n); -1 → zero row
        return _dense_expand(u * (own.unsqueeze(-1) * colscale), B_, base2, inplace)
    if strategy != "grouped":
        raise SegmentError(f"strategy must be 'dense' or 'grouped', got {strategy!r}")
    # Sort tokens by adapter (base-only ones first, then dropped), pack each segment into a row of
    # an (n, L, k) buffer, two bmm, scatter back.
    idx_sorted, order = torch.sort(idx, stable=True)
    n_base = int((idx_sorted < 0).sum())
    idx_sorted, order = idx_sorted[n_base:], order[n_base:]
    out = base2.to(x2.dtype) if base2 is not None else x2.new_zeros(N, d)
    if not order.numel():
        return out if inplace or base2 is None else out.clone()
    counts = torch.bincount(idx_sorted, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(order.numel(), device=x2.device) - starts[idx_sorted]  # place within its segment
    L = int(counts.max())
    packed = x2.new_zeros(n, L, k)
    packed = packed.index_put((idx_sorted, pos), x2[order])  # (n, L, k)
    u = torch.bmm(packed, A_.transpose(1, 2)) * colscale.unsqueeze(1)  # (n, L, R)
    y = torch.bmm(u, B_.transpose(1, 2))  # (n, L, d)
    return out.index_add_(0, order, y[idx_sorted, pos]) if inplace else out.index_add(0, order, y[idx_sorted, pos])


def _dense_expand(u: Tensor, B: Tensor, base2: Tensor | None, inplace: bool) -> Tensor:
    """base + u [B_1 … B_n]ᵀ for u (N, n, R) already masked to each token's own adapter and scaled."""
    N, n, R = u.shape
    u = u.reshape(N, n * R)
    Bt = B.transpose(1, 2).reshape(n * R, -1)  # [B_1 … B_n]ᵀ: (n·R, d)
    if base2 is None:
        return u @ Bt
    return base2.addmm_(u, Bt) if inplace else torch.addmm(base2.to(u.dtype), u, Bt)


def segmented_lora_embedding(
    ids: Tensor,
    adapter_index: Tensor | SegmentPlan,
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor | Sequence[float],
    ranks: Tensor | Sequence[int] | None = None,
    base: Tensor | None = None,
    padding_idx: int | None = None,
) -> Tensor:
    """The embedding form: h_t = base_t + s_{a(t)} · B_{a(t)} A_{a(t)}[:, id_t]  (a(t) = -1: base_t).

    Args:
        ids: (...) token ids.   adapter_index: as for :func:`segmented_lora`, over ids' shape.
        lora_A: (n, R, V) stacked A (V = number of embeddings).   lora_B: (n, d, R).
        scales / ranks: as for :func:`segmented_lora`.   base: (..., d) the base embedding output.
        padding_idx: an id whose A column gets no gradient (as ``nn.Embedding`` treats it).

    Returns:
        (..., d) in base's dtype (A's without base). Torch ops on every device: one gather of R
        values per token and one expand, cheap next to a model's linear layers.
    """
    lead = ids.shape
    n, R, V = lora_A.shape
    flat = ids.reshape(-1)
    plan, scale_t, rank_t = _prepare(adapter_index, lead, n, scales, ranks, ids.device)
    idx = plan.index.to(ids.device)
    a = idx.clamp(min=0)
    u = lora_A[a, :, flat]  # (N, R): column id_t of the token's own A
    if padding_idx is not None:
        u = torch.where((flat == padding_idx).unsqueeze(-1), u.detach(), u)
    own = (idx >= 0).to(u.dtype).unsqueeze(-1)
    u = u * column_scales(scale_t, rank_t, R).to(u.dtype)[a] * own  # (N, R), zero for base-only tokens
    u_full = u.new_zeros(flat.numel(), n, R).index_put((torch.arange(flat.numel(), device=ids.device), a), u)
    d = lora_B.shape[1]
    base2 = None if base is None else base.reshape(-1, d).to(u.dtype)
    h = _dense_expand(u_full, lora_B.to(u.dtype), base2, inplace=False)
    return h.to(base.dtype if base is not None else h.dtype).view(*lead, d)
