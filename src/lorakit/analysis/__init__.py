"""Choosing r and α from what adapters learned: the spectrum of ΔW = s·BA, subspace overlap
between ranks (Hu et al. 2021, §7), a rank suggestion, sweeps, and pictures.

    from lorakit.analysis import analyze_adapter, compare_adapters, suggest_ranks
    a = analyze_adapter("out/r64/adapter", base="models/base")     # per module / type / depth
    print(suggest_ranks(a).config_snippet())                      # {"r": 8, "rank_pattern": {...}, ...}
    c = compare_adapters("out/r4/adapter", "out/r64/adapter")     # φ(i, j) grids + conclusions
    print("\\n".join(c.conclusions()))

Command line: ``lorakit analyze`` and ``lorakit sweep`` (see their --help).
"""

from .analyze import AdapterAnalysis, GroupSummary, ModuleSpectrum, analyze_adapter
from .compare import Comparison, ModuleComparison, TypeComparison, compare_adapters
from .factors import AdapterFactors, AnalysisError, LoraFactors, load_factors
from .spectrum import ENERGY_LEVELS, LowRankSVD, effective_rank, energy_curve, lowrank_singular_values, lowrank_svd, stable_rank
from .subspace import captured_energy, similarity_grid, subspace_similarity
from .suggest import RankSuggestion, TypeSuggestion, suggest_ranks
from .sweep import SweepResult, SweepRun, collect_runs, run_sweep, sweep_grid

__all__ = [
    "ENERGY_LEVELS", "AdapterAnalysis", "AdapterFactors", "AnalysisError", "Comparison", "GroupSummary", "LoraFactors",
    "LowRankSVD", "ModuleComparison", "ModuleSpectrum", "RankSuggestion", "SweepResult", "SweepRun", "TypeComparison",
    "TypeSuggestion", "analyze_adapter", "captured_energy", "collect_runs", "compare_adapters", "effective_rank",
    "energy_curve", "load_factors", "lowrank_singular_values", "lowrank_svd", "run_sweep", "similarity_grid",
    "stable_rank", "subspace_similarity", "suggest_ranks", "sweep_grid",
]
