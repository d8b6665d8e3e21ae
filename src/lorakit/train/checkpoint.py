"""Training checkpoints that survive a crash at any instant, and resume bit-exactly.

A checkpoint is a directory ``<out>/checkpoints/step-00000120/`` holding

    trainable.safetensors   every trainable parameter, by its name in the model (exact resume)
    optimizer.pt            optimizer.state_dict() (plain tensors and numbers)
    rng.pt                  python, numpy, torch CPU and CUDA generator states
    state.json              step, data position (epoch, index), schedule, config, data fingerprint, history
    adapter/                the adapter as lorakit.save_adapter writes it, usable as-is

Crash safety comes from one rule: a directory named ``step-*`` is complete.  It is written under a
temporary name (``.tmp-*``) in the same parent, every file and directory is fsynced, and only then
is it renamed (atomic on POSIX within one file system).  Old checkpoints are pruned only after the
new one exists, and pruning first renames them to ``.trash-*`` so a crash mid-delete never leaves a
half-deleted ``step-*``.  Leftover ``.tmp-*`` / ``.trash-*`` directories are removed at the next start.

Nothing here unpickles: ``.pt`` files hold only tensors and plain containers and are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import fsync, write_dir
from ..errors import LorakitError
from ..jsonfile import dumps, nan_for_null

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_NAME = re.compile(r"step-(\d+)")
#: Test hook: ``"<point>@<step>"`` SIGKILLs this process at that point of writing that step's checkpoint.
FAULT_ENV = "LORAKIT_CHECKPOINT_FAULT"
FAULT_POINTS = ("start", "trainable", "optimizer", "rng", "adapter", "state", "fsynced", "renamed", "pruning")
#: the same hook in the final writes of a run's ``adapter/``, ``metrics.json`` and ``training.png``
#: (outputs.write_outputs), at the run's last step
FINAL_FAULT_POINTS = ("final-start", "final-adapter", "final-metrics", "final-plot")


class CheckpointError(LorakitError, OSError):
    """A checkpoint is missing, incomplete, non-finite, or does not fit the run resuming from it."""


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


# -- listing and cleaning ----------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step-*`` directory, or None for any other name."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_stale(root: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary and half-deleted directories left by a crash; returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# -- RNG ----------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every random generator the loop and the model use, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing ------------------------------------------------------------------------------------------


def fault(point: str, step: int) -> None:
    """Die here if the test hook asks for it (see FAULT_ENV)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _all_finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    rng: dict[str, Any] | None = None,
    write_adapter: Callable[[Path], None] | None = None,
    keep: int = 3,
) -> Path:
    """Atomically write checkpoint ``step`` under ``root`` and prune all but the newest ``keep``.

    Args:
        trainable: name → tensor of every trainable parameter.
        optimizer: ``optimizer.state_dict()``.
        state: JSON-serialisable loop state (must contain "step").
        rng: :func:`capture_rng` output (captured now if None).
        write_adapter: writes a usable adapter directory into the path it is given.
        keep: how many checkpoints to keep (0 keeps all).

    Raises:
        CheckpointError: if a parameter or optimizer tensor is not finite (nothing is written).
    """
    if not (_all_finite(trainable) and _all_finite(optimizer)):
        raise CheckpointError(
            f"refusing to save checkpoint step {step}: a trainable parameter or optimizer state is NaN/inf; "
            "lower --lr or check the data (the previous checkpoint is intact)"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:08d}"

    def fill(tmp: Path) -> None:
        fault("start", step)
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        fault("trainable", step)
        torch.save(optimizer, tmp / "optimizer.pt")
        fault("optimizer", step)
        torch.save(rng if rng is not None else capture_rng(), tmp / "rng.pt")
        fault("rng", step)
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        fault("adapter", step)
        # strict JSON: a skipped step's NaN loss is written as null (nan_for_null reads it back)
        (tmp / "state.json").write_text(dumps(state, indent=1, sort_keys=True) + "\n")
        fault("state", step)

    # written under .tmp-* (clean_stale removes a crash's leftover); re-saving a step after resuming from an
    # older checkpoint swaps the new one in and deletes the old one
    final = write_dir(root / name, fill, tmp=root / f"{TMP_PREFIX}{name}-{os.getpid()}",
                      before_swap=lambda: fault("fsynced", step))
    fault("renamed", step)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            discard(old, root, step=step)
    return final


def discard(path: Path, root: Path, step: int | None = None) -> None:
    """Delete a checkpoint without ever leaving a half-deleted ``step-*`` behind."""
    trash = root / f"{TRASH_PREFIX}{path.name}-{os.getpid()}"
    os.rename(path, trash)
    fsync(root)
    if step is not None:
        fault("pruning", step)
    shutil.rmtree(trash, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------------


def resolve(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from a checkpoint, a ``checkpoints/`` directory or a run's --out directory."""
    path = Path(path)
    if checkpoint_step(path) is not None and path.is_dir():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"{path}: no checkpoint found (looked for {path}/checkpoints/step-* and {path}/step-*); "
        "check --out / --resume, or start without --resume"
    )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint (see :func:`resolve` for what ``path`` may be)."""
    path = resolve(path)
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
        optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
        state = json.loads((path / "state.json").read_text())
        for records in state.get("history", {}).values():
            nan_for_null(records)
    except (OSError, ValueError, RuntimeError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err}); resume from an older one under {path.parent}") from None
    return Checkpoint(path, trainable, optimizer, rng, state)
