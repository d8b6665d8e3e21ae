"""How much two LoRA updates share directions: the LoRA paper's normalised subspace similarity.

For orthonormal bases U₁: (n, r₁), U₂: (n, r₂) of two updates' top singular directions (columns
in descending σ order), the paper (Hu et al. 2021, §7.2) defines

    φ(U₁, U₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j)   ∈ [0, 1]

1 when the smaller span lies inside the larger; for random subspaces its expectation is
max(i, j) / n (each of the min(i, j) directions has max(i, j)/n of its length in the other span).
The whole grid comes from one product G = U₁ᵀ U₂ (r₁ × r₂) and a 2-D cumulative sum of G².

The paper takes the right singular vectors of A; lorakit uses the singular vectors of ΔW itself
(``side="input"``: right, in the row space of A; ``side="output"``: left, in the column space
of B), so the directions are ordered by how much they change the layer's output, not by the size
of A's entries.
"""

from __future__ import annotations

import torch

from .factors import AnalysisError


def similarity_grid(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """φ(U₁, U₂, i, j) for all i = 1..r₁, j = 1..r₂ as an (r₁, r₂) float64 tensor.

    Args:
        U1: (n, r₁), U2: (n, r₂), orthonormal columns ordered by importance.
    """
    if U1.dim() != 2 or U2.dim() != 2 or U1.shape[0] != U2.shape[0]:
        raise AnalysisError(f"subspace similarity needs bases of one space, (n, r₁) and (n, r₂); "
                            f"got {tuple(U1.shape)} and {tuple(U2.shape)}")
    G2 = (U1.to(torch.float64).T @ U2.to(torch.float64)) ** 2          # (r₁, r₂)
    overlap = G2.cumsum(0).cumsum(1)                                   # ‖U₁ᵢᵀ U₂ⱼ‖²_F at [i-1, j-1]
    i = torch.arange(1, U1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=torch.float64)[None, :]
    return overlap / torch.minimum(i, j)


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int | None = None, j: int | None = None) -> float:
    """φ(U₁, U₂, i, j) for one (i, j); defaults use all columns. Symmetric: φ(U₁,U₂,i,j) = φ(U₂,U₁,j,i)."""
    i = U1.shape[1] if i is None else i
    j = U2.shape[1] if j is None else j
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise AnalysisError(f"subspace similarity: need 1 ≤ i ≤ {U1.shape[1]} and 1 ≤ j ≤ {U2.shape[1]}, got i={i}, j={j}")
    return float(similarity_grid(U1[:, :i], U2[:, :j])[-1, -1])


def captured_energy(U_small: torch.Tensor, U_large: torch.Tensor, S_large: torch.Tensor) -> float:
    """Share of the large update's ‖ΔW‖²_F that lies in span(U_small): ‖U_smallᵀ U_large Σ‖²_F / Σσ².

    Compare with energy(r_small) of the large update itself, the best any r_small-dimensional
    subspace can hold.
    """
    total = float((S_large.to(torch.float64) ** 2).sum())
    if total == 0:
        return 0.0
    projected = (U_small.to(torch.float64).T @ U_large.to(torch.float64)) * S_large.to(torch.float64)[None, :]
    return float((projected**2).sum()) / total
