"""Plain-text reports: tables a terminal shows well and the conclusions in words."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from typing import Any

from .analyze import AdapterAnalysis
from .compare import Comparison
from .suggest import RankSuggestion


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to width; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def format_analysis(analysis: AdapterAnalysis, *, modules: bool = True) -> str:
    """The per-module table (optional), the per-type and per-depth summaries, and notes."""
    base = any(m.base_norm is not None for m in analysis.modules)
    parts = [f"adapter {analysis.source}: {len(analysis.modules)} adapted modules, "
             f"{_count(analysis.num_parameters)} LoRA parameters"]
    if modules:
        headers = ["module", "r", "d×k", "s", "‖ΔW‖_F", "σ₁", "eff90", "eff95", "eff99", "stable"]
        if base:
            headers += ["‖ΔW‖/‖W‖", "amplif."]
        rows = []
        for m in analysis.modules:
            row = [m.name, m.r, f"{m.shape[0]}×{m.shape[1]}", m.scale, m.norm, m.spectral_norm, m.effective_rank(0.90),
                   m.effective_rank(0.95), m.effective_rank(0.99), m.stable_rank]
            rows.append(row + ([m.relative_norm, m.amplification] if base else []))
        parts += ["", "per module (effective rank = fewest directions holding 90/95/99 % of ‖ΔW‖²_F):", table(headers, rows)]
    headers = ["type", "family", "modules", "r", "s", "eff95 max", "eff95 median", "eff99 max", "stable mean", "‖ΔW‖_F mean"]
    if base:
        headers.append("‖ΔW‖/‖W‖ mean")
    rows = []
    for g in analysis.groups:
        row = [g.label, g.group.family, len(g.modules), "/".join(map(str, g.ranks)), "/".join(f"{s:.3g}" for s in g.scales),
               g.effective_rank(0.95), g.effective_rank(0.95, "median"), g.effective_rank(0.99), g.stable_rank, g.mean_norm]
        rows.append(row + ([g.relative_norm] if base else []))
    parts += ["", "per module type:", table(headers, rows)]
    depths = analysis.by_depth()
    if len(depths) > 1:
        rows = []
        for depth, ms in sorted(depths.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            rel = [m.relative_norm for m in ms if m.relative_norm is not None]
            row = [depth if depth is not None else "-", len(ms), statistics.fmean(m.effective_rank(0.95) for m in ms),
                   statistics.fmean(m.stable_rank for m in ms), statistics.fmean(m.norm for m in ms)]
            rows.append(row + ([statistics.fmean(rel) if rel else None] if base else []))
        headers = ["depth", "modules", "eff95 mean", "stable mean", "‖ΔW‖_F mean"] + (["‖ΔW‖/‖W‖ mean"] if base else [])
        parts += ["", "per depth (block index):", table(headers, rows)]
    if analysis.notes:
        parts += ["", *(f"note: {n}" for n in analysis.notes)]
    return "\n".join(parts)


def format_suggestion(suggestion: RankSuggestion) -> str:
    """The per-type suggestion, the config snippet and the parameter-count change in words."""
    rows = [[t.label, t.modules, t.current_r, t.suggested_r if t.suggested_r is not None else "drop",
             t.energy_kept, "yes" if t.at_ceiling else "", _count(t.params_before), _count(t.params_after)]
            for t in suggestion.types]
    before, after = suggestion.params_before, suggestion.params_after
    change = (after - before) / before if before else 0.0
    lines = [f"rank suggestion (smallest r per type keeping ≥ {suggestion.energy:.0%} of every module's update energy):",
             table(["type", "modules", "r now", "r suggested", "energy kept (min)", "at ceiling", "params now", "params after"], rows),
             "", f"parameters: {_count(before)} → {_count(after)} ({change:+.0%})",
             "paste into the config (α keeps each type's trained scale s):",
             "  " + json.dumps(suggestion.config_snippet())]
    ceiling = [t.label for t in suggestion.types if t.at_ceiling]
    if ceiling:
        lines.append(f"at ceiling: {'/'.join(ceiling)} use every direction they had; a larger r may help there — "
                     "train one and compare with `lorakit analyze SMALL LARGE`.")
    dropped = [t.label for t in suggestion.types if t.suggested_r is None]
    if dropped:
        lines.append(f"no update at all in {'/'.join(dropped)}: untrained or unused (e.g. not on the loss's path); remove "
                     "them from target_modules (the parameter count above assumes you do).")
    return "\n".join(lines)


def format_comparison(comparison: Comparison) -> str:
    """Per-type overlap table and the plain-words conclusions."""
    rows = [[t.label, len(t.modules), "/".join(sorted({f"{m.r_a}:{m.r_b}" for m in t.modules})),
             statistics.fmean(m.top_direction for m in t.modules), t.captured, t.best,
             statistics.fmean(m.chance for m in t.modules), t.verdict] for t in comparison.types]
    lines = [f"subspace similarity, {comparison.side} side: a = {comparison.source_a}, b = {comparison.source_b}",
             table(["type", "modules", "r a:b", "φ(1,1)", "captured", "best possible", "by chance", "verdict"], rows),
             "(captured: share of the larger-rank update's energy inside the smaller one's directions; best possible: "
             "inside its own top directions of that many; by chance: inside a random subspace of that size; "
             "φ(1,1): cos² between the two top directions)",
             "", "conclusions:", *(f"- {c}" for c in comparison.conclusions())]
    if comparison.notes:
        lines += ["", *(f"note: {n}" for n in comparison.notes)]
    return "\n".join(lines)
