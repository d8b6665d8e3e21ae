"""``lorakit sweep``: train the same task at several ranks (and α), then plot the final metric
against trainable parameters so the knee — where more rank stops paying — is visible.

Each run is a separate ``lorakit train`` process (``python -m lorakit train <your args> -r R
--alpha A --out OUT/r{R}-a{A}``), so runs cannot leak state (seeds, memory, a GPU) into one another
and the library never imports the training package. A run reads back from its directory:

    OUT/r8-a16/metrics.json   {"trainable_parameters": …, "after": {"eval_loss": …, …}, …}
    OUT/r8-a16/adapter/       the trained adapter (parameters are counted from it if needed)
    OUT/r8-a16/train.log      the run's output

Runs whose metrics.json exists are reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .factors import AnalysisError, load_factors

_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "wer", "cer", "mse", "mae")


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One finished run: its r, α, trainable parameter count, and the chosen metric's final value."""

    r: int
    alpha: float | None
    out: Path
    trainable_parameters: int
    value: float
    metrics: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """All runs of a sweep for one metric."""

    metric: str
    lower_is_better: bool
    runs: tuple[SweepRun, ...]
    tolerance: float = 0.01

    def best(self) -> SweepRun:
        pick = min if self.lower_is_better else max
        return pick(self.runs, key=lambda run: run.value)

    def knee(self) -> SweepRun | None:
        """The run with the fewest trainable parameters whose metric is within ``tolerance``
        (relative, default 1 %) of the best run's: |v − v_best| ≤ tolerance · |v_best|."""
        finite = [run for run in self.runs if math.isfinite(run.value)]
        if not finite:
            return None
        best = self.best().value
        close = [run for run in finite if abs(run.value - best) <= self.tolerance * abs(best)]
        return min(close, key=lambda run: (run.trainable_parameters, run.r))

    def conclusion(self) -> str:
        knee, best = self.knee(), self.best()
        if knee is None:
            return f"no run produced a finite {self.metric}"
        if knee is best and best.trainable_parameters == max(run.trainable_parameters for run in self.runs):
            return (f"no knee within the sweep: {self.metric} kept improving up to the largest run, r={best.r}"
                    f"{_alpha_words(best)} ({best.value:.4g}, {best.trainable_parameters:,} trainable parameters); "
                    "try larger ranks.")
        if knee is best:
            return (f"the best {self.metric} ({best.value:.4g}) comes from r={best.r}{_alpha_words(best)} "
                    f"({best.trainable_parameters:,} trainable parameters); no cheaper run is within {self.tolerance:.0%}.")
        ratio = best.trainable_parameters / knee.trainable_parameters
        return (f"r={knee.r}{_alpha_words(knee)} reaches {self.metric} {knee.value:.4g}, within {self.tolerance:.0%} of the best "
                f"({best.value:.4g} at r={best.r}{_alpha_words(best)}) with {ratio:.1f}× fewer trainable parameters "
                f"({knee.trainable_parameters:,} vs {best.trainable_parameters:,}).")

    def to_dict(self) -> dict[str, Any]:
        knee = self.knee()
        return {"metric": self.metric, "lower_is_better": self.lower_is_better, "tolerance": self.tolerance,
                "knee": {"r": knee.r, "alpha": knee.alpha} if knee else None, "conclusion": self.conclusion(),
                "runs": [{"r": run.r, "alpha": run.alpha, "out": str(run.out), "trainable_parameters": run.trainable_parameters,
                          "value": run.value} for run in self.runs]}


def _alpha_words(run: SweepRun) -> str:
    return f", α={run.alpha:g}" if run.alpha is not None else ""


def lower_is_better(metric: str) -> bool:
    """Guess the direction from the name: losses, perplexities and errors go down; the rest up."""
    return any(word in metric.lower() for word in _LOWER_IS_BETTER)


def run_dir_name(r: int, alpha: float | None) -> str:
    return f"r{r}" if alpha is None else f"r{r}-a{alpha:g}"


def train_command(train_args: Sequence[str], r: int, alpha: float | None, out: Path) -> list[str]:
    """The ``lorakit train`` command line of one run (the user's args, then -r / --alpha / --out)."""
    cmd = [sys.executable, "-m", "lorakit", "train", *train_args, "-r", str(r)]
    if alpha is not None:
        cmd += ["--alpha", f"{alpha:g}"]
    return cmd + ["--out", str(out)]


def sweep_grid(ranks: Sequence[int], alphas: Sequence[float] | None = None,
               alpha_ratio: float | None = None) -> list[tuple[int, float | None]]:
    """(r, α) pairs: every rank with every α, or α = alpha_ratio · r, or the trainer's default α (None)."""
    if not ranks or any(r < 1 for r in ranks):
        raise AnalysisError(f"sweep ranks must be integers ≥ 1, e.g. --ranks 2 4 8 16; got {list(ranks)}")
    if alphas and alpha_ratio is not None:
        raise AnalysisError("give either --alphas or --alpha-ratio, not both")
    if alpha_ratio is not None:
        return [(r, alpha_ratio * r) for r in ranks]
    return [(r, a) for r in ranks for a in (alphas or [None])]


