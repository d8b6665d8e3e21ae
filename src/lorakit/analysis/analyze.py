"""``analyze_adapter``: the spectrum of every module's update ΔW = s·BA, summarised per module type
and per depth — how many directions each part of the model really used.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig
from .base_weights import BaseWeights
from .factors import AdapterFactors, load_factors
from .groups import ModuleGroup, group_modules, module_depth
from .spectrum import ENERGY_LEVELS, effective_rank, energy_curve, lowrank_svd, stable_rank


@dataclasses.dataclass(frozen=True)
class ModuleSpectrum:
    """One module's update, by its singular values σ₁ ≥ … (float64, length min(r, d, k)).

    ``base_norm`` = ‖W‖_F and ``amplification`` = ‖ΔW‖_F / ‖Uᵀ W V‖_F (the LoRA paper's measure of
    how strongly ΔW amplifies directions W under-uses; U, V = ΔW's singular vectors) are set when
    the base model was given.
    """

    name: str
    kind: str
    group: str
    depth: int | None
    r: int
    shape: tuple[int, int]
    alpha: float | None
    scale: float
    num_parameters: int
    singular_values: tuple[float, ...]
    base_norm: float | None = None
    amplification: float | None = None

    @property
    def sigma(self) -> torch.Tensor:
        return torch.tensor(self.singular_values, dtype=torch.float64)

    @property
    def norm(self) -> float:
        """‖ΔW‖_F = √Σσ²."""
        return math.sqrt(sum(s * s for s in self.singular_values))

    @property
    def spectral_norm(self) -> float:
        """‖ΔW‖₂ = σ₁."""
        return self.singular_values[0] if self.singular_values else 0.0

    @property
    def is_zero(self) -> bool:
        return self.norm == 0.0

    def effective_rank(self, energy: float = 0.95) -> int:
        return effective_rank(self.sigma, energy)

    def energy(self, m: int) -> float:
        """Share of ‖ΔW‖²_F in the top m directions."""
        curve = energy_curve(self.sigma)
        return float(curve[min(m, curve.numel()) - 1]) if m >= 1 and curve.numel() else 0.0

    @property
    def stable_rank(self) -> float:
        return stable_rank(self.sigma)

    @property
    def relative_norm(self) -> float | None:
        """‖ΔW‖_F / ‖W‖_F (None without the base model)."""
        return None if not self.base_norm else self.norm / self.base_norm

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "type": self.group, "depth": self.depth, "r": self.r,
            "shape": list(self.shape), "alpha": self.alpha, "scale": self.scale, "num_parameters": self.num_parameters,
            "norm": self.norm, "spectral_norm": self.spectral_norm, "stable_rank": self.stable_rank,
            "effective_rank": {f"{e:.2f}": self.effective_rank(e) for e in ENERGY_LEVELS},
            "base_norm": self.base_norm, "relative_norm": self.relative_norm, "amplification": self.amplification,
            "singular_values": list(self.singular_values),
        }


@dataclasses.dataclass(frozen=True)
class GroupSummary:
    """The modules of one type (e.g. every q_proj): how many directions the type needs."""

    group: ModuleGroup
    modules: tuple[ModuleSpectrum, ...]

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({m.r for m in self.modules}))

    def effective_rank(self, energy: float = 0.95, how: str = "max") -> float:
        """Max (or median) over the type's modules of their effective rank."""
        values = [m.effective_rank(energy) for m in self.modules]
        return max(values) if how == "max" else statistics.median(values)

    @property
    def stable_rank(self) -> float:
        return statistics.fmean(m.stable_rank for m in self.modules)

    @property
    def mean_norm(self) -> float:
        return statistics.fmean(m.norm for m in self.modules)

    @property
    def relative_norm(self) -> float | None:
        values = [m.relative_norm for m in self.modules if m.relative_norm is not None]
        return statistics.fmean(values) if values else None

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(sorted({m.scale for m in self.modules}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.label, "pattern": self.group.pattern, "family": self.group.family, "modules": len(self.modules),
            "r": list(self.ranks), "scale": list(self.scales), "stable_rank_mean": self.stable_rank,
            "effective_rank_max": {f"{e:.2f}": self.effective_rank(e) for e in ENERGY_LEVELS},
            "effective_rank_median": {f"{e:.2f}": self.effective_rank(e, "median") for e in ENERGY_LEVELS},
            "norm_mean": self.mean_norm, "relative_norm_mean": self.relative_norm,
        }


@dataclasses.dataclass(frozen=True)
class AdapterAnalysis:
    """The result of :func:`analyze_adapter`: per module, per type, per depth."""

    source: str
    config: LoraConfig | None
    modules: tuple[ModuleSpectrum, ...]
    groups: tuple[GroupSummary, ...]
    notes: tuple[str, ...] = ()

    def by_depth(self) -> dict[int | None, tuple[ModuleSpectrum, ...]]:
        out: dict[int | None, list[ModuleSpectrum]] = {}
        for m in self.modules:
            out.setdefault(m.depth, []).append(m)
        return {d: tuple(ms) for d, ms in out.items()}

    @property
    def num_parameters(self) -> int:
        return sum(m.num_parameters for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "config": self.config.to_peft_dict() if self.config is not None else None,
            "num_parameters": self.num_parameters,
            "types": [g.to_dict() for g in self.groups],
            "modules": [m.to_dict() for m in self.modules],
            "notes": list(self.notes),
        }


def analyze_adapter(
    source: str | Path | Mapping[str, torch.Tensor] | AdapterFactors,
    base: str | Path | None = None,
    *,
    config: LoraConfig | None = None,
) -> AdapterAnalysis:
    """The singular values of every module's ΔW = s·BA and what they imply.

    Args:
        source: an adapter directory, or PEFT-keyed tensors (``config`` then gives the scales).
        base: the base model's directory (safetensors); adds ‖W‖_F, ‖ΔW‖_F/‖W‖_F and the
            amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F per module.
        config: overrides the adapter's own config.

    Cost: O((d + k) r²) per module from the factors (see :mod:`lorakit.analysis.spectrum`), plus
    one W V product per module with ``base``.
    """
    factors = load_factors(source, config=config)
    groups = group_modules([f.name for f in factors], [f.kind for f in factors])
    label_of = {name: g.label for g in groups for name in g.names}
    weights = None
    if base is not None:
        fan_in_fan_out = bool(factors.raw_config.get("fan_in_fan_out", False))
        weights = BaseWeights(base, fan_in_fan_out=fan_in_fan_out)
    spectra = []
    for f in factors:
        svd = lowrank_svd(f.A, f.B, f.scale)
        base_norm = amplification = None
        if weights is not None:
            W = weights.weight(f)
            base_norm = float(torch.linalg.matrix_norm(W.double()))
            # ‖Uᵀ W V‖_F: how much W already acts along the update's own (nonzero) directions; (m, m)
            used = svd.nonzero()
            projected = used.U.T.float() @ (W @ used.V.float())
            inside = float(torch.linalg.matrix_norm(projected.double()))
            norm = float(svd.S.norm())
            amplification = norm / inside if inside > 0 else None
        spectra.append(ModuleSpectrum(
            name=f.name, kind=f.kind, group=label_of[f.name], depth=module_depth(f.name), r=f.r, shape=f.shape,
            alpha=f.alpha, scale=f.scale, num_parameters=f.num_parameters,
            singular_values=tuple(svd.S.tolist()), base_norm=base_norm, amplification=amplification,
        ))
    by_label = {g.label: g for g in groups}
    summaries = tuple(
        GroupSummary(by_label[g.label], tuple(s for s in spectra if s.group == g.label)) for g in groups
    )
    notes = list(factors.notes)
    zero = [s.name for s in spectra if s.is_zero]
    if zero:
        notes.append(f"{len(zero)} module(s) have ΔW = 0 (B still zero: untrained?), e.g. {zero[0]}")
    return AdapterAnalysis(factors.source, factors.config, tuple(spectra), summaries, tuple(notes))
