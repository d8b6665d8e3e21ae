"""Singular values of a LoRA update ΔW = s · B A from its factors, and what they say.

For B: (d, r) and A: (r, k), forming ΔW costs d·k memory and an SVD of it O(d k min(d, k)).
The factors give the same answer in O((d + k) r²):

    B  = Q_B R_B          Q_B: (d, r) orthonormal columns,  R_B: (r, r)
    Aᵀ = Q_A R_A          Q_A: (k, r),                       R_A: (r, r)
    ΔW = s Q_B (R_B R_Aᵀ) Q_Aᵀ,   core C = s R_B R_Aᵀ = U_c Σ V_cᵀ   (r × r)
    ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ    — an SVD of ΔW, since Q_B U_c and Q_A V_c have orthonormal columns.

Measures of how many directions the update really uses, from σ₁ ≥ σ₂ ≥ … ≥ 0:

    energy(m)        = Σ_{i≤m} σᵢ² / Σ σᵢ²            (share of ‖ΔW‖²_F in the top m directions)
    effective rank_e = min{ m : energy(m) ≥ e }       (e = 0.90, 0.95, 0.99)
    stable rank      = ‖ΔW‖²_F / ‖ΔW‖²₂ = Σ σᵢ² / σ₁²  (≤ rank; robust to tiny σ)
"""

from __future__ import annotations

import dataclasses

import torch

ENERGY_LEVELS = (0.90, 0.95, 0.99)
# Energy shares within this of a level count as reaching it: float64 sums of σ² of an exactly
# rank-m update leave ~1e-16 outside the top m directions.
_ENERGY_TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class LowRankSVD:
    """ΔW = U diag(S) Vᵀ with U: (d, m), S: (m,) descending, V: (k, m), m = min(r, d, k).

    ``eps``: the machine epsilon of the factors' dtype (what rounding them left in ΔW)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    eps: float = float(torch.finfo(torch.float64).eps)

    def nonzero(self, rtol: float | None = None) -> LowRankSVD:
        """Only the directions with σ > rtol·σ₁: a rank-deficient update's other singular vectors
        are arbitrary (any basis of the null part), so they carry no information.

        The default rtol = eps · max(d, k), eps of the factors' dtype, is the rank cut-off of
        numpy.linalg.matrix_rank: factors stored in float32 (eps 1.2e-7) put rounding noise at about
        that level of σ₁, which a float64 cut-off would count as directions."""
        if rtol is None:
            rtol = self.eps * max(self.U.shape[0], self.V.shape[0], 1)
        keep = self.S > self.S[0] * rtol if self.S.numel() else self.S > 0
        return LowRankSVD(self.U[:, keep], self.S[keep], self.V[:, keep], self.eps)


def lowrank_svd(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """SVD of ``scale · B @ A`` from the factors, never forming the (d, k) product.

    Args:
        A: (r, k).  B: (d, r).  scale: s.
    Returns:
        U (d, m), S (m,), V (k, m) with m = min(r, d, k); computed in float64; eps of the factors' dtype.
    """
    stored = torch.promote_types(A.dtype, B.dtype)
    eps = float(torch.finfo(stored if stored.is_floating_point else torch.float64).eps)
    A, B = A.to(torch.float64), B.to(torch.float64)
    Q_B, R_B = torch.linalg.qr(B)      # Q_B: (d, min(d, r))   R_B: (min(d, r), r)
    Q_A, R_A = torch.linalg.qr(A.T)    # Q_A: (k, min(k, r))   R_A: (min(k, r), r)
    core = scale * (R_B @ R_A.T)       # (min(d, r), min(k, r))
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    U, V = Q_B @ U_c, Q_A @ Vh_c.T     # (d, m), (k, m)
    return LowRankSVD(U, S, V, eps)


def lowrank_singular_values(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """σ(scale · B A), descending, float64, length min(r, d, k). See :func:`lowrank_svd`."""
    return lowrank_svd(A, B, scale).S


def energy_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """energy(m) for m = 1..len(σ): the share of ‖ΔW‖²_F in the top m directions (all 0 if ΔW = 0)."""
    sq = singular_values.to(torch.float64) ** 2
    total = sq.sum()
    if total == 0:
        return torch.zeros_like(sq)
    return torch.cumsum(sq, 0) / total


def effective_rank(singular_values: torch.Tensor, energy: float = 0.95) -> int:
    """The fewest top directions holding ≥ ``energy`` of ‖ΔW‖²_F; 0 for a zero update."""
    curve = energy_curve(singular_values)
    if curve.numel() == 0 or curve[-1] == 0:
        return 0
    return int((curve < energy - _ENERGY_TOL).sum().item()) + 1


def stable_rank(singular_values: torch.Tensor) -> float:
    """‖ΔW‖²_F / ‖ΔW‖²₂ = Σσ² / σ₁²; 0 for a zero update."""
    s = singular_values.to(torch.float64)
    if s.numel() == 0 or s[0] == 0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)
