"""Checkpoints: atomic writes, pruning, RNG round trips, and SIGKILL at every point of a write."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit.train.checkpoint import (
    FAULT_ENV,
    CheckpointError,
    capture_rng,
    clean_stale,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from tiny_models import train_toy

TESTS = Path(__file__).parent


def _save(root: Path, step: int, value: float = 1.0, keep: int = 3) -> Path:
    return save_checkpoint(
        root, step, trainable={"w": torch.full((2, 3), value)}, optimizer={"state": {0: {"m": torch.ones(3)}}, "param_groups": []},
        state={"step": step, "note": "x"}, keep=keep,
    )


def test_round_trip_is_exact(tmp_path: Path) -> None:
    w = torch.randn(4, 5, dtype=torch.float32)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    opt.param_groups[0]["params"][0].grad = torch.randn(3)
    opt.step()
    path = save_checkpoint(tmp_path, 7, trainable={"a.lora_A": w}, optimizer=opt.state_dict(), state={"step": 7, "epoch": 1})
    assert path.name == "step-00000007" and sorted(p.name for p in path.iterdir()) == [
        "optimizer.pt", "rng.pt", "state.json", "trainable.safetensors"]
    ckpt = load_checkpoint(tmp_path)  # a run dir's checkpoints/ or the dir itself both resolve
    assert ckpt.step == 7 and ckpt.state["epoch"] == 1
    assert torch.equal(ckpt.trainable["a.lora_A"], w)
    saved = opt.state_dict()
    assert torch.equal(ckpt.optimizer["state"][0]["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])
    assert ckpt.optimizer["param_groups"][0]["betas"] == saved["param_groups"][0]["betas"]


def test_rng_round_trip() -> None:
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_keeps_the_last_k_and_cleans_stale(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]
    (tmp_path / ".tmp-step-00000010-123").mkdir()
    (tmp_path / ".trash-step-00000004-123").mkdir()
    assert len(clean_stale(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006", "step-00000008"]


def test_refuses_non_finite_state(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    with pytest.raises(CheckpointError, match="NaN/inf"):
        _save(tmp_path, 4, value=float("nan"))
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    _save(tmp_path, 2)

    def full_disk(path: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 4, trainable={"w": torch.ones(2)}, optimizer={}, state={"step": 4}, write_adapter=full_disk)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_missing_checkpoint_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The adapter of an uninterrupted 8-step run."""
    out = tmp_path_factory.mktemp("straight")
    train_toy(str(out), 8, save_every=2, keep=2)
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# mid-file, complete but not yet renamed, and mid-delete of an old checkpoint
@pytest.mark.parametrize("point", ["trainable", "fsynced", "pruning"])
def test_sigkill_during_a_write_leaves_a_resumable_checkpoint(tmp_path: Path, point: str, straight) -> None:
    """Kill the training process at ``point`` of writing checkpoint 4 (save every 2, keep 2).

    The newest complete checkpoint must load, and resuming from it must end bit-identical to an
    uninterrupted run.  ("pruning" dies while deleting step 2 after step 6 exists: keep=2.)
    """
    kill_step = 6 if point == "pruning" else 4
    out = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: f"{point}@{kill_step}", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    proc = subprocess.run([sys.executable, str(TESTS / "tiny_models.py"), str(out), "8", "2"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    expected_latest = {"trainable": 2, "fsynced": 2, "pruning": 6}[point]
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.name == f"step-{expected_latest:08d}"
    assert load_checkpoint(out).step == expected_latest
    if point != "pruning":  # a temp dir was left behind by the crash...
        assert any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())

    train_toy(str(out), 8, resume=True, save_every=2, keep=2)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]  # ...and is gone after the resumed run
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == straight.keys() and all(torch.equal(a[k], straight[k]) for k in a)
