"""A PNG of the training loss and the evaluation metrics over steps (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_history(history: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, *, title: str = "") -> Path:
    """Draw ``history["train"]`` losses (raw and smoothed) and each ``history["eval"]`` metric; save to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    train, evals = list(history.get("train", ())), list(history.get("eval", ()))
    metrics = [k for k in (evals[0] if evals else {}) if k != "step"]
    fig, axes = plt.subplots(1, 1 + bool(metrics), figsize=(11 if metrics else 6, 4), squeeze=False)
    ax = axes[0][0]
    steps = [row["step"] for row in train]
    losses = [row["loss"] for row in train]
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    if len(losses) > 1:
        smooth, avg = [], None
        for value in losses:
            if value == value and abs(value) != float("inf"):  # skip NaN/inf steps in the average
                avg = value if avg is None else 0.9 * avg + 0.1 * value
            smooth.append(avg if avg is not None else float("nan"))
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if metrics:
        ax = axes[0][1]
        for key in metrics:
            ax.plot([row["step"] for row in evals], [row.get(key, float("nan")) for row in evals], marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out metric")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
