"""``compare_adapters``: do two adapters (say rank 4 and rank 64, same task) learn the same directions?

Per module: the LoRA paper's grid φ(i, j) (see :mod:`lorakit.analysis.subspace`) between the two
updates' singular directions, and two energy shares of the larger-rank update ΔW_L:

    captured = ‖U_Sᵀ ΔW_L‖²_F / ‖ΔW_L‖²_F   its energy inside the small update's r_S directions
    best     = energy_L(r_S)                its energy inside its own top r_S directions (the most
                                            any r_S-dimensional subspace can hold)

Verdicts per module type, from the agreement q = captured / best:

    q ≥ 0.8, best ≥ 0.9   "captured"              the small rank already found what the large one uses
    q ≥ 0.8, best < 0.9   "needs more rank"       same top directions, but the large update spreads further
    q < 0.8               "different directions"  the runs disagree (for random subspaces captured ≈ r_S / n)

Early in training A is still mostly its random initialisation, so the input side (A's row space)
of two short runs looks unrelated; the output side (B, learned from zero) shows the learned part.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .factors import AdapterFactors, AnalysisError, load_factors
from .groups import group_modules
from .spectrum import energy_curve, lowrank_svd
from .subspace import captured_energy, similarity_grid

Side = Literal["input", "output"]
_GOOD = 0.90   # share of the large update's energy that counts as "captured"
_AGREE = 0.80  # captured / best at which two runs count as having found the same directions


@dataclasses.dataclass(frozen=True)
class ModuleComparison:
    """One module of two adapters. ``grid[i-1, j-1]`` = φ(ΔW_a, ΔW_b, i, j)."""

    name: str
    group: str
    family: str
    r_a: int
    r_b: int
    dim: int
    grid: torch.Tensor
    captured: float
    best: float

    @property
    def small_rank(self) -> int:
        return min(self.grid.shape)

    @property
    def large_rank(self) -> int:
        return max(self.grid.shape)

    @property
    def top_direction(self) -> float:
        """φ(1, 1) = cos² of the angle between the two top directions."""
        return float(self.grid[0, 0])

    @property
    def random_level(self) -> float:
        """E φ(i, j) for random subspaces at the full grid: max(i, j) / n."""
        return self.large_rank / self.dim

    @property
    def chance(self) -> float:
        """E captured for a random r_S-dimensional subspace: r_S / n."""
        return self.small_rank / self.dim

    def to_dict(self, grid: bool = False) -> dict[str, Any]:
        out = {"name": self.name, "type": self.group, "r_a": self.r_a, "r_b": self.r_b, "top_direction": self.top_direction,
               "phi_full": float(self.grid[-1, -1]), "captured": self.captured, "best": self.best,
               "captured_by_chance": self.chance, "random_level": self.random_level}
        if grid:
            out["grid"] = self.grid.tolist()
        return out


@dataclasses.dataclass(frozen=True)
class TypeComparison:
    """Mean over a module type; ``grid`` is the mean φ grid (None if the modules' ranks differ)."""

    label: str
    family: str
    modules: tuple[ModuleComparison, ...]

    @property
    def grid(self) -> torch.Tensor | None:
        shapes = {tuple(m.grid.shape) for m in self.modules}
        return torch.stack([m.grid for m in self.modules]).mean(0) if len(shapes) == 1 else None

    @property
    def captured(self) -> float:
        return statistics.fmean(m.captured for m in self.modules)

    @property
    def best(self) -> float:
        return statistics.fmean(m.best for m in self.modules)

    @property
    def verdict(self) -> str:
        """"captured", "needs more rank" or "different directions"."""
        if self.best == 0 or self.captured < _AGREE * self.best:
            return "different directions"
        return "captured" if self.best >= _GOOD else "needs more rank"

    def to_dict(self) -> dict[str, Any]:
        grid = self.grid
        return {"type": self.label, "family": self.family, "modules": len(self.modules), "captured": self.captured,
                "best": self.best, "verdict": self.verdict,
                "top_direction_mean": statistics.fmean(m.top_direction for m in self.modules),
                "grid_mean": grid.tolist() if grid is not None else None}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_adapters`."""

    source_a: str
    source_b: str
    side: Side
    modules: tuple[ModuleComparison, ...]
    types: tuple[TypeComparison, ...]
    notes: tuple[str, ...] = ()

    def conclusions(self) -> list[str]:
        """Plain-words findings, one per verdict, naming the module types."""
        lines = []
        for verdict in ("captured", "needs more rank", "different directions"):
            hits = [t for t in self.types if t.verdict == verdict]
            if not hits:
                continue
            names = "/".join(t.label for t in hits)
            small = min(m.small_rank for t in hits for m in t.modules)
            large = max(m.large_rank for t in hits for m in t.modules)
            cap = statistics.fmean(t.captured for t in hits)
            best = statistics.fmean(t.best for t in hits)
            chance = statistics.fmean(m.chance for t in hits for m in t.modules)
            if verdict == "captured":
                lines.append(f"rank {small} already captures the top directions of rank {large} in {names}: "
                             f"its subspace holds {cap:.1%} of the rank-{large} update's energy (at most {best:.1%} possible).")
            elif verdict == "needs more rank":
                verb = "needs" if len(hits) == 1 else "need"
                lines.append(f"{names} {verb} more than rank {small}: the rank-{large} update keeps only {best:.1%} "
                             f"of its energy in its top {small} directions.")
            else:
                lines.append(f"{names}: the two runs learned different directions — the rank-{small} subspace holds "
                             f"{cap:.1%} of the rank-{large} update's energy where {best:.1%} is possible and a random "
                             f"subspace would hold about {chance:.1%} (short runs, noise, or a different optimum"
                             + ("; the input side of short runs still shows A's random init: try side='output')."
                                if self.side == "input" else ")."))
        return lines

    def to_dict(self, grids: bool = False) -> dict[str, Any]:
        return {"a": self.source_a, "b": self.source_b, "side": self.side, "conclusions": self.conclusions(),
                "types": [t.to_dict() for t in self.types], "modules": [m.to_dict(grids) for m in self.modules],
                "notes": list(self.notes)}


def compare_adapters(
    a: str | Path | Mapping[str, torch.Tensor] | AdapterFactors,
    b: str | Path | Mapping[str, torch.Tensor] | AdapterFactors,
    *,
    side: Side = "input",
) -> Comparison:
    """Subspace similarity between two adapters of the same base model, module by module.

    Args:
        a, b: adapter directories (or PEFT-keyed tensors); typically the same task at two ranks.
        side: "input" compares the right singular vectors of ΔW (directions of x, in A's row
            space; the paper's choice), "output" the left ones (directions of h, B's columns).

    Raises:
        AnalysisError: no module in common, or a module whose ΔW shapes differ.
    """
    if side not in ("input", "output"):
        raise AnalysisError(f"side must be 'input' or 'output', got {side!r}")
    fa, fb = load_factors(a), load_factors(b)
    by_a, by_b = fa.by_name(), fb.by_name()
    common = [name for name in by_a if name in by_b]
    if not common:
        raise AnalysisError(f"{fa.source} and {fb.source} adapt no module in common (e.g. {next(iter(by_a))} vs "
                            f"{next(iter(by_b))}); compare adapters trained on the same model with the same target_modules")
    notes = list(fa.notes) + [n for n in fb.notes if n not in fa.notes]
    only = (len(by_a) - len(common), len(by_b) - len(common))
    if any(only):
        notes.append(f"compared the {len(common)} modules both adapt ({only[0]} only in a, {only[1]} only in b)")
    groups = group_modules(common, [by_a[n].kind for n in common])
    group_of = {name: g for g in groups for name in g.names}
    modules = []
    for name in common:
        ma, mb = by_a[name], by_b[name]
        if ma.shape != mb.shape:
            raise AnalysisError(f"module {name}: ΔW is {ma.shape[0]}×{ma.shape[1]} in {fa.source} but "
                                f"{mb.shape[0]}×{mb.shape[1]} in {fb.source}; the adapters are for different models")
        sa, sb = lowrank_svd(ma.A, ma.B, ma.scale), lowrank_svd(mb.A, mb.B, mb.scale)
        if sa.S.norm() == 0 or sb.S.norm() == 0:
            notes.append(f"module {name}: an update is zero; skipped")
            continue
        # Keep only directions the update uses: σ at the rounding noise of the factors' dtype carries no direction.
        sa, sb = sa.nonzero(), sb.nonzero()
        Ua, Ub = (sa.V, sb.V) if side == "input" else (sa.U, sb.U)
        small, large = (sa, sb) if Ua.shape[1] <= Ub.shape[1] else (sb, sa)
        U_small, U_large = (small.V, large.V) if side == "input" else (small.U, large.U)
        best = float(energy_curve(large.S)[U_small.shape[1] - 1])
        g = group_of[name]
        modules.append(ModuleComparison(name, g.label, g.family, ma.r, mb.r, Ua.shape[0], similarity_grid(Ua, Ub),
                                        captured_energy(U_small, U_large, large.S), best))
    if not modules:
        raise AnalysisError(f"{fa.source} vs {fb.source}: every common module has a zero update; nothing to compare")
    types = tuple(TypeComparison(g.label, g.family, tuple(m for m in modules if m.group == g.label))
                  for g in groups if any(m.group == g.label for m in modules))
    return Comparison(fa.source, fb.source, side, tuple(modules), types, tuple(notes))

