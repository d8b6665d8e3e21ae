"""A rank per module type from a trained adapter: the smallest r that keeps ≥ 95 % of every
module's update energy, written as a ``rank_pattern`` ready to paste into a config.

Truncating a trained update to its top directions is not the same as training at that rank, but
the LoRA paper's subspace analysis (and ``lorakit analyze SMALL LARGE``) shows the top directions
of a large-rank run are what a small-rank run learns. A type whose update fills every direction it
had (effective rank = r) is "at its ceiling": the adapter may want *more* rank there, which a
trained adapter cannot show; train a larger r and look again.

α: changing r changes s = α / r. The suggestion also gives an ``alpha_pattern`` keeping each type's
trained scale s (α' = s·r', or s·√r' with rsLoRA), so a retrain starts with the same step sizes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig
from .analyze import AdapterAnalysis, GroupSummary, analyze_adapter
from .factors import AnalysisError


@dataclasses.dataclass(frozen=True)
class TypeSuggestion:
    """One module type's suggested rank and what it keeps.

    ``suggested_r`` is None for a type whose update is zero everywhere (nothing learned there).
    ``energy_kept`` is the smallest share of ‖ΔW‖²_F any of its modules keeps at the suggested rank.
    """

    label: str
    pattern: str
    family: str
    modules: int
    current_r: int
    suggested_r: int | None
    energy_kept: float
    at_ceiling: bool
    scale: float
    params_before: int
    params_after: int


@dataclasses.dataclass(frozen=True)
class RankSuggestion:
    """Suggested ranks per module type; ``config_snippet()`` gives the adapter_config.json keys."""

    energy: float
    types: tuple[TypeSuggestion, ...]
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool

    @property
    def params_before(self) -> int:
        return sum(t.params_before for t in self.types)

    @property
    def params_after(self) -> int:
        return sum(t.params_after for t in self.types)

    def config_snippet(self) -> dict[str, Any]:
        """{"r", "lora_alpha", "rank_pattern", "alpha_pattern"} in adapter_config.json's keys."""
        return {"r": self.r, "lora_alpha": self.alpha, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern)}

    def apply(self, config: LoraConfig) -> LoraConfig:
        """``config`` with the suggested r, α, rank_pattern and alpha_pattern."""
        return config.replace(r=self.r, alpha=self.alpha, rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)

    def to_dict(self) -> dict[str, Any]:
        return {"energy": self.energy, "params_before": self.params_before, "params_after": self.params_after,
                "config": self.config_snippet(), "types": [dataclasses.asdict(t) for t in self.types]}


def suggest_ranks(
    source: AdapterAnalysis | str | Path | Mapping[str, torch.Tensor],
    *,
    energy: float = 0.95,
    base: str | Path | None = None,
) -> RankSuggestion:
    """The smallest rank per module type keeping ≥ ``energy`` of each module's ‖ΔW‖²_F.

    For a type T with modules m (each ΔW_m: d_m × k_m):

        r_T = max_m effective_rank_energy(ΔW_m)
        parameters after = Σ_m r_T (d_m + k_m)

    Args:
        source: an :class:`AdapterAnalysis`, or anything :func:`analyze_adapter` accepts.
        energy: share of the update's energy to keep, in (0, 1].
    """
    if not 0 < energy <= 1:
        raise AnalysisError(f"energy must be in (0, 1], e.g. 0.95; got {energy!r}")
    analysis = source if isinstance(source, AdapterAnalysis) else analyze_adapter(source, base)
    use_rslora = bool(analysis.config.use_rslora) if analysis.config is not None else False
    types = tuple(_suggest_type(g, energy) for g in analysis.groups)
    live = [t for t in types if t.suggested_r is not None]
    # Default r: the rank most types want (ties → the larger), so rank_pattern stays short.
    counts = collections.Counter(t.suggested_r for t in live)
    r = max(counts, key=lambda v: (counts[v], v)) if counts else (analysis.config.r if analysis.config else 1)
    alpha_of = {t.label: _alpha_for(t.scale, t.suggested_r, use_rslora) for t in live}
    alpha = next((alpha_of[t.label] for t in live if t.suggested_r == r), analysis.config.alpha if analysis.config else 1.0)
    rank_pattern = {t.pattern: t.suggested_r for t in live if t.suggested_r != r}
    alpha_pattern = {t.pattern: alpha_of[t.label] for t in live if not math.isclose(alpha_of[t.label], alpha)}
    return RankSuggestion(energy, types, r, alpha, rank_pattern, alpha_pattern, use_rslora)


def _suggest_type(group: GroupSummary, energy: float) -> TypeSuggestion:
    live = [m for m in group.modules if not m.is_zero]
    current = max(m.r for m in group.modules)
    before = sum(m.num_parameters for m in group.modules)
    if not live:
        return TypeSuggestion(group.label, group.group.pattern, group.group.family, len(group.modules), current,
                              None, 0.0, False, group.modules[0].scale, before, 0)
    r = max(1, max(m.effective_rank(energy) for m in live))
    after = sum(r * (m.shape[0] + m.shape[1]) for m in group.modules)
    kept = min(m.energy(r) for m in live)
    ceiling = any(m.effective_rank(energy) >= min(m.r, *m.shape) for m in live)
    return TypeSuggestion(group.label, group.group.pattern, group.group.family, len(group.modules), current, r, kept,
                          ceiling, group.modules[0].scale, before, after)


def _alpha_for(scale: float, r: int, use_rslora: bool) -> float:
    """α that gives scale s at rank r: s·r, or s·√r with rsLoRA; rounded for a readable config."""
    return float(f"{scale * (math.sqrt(r) if use_rslora else r):.6g}")
