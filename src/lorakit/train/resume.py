"""Whether a run may start, and resuming it: a checkpoint it resumes must be of the same run, the
checkpoints directory must hold nothing past the step it starts from, and the checkpoint's trainable
tensors must fit the model by name and shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, CheckpointError, checkpoint_step, discard, list_checkpoints

# Fields that may differ from a checkpoint's without changing what is being resumed.
_FREE_ON_RESUME = {"epochs", "max_steps", "eval_every", "save_every", "keep", "log_every", "max_bad_steps", "fuse",
                   "kernels", "checkpointing", "compile"}
# LoRA fields that decide parameter shapes / which parameters exist: never changed on resume.
_STRUCTURAL = {"r", "target_modules", "exclude_modules", "rank_pattern", "modules_to_save"}


def check_same_run(ckpt: Checkpoint, now: dict[str, Any], force: bool) -> None:
    """Refuse a checkpoint whose run config differs from ``now`` (a run's ``Trainer.run_config()``):
    always when the task or the adapter's shape differs, otherwise unless ``force``."""
    saved = ckpt.state.get("config", {})
    hard, soft = [], []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key in ("lora", "train"):
            for sub in sorted(set(a or {}) | set(b or {})):
                x, y = (a or {}).get(sub), (b or {}).get(sub)
                if x == y or key == "train" and sub in _FREE_ON_RESUME:
                    continue
                (hard if key == "lora" and sub in _STRUCTURAL else soft).append(f"{sub}: checkpoint {x!r}, now {y!r}")
        elif a != b:
            (hard if key == "task" else soft).append(f"{key}: checkpoint {a!r}, now {b!r}")
    if hard:
        raise CheckpointError(
            f"{ckpt.path} was trained with a different adapter shape or task ({'; '.join(hard)}); "
            "resume with the checkpoint's settings, or start a new run with a different --out"
        )
    if soft and not force:
        raise CheckpointError(
            f"{ckpt.path} does not match this run ({'; '.join(soft)}); drop the differing options to "
            "use the checkpoint's, or pass --force to resume with the new ones"
        )


def later_checkpoints(ckpt_dir: Path, resume: Checkpoint | None, force: bool) -> tuple[str, int]:
    """Checkpoints in ``ckpt_dir`` past the starting step belong to another run (or an abandoned
    future of this one); mixing them in would make "latest" and keep-K pruning pick the wrong ones.
    Returns why the run cannot start ("" if it can) and how many were deleted: with ``force`` all of them."""
    start = resume.step if resume is not None else 0
    later = [p for p in list_checkpoints(ckpt_dir) if (checkpoint_step(p) or 0) > start]
    if not later:
        return "", 0
    if not force:
        what = f"newer than {resume.path.name}" if resume is not None else "of an earlier run"
        return (
            f"{ckpt_dir} holds {len(later)} checkpoint(s) {what} (latest {later[-1].name}); "
            + ("continue it with --resume, " if resume is None else "")
            + "choose another --out, or pass --force to delete them"
        ), 0
    for path in later:
        discard(path, ckpt_dir)
    return "", len(later)


def load_trainable(ckpt: Checkpoint, params: list[tuple[str, torch.Tensor]]) -> None:
    """Copy a checkpoint's trainable tensors into the named ``params`` (names and shapes checked)."""
    names = dict(params)
    missing, unexpected = sorted(set(names) - set(ckpt.trainable)), sorted(set(ckpt.trainable) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: trainable parameters differ (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "resume with the same model, targets and task"
        )
    with torch.no_grad():
        for name, p in params:
            t = ckpt.trainable[name]
            if t.shape != p.shape:
                raise CheckpointError(f"{ckpt.path}: {name} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            p.copy_(t)
