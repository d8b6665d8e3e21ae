"""What a finished run leaves in its output directory, and the summary it prints.

``adapter/`` (PEFT layout), ``metrics.json`` (strict JSON: the result, the run's config and the
task's info) and ``training.png``.  Each is written beside its final name and swapped in whole, so a
crash leaves the old file or the new one, never a torn one; :func:`clean_stale_outputs` removes
what such a crash left behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

import lorakit

from ..atomic import write_atomic
from ..jsonfile import dumps
from .checkpoint import fault
from .progress import format_duration
from .task import Task


#: steps left out of the steady throughput: the first ones compile, record CUDA graphs and warm allocators
STEADY_AFTER = 3


@dataclasses.dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns; ``before`` / ``after`` are the task's metrics at step 0 and the end."""

    steps: int
    skipped: int
    before: dict[str, float]
    after: dict[str, float]
    history: dict[str, list[dict[str, float]]]
    trainable: int
    total: int
    #: wall-clock seconds of the training steps (evaluation and saving included), and throughput
    seconds: float = 0.0
    examples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    #: tokens/s after the first ``STEADY_AFTER`` steps (compilation, CUDA-graph recording and allocator
    #: warm-up happen there); None when the run was too short to tell
    steady_tokens_per_s: float | None = None
    #: peak GPU memory allocated during training, GiB (None on the CPU)
    peak_gib: float | None = None


def write_outputs(out: Path, model: nn.Module, task: Task, result: TrainResult, run_config: dict[str, Any]) -> None:
    """The run's results in ``out``: adapter/ (of the LoRA-injected ``model``), metrics.json and training.png."""
    step = result.steps
    fault("final-start", step)
    lorakit.save_adapter(model, out / "adapter")  # atomic: a temp dir swapped in whole
    fault("final-adapter", step)
    metrics = {"task": task.name, "steps": result.steps, "skipped_steps": result.skipped,
               "trainable_parameters": result.trainable, "total_parameters": result.total,
               "seconds": round(result.seconds, 3), "examples_per_s": round(result.examples_per_s, 2),
               "tokens_per_s": round(result.tokens_per_s, 1), "steady_tokens_per_s": _rounded(result.steady_tokens_per_s, 1),
               "peak_gpu_GiB": _rounded(result.peak_gib, 3), "before": result.before, "after": result.after,
               "history": result.history,
               "config": run_config, **_task_info(task)}
    # strict JSON (a skipped step's NaN loss is null), written beside, fsynced and renamed: a crash never
    # leaves a truncated file in place of a good one
    write_atomic(out / "metrics.json", dumps(metrics, indent=1) + "\n")
    fault("final-metrics", step)
    from .plot import plot_history  # matplotlib is only needed here

    tmp = plot_history(result.history, out / ".training.tmp.png", title=f"lorakit train --task {task.name}")
    fault("final-plot", step)
    os.replace(tmp, out / "training.png")


def clean_stale_outputs(out: Path) -> list[Path]:
    """Remove the temporaries of write_outputs that a crash left in ``out`` (never a finished output)."""
    stale = [p for pattern in (".adapter.tmp-*", ".metrics.json.tmp-*", ".training.tmp.png") for p in out.glob(pattern)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def summary_lines(result: TrainResult, peak_gib: float | None = None) -> list[str]:
    """The end-of-run summary; ``peak_gib``: peak GPU memory in GiB (None on CPU: no throughput line)."""
    lines = [f"trained {result.steps} steps in {format_duration(result.seconds)} ({result.examples_per_s:.1f} examples/s)"
             + (f"; {result.skipped} skipped (non-finite)" if result.skipped else ""),
             f"  trainable parameters: {result.trainable:,} of {result.total:,} "
             f"({100.0 * result.trainable / max(result.total, 1):.3f}%)",
             "  held-out metrics, before → after:" if len(result.before) > 1 else "  (no held-out examples to evaluate)"]
    for key, b in result.before.items():
        if key == "step" or key not in result.after:
            continue
        a = result.after[key]
        lines.append(f"    {key}: {b:.4f} → {a:.4f} ({a - b:+.4f})")
    if peak_gib is not None:
        steady = (f" ({result.steady_tokens_per_s:,.0f} after the first {STEADY_AFTER} steps)"
                  if result.steady_tokens_per_s is not None else "")
        lines.append(f"  {result.tokens_per_s:,.0f} tokens/s{steady}, peak GPU memory {peak_gib:.2f} GiB")
    return lines


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _task_info(task: Task) -> dict[str, Any]:
    info = getattr(task, "info", None)  # optional Task member (see task.py)
    return dict(info()) if callable(info) else {}
