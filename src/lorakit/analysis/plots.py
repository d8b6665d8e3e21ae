"""PNG pictures of an analysis (matplotlib, Agg): spectra per module type, similarity heat-maps,
the sweep curve.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never through
pyplot, so drawing here neither needs a display nor changes the backend of a user's session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .analyze import AdapterAnalysis
from .compare import Comparison
from .factors import AnalysisError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .sweep import SweepResult


def _figure(panels: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError("plots need matplotlib, which is not installed: pip install 'lorakit[hf]' "
                            "(or leave out --plots; the tables and --json need nothing extra)") from None

    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_spectra(analysis: AdapterAnalysis, path: str | Path) -> Path:
    """One panel per module type: σᵢ/σ₁ of every module (colour = depth), log scale, with the
    95 % effective rank of the type marked."""
    fig, axes = _figure(len(analysis.groups))
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    depths = [m.depth for m in analysis.modules if m.depth is not None]
    top = max(depths, default=0) or 1
    cmap = colormaps["viridis"]
    for ax, group in zip(axes, analysis.groups):
        ax.set_title(f"{group.label} ({len(group.modules)} modules, r={'/'.join(map(str, group.ranks))})", fontsize=9)
        ax.set_xlabel("singular value index i")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        live = [m for m in group.modules if not m.is_zero]
        if not live:
            ax.text(0.5, 0.5, "ΔW = 0 everywhere\n(nothing learned here)", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        for m in live:
            sigma = [s / m.spectral_norm for s in m.singular_values if s > 0]
            color = cmap((m.depth or 0) / top) if m.depth is not None else "tab:blue"
            ax.plot(range(1, len(sigma) + 1), sigma, marker=".", linewidth=1, alpha=0.7, color=color)
        eff = group.effective_rank(0.95)
        ax.axvline(eff, color="tab:red", linestyle="--", linewidth=1, label=f"95% energy: {eff}")
        ax.set_yscale("log")
        ax.set_ylabel("σᵢ / σ₁")
        ax.legend(fontsize=8)
    fig.suptitle(f"spectra of ΔW = s·BA (colour: depth 0 → {top})", fontsize=10)
    return _save(fig, path)


def plot_similarity(comparison: Comparison, path: str | Path) -> Path:
    """The LoRA paper's heat-map per module type: mean φ(i, j) over the type's modules."""
    types = [t for t in comparison.types if t.grid is not None]
    fig, axes = _figure(max(1, len(types)), width=3.8, height=3.4)
    from matplotlib.ticker import MaxNLocator
    image = None
    for ax, t in zip(axes, types):
        grid = t.grid.numpy()
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", origin="upper", aspect="auto",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(f"{t.label}: captured {t.captured:.1%}", fontsize=9)
        ax.set_xlabel(f"j (b, r={t.modules[0].r_b})")
        ax.set_ylabel(f"i (a, r={t.modules[0].r_a})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    fig.suptitle(f"normalised subspace similarity ({comparison.side} side)", fontsize=10)
    return _save(fig, path)


def plot_energy(analysis: AdapterAnalysis, path: str | Path) -> Path:
    """Cumulative energy share vs number of directions, median module per type."""
    fig, (ax,) = _figure(1, width=5.5, height=4)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for group in analysis.groups:
        live = [m for m in group.modules if not m.is_zero]
        if not live:
            continue
        n = max(len(m.singular_values) for m in live)
        curve = [sorted(m.energy(i) for m in live)[len(live) // 2] for i in range(1, n + 1)]
        ax.plot(range(1, n + 1), curve, marker=".", label=group.label)
    ax.axhline(0.95, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("top directions kept")
    ax.set_ylabel("share of the update's energy ‖ΔW‖²")
    ax.set_title("energy kept by the top directions (median module per type)", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Metric against trainable parameters (log x), one line per α, points labelled by r; the knee starred."""
    fig, (ax,) = _figure(1, width=6, height=4.2)
    from matplotlib.ticker import NullFormatter

    # One line per α, or per α/r when α was scaled with r (--alpha-ratio): whichever gives fewer lines.
    by_alpha = {run.alpha for run in result.runs}
    by_ratio = {None if run.alpha is None else round(run.alpha / run.r, 6) for run in result.runs}
    use_ratio = len(by_ratio) < len(by_alpha)
    keys: Sequence[float | None] = sorted(by_ratio if use_ratio else by_alpha, key=lambda a: (a is None, a or 0))
    for key in keys:
        runs = sorted((run for run in result.runs
                       if (None if run.alpha is None else round(run.alpha / run.r, 6) if use_ratio else run.alpha) == key),
                      key=lambda run: run.trainable_parameters)
        label = "α default" if key is None else f"α={key:g}·r" if use_ratio else f"α={key:g}"
        ax.plot([run.trainable_parameters for run in runs], [run.value for run in runs], marker="o", label=label)
        for run in runs:
            ax.annotate(f"r={run.r}", (run.trainable_parameters, run.value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    knee = result.knee()
    if knee is not None:
        ax.scatter([knee.trainable_parameters], [knee.value], marker="*", s=250, color="tab:red", zorder=5,
                   label=f"knee: r={knee.r}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(result.metric)
    ax.set_title(f"{result.metric} vs trainable parameters ({'lower' if result.lower_is_better else 'higher'} is better)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