def run_sweep(
    train_args: Sequence[str],
    grid: Sequence[tuple[int, float | None]],
    out: str | Path,
    *,
    metric: str,
    lower: bool | None = None,
    tolerance: float = 0.01,
    force: bool = False,
    runner: Callable[[list[str], Path], int] | None = None,
    log: Callable[[str], None] = functools.partial(print, flush=True),
) -> SweepResult:
    """Train one run per (r, α) in ``grid`` under ``out`` and collect ``metric`` from each.

    Args:
        train_args: ``lorakit train`` arguments shared by all runs (task, model, steps, seed...).
        grid: (r, α) pairs, see :func:`sweep_grid`; α None leaves the trainer's default.
        metric: a key of metrics.json's final evaluation ("after"), e.g. "eval_loss".
        lower: whether lower values are better (default: guessed from the name).
        force: re-run even where metrics.json exists.
        runner: runs a command with its log file, returns the exit code (default: a subprocess).
    Raises:
        AnalysisError: a run failed (names its log), or the metric is not in its metrics.json.
    """
    out = Path(out)
    runner = runner or _subprocess_runner
    dirs = []
    for i, (r, alpha) in enumerate(grid, 1):
        run_out = out / run_dir_name(r, alpha)
        dirs.append(run_out)
        if (run_out / "metrics.json").is_file() and not force:
            log(f"[{i}/{len(grid)}] r={r}{'' if alpha is None else f' α={alpha:g}'}: done before, reusing {run_out}")
            continue
        cmd = train_command(train_args, r, alpha, run_out)
        log(f"[{i}/{len(grid)}] r={r}{'' if alpha is None else f' α={alpha:g}'}: {' '.join(cmd[1:])}")
        run_out.mkdir(parents=True, exist_ok=True)
        code = runner(cmd, run_out / "train.log")
        if code != 0:
            raise AnalysisError(f"sweep run r={r} α={alpha} failed (exit {code}); see {run_out / 'train.log'}. "
                                "Fix the shared train arguments and run the sweep again: finished runs are reused.")
    return collect_runs(dirs, metric=metric, lower=lower, tolerance=tolerance)


def _subprocess_runner(cmd: list[str], log_path: Path) -> int:
    with open(log_path, "w") as log_file:
        return subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, check=False).returncode


def collect_runs(dirs: Sequence[str | Path], *, metric: str, lower: bool | None = None,
                 tolerance: float = 0.01) -> SweepResult:
    """Read finished ``lorakit train`` output directories (metrics.json, adapter/) into a SweepResult."""
    runs = [_read_run(Path(d), metric) for d in dirs]
    if not runs:
        raise AnalysisError("no sweep runs to collect; pass run directories (each with metrics.json)")
    return SweepResult(metric, lower_is_better(metric) if lower is None else lower, tuple(runs), tolerance)


def _read_run(path: Path, metric: str) -> SweepRun:
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise AnalysisError(f"{path}: no metrics.json; is it a finished `lorakit train --out` directory?")
    try:
        metrics = json.loads(metrics_file.read_text())
    except ValueError as err:
        raise AnalysisError(f"{metrics_file}: not valid JSON ({err})") from None
    final = metrics.get("after") if isinstance(metrics.get("after"), dict) else {}
    value = final.get(metric, metrics.get(metric))
    if not isinstance(value, (int, float)):
        available = sorted(k for k, v in {**metrics, **final}.items() if isinstance(v, (int, float)) and k != "step")
        raise AnalysisError(f"{metrics_file}: no final value of {metric!r}; available: {', '.join(available) or 'none'}")
    adapter = path / "adapter"
    factors = load_factors(adapter) if adapter.is_dir() else None
    count = metrics.get("trainable_parameters")
    if not isinstance(count, int):
        if factors is None:
            raise AnalysisError(f"{path}: metrics.json has no trainable_parameters and there is no adapter/ to count them")
        count = sum(m.num_parameters for m in factors)
    lora = (metrics.get("config") or {}).get("lora") if isinstance(metrics.get("config"), dict) else None
    r, alpha = _rank_alpha(path, factors, lora)
    return SweepRun(r, alpha, path, count, float(value), metrics)


def _rank_alpha(path: Path, factors: Any, lora: Mapping[str, Any] | None) -> tuple[int, float | None]:
    """r and α of a run: from its adapter's config, else its recorded run config."""
    if factors is not None and factors.config is not None:
        return factors.config.r, factors.config.alpha
    if isinstance(lora, Mapping) and isinstance(lora.get("r"), int):
        alpha = lora.get("alpha", lora.get("lora_alpha"))
        return lora["r"], float(alpha) if isinstance(alpha, (int, float)) else None
    raise AnalysisError(f"{path}: cannot tell the run's rank (no adapter/ directory and no config in metrics.json)")
