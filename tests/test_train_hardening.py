"""Training outputs (issue 14): strict JSON, options validated up front, final writes that survive a
SIGKILL, and files readable per the umask."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.train.checkpoint import FAULT_ENV, list_checkpoints, load_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer
from tiny_models import ToyTask, train_toy

TESTS = Path(__file__).parent


def _strict(path: Path):
    """Parse as strict JSON: NaN / Infinity are refused (as jq and JavaScript refuse them)."""
    def refuse(name):
        raise ValueError(f"{path.name} contains {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_skipped_step_writes_null_not_nan_and_resumes(tmp_path: Path) -> None:
    task = ToyTask(n=8, poison=frozenset({3}))  # batch 4: one of every two steps has a NaN loss and is skipped
    lora = lorakit.LoraConfig(r=2, alpha=4, target_modules=task.default_targets)
    cfg = TrainConfig(max_steps=4, batch_size=4, save_every=1, keep=0)
    result = Trainer(task, lora, cfg, tmp_path, log=io.StringIO()).fit()
    skipped = [math.isnan(row["loss"]) for row in result.history["train"]]
    assert result.skipped == sum(skipped) == 2
    losses = [row["loss"] for row in _strict(tmp_path / "metrics.json")["history"]["train"]]
    assert [v is None for v in losses] == skipped and all(isinstance(v, float) for v in losses if v is not None)
    # a checkpoint is written after each good step; the last one's history holds the skipped steps
    last = list_checkpoints(tmp_path / "checkpoints")[-1]
    saved = [row["loss"] for row in _strict(last / "state.json")["history"]["train"]]
    assert [v is None for v in saved] == skipped[: len(saved)] and None in saved
    # read back by lorakit: null is a NaN loss again, and a resumed run goes on from it
    ckpt = load_checkpoint(last)
    assert [math.isnan(r["loss"]) for r in ckpt.state["history"]["train"]] == skipped[: len(saved)]
    trainer = Trainer(ToyTask(n=8, poison=frozenset({3})), lora, TrainConfig(max_steps=6, batch_size=4, save_every=1, keep=0),
                      tmp_path, log=io.StringIO())
    resumed = trainer.fit(ckpt, force=True)
    assert resumed.steps == 6
    again = [math.isnan(r["loss"]) for r in resumed.history["train"]]
    assert again[:4] == skipped and [v is None for v in
                                       (r["loss"] for r in _strict(tmp_path / "metrics.json")["history"]["train"])] == again


@pytest.mark.parametrize("lr", [1e38, 3.5e37, float("inf"), float("nan"), 0.0, -1e-3])
def test_lr_out_of_range_is_an_option_error(lr: float) -> None:
    with pytest.raises(lorakit.ConfigError, match=r"--lr must be a number in \(0, 1000\]"):
        TrainConfig(lr=lr)


def test_warmup_must_be_finite() -> None:
    with pytest.raises(lorakit.ConfigError, match="--warmup"):
        TrainConfig(warmup=float("inf"))


def _kill_at(out: Path, point: str, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, FAULT_ENV: f"{point}@{steps}", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    return subprocess.run([sys.executable, str(TESTS / "tiny_models.py"), str(out), str(steps), "2", "resume"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_sigkill_during_the_final_writes_leaves_whole_files(tmp_path: Path) -> None:
    """A run of 4 steps wrote adapter/ and metrics.json; resuming it to 6 steps is killed at each point of
    writing the new ones. Each output is then the old one or the new one, whole; the next run cleans up."""
    first = tmp_path / "first"
    train_toy(str(first), 4, save_every=2, keep=2)
    old_adapter = (first / "adapter" / "adapter_model.safetensors").read_bytes()
    # after the adapter (new adapter, old metrics) and after metrics.json (both new, the plot's temp left);
    # ("final-start": nothing written yet; "final-metrics": as "final-plot" without the temp)
    for point in ("final-adapter", "final-plot"):
        out = tmp_path / point
        shutil.copytree(first, out)
        proc = _kill_at(out, point, 6)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        new_metrics = point in ("final-metrics", "final-plot")
        lorakit.read_adapter(out / "adapter")  # whole, whichever it is
        assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter, point
        assert _strict(out / "metrics.json")["steps"] == (6 if new_metrics else 4), point
        if point == "final-plot":
            assert (out / ".training.tmp.png").exists()  # the crash's leftover...
        train_toy(str(out), 6, save_every=2, keep=2, resume=True)  # (0 steps left: writes the outputs again)
        assert _strict(out / "metrics.json")["steps"] == 6
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # ...is gone


def test_sigkill_inside_save_adapter_keeps_the_old_adapter(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    path = lorakit.save_adapter(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    code = (
        "import os, signal, torch, lorakit, lorakit.atomic as atomic\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4)); lorakit.inject(m, lorakit.LoraConfig(r=2, target_modules=['0']))\n"
        "atomic.replace_dir = lambda new, target: os.kill(os.getpid(), signal.SIGKILL)  # all written, not yet swapped\n"
        f"lorakit.save_adapter(m, {str(path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert any(p.name.startswith(".adapter.tmp-") for p in tmp_path.iterdir())


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_are_readable_as_the_umask_allows(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        train_toy(str(tmp_path), 2, save_every=2)
    finally:
        os.umask(old)
    modes = _modes(tmp_path)
    assert "adapter/adapter_model.safetensors" in modes and "checkpoints/step-00000002/trainable.safetensors" in modes
    for name, mode in modes.items():
        want = (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask
        assert mode == want, (name, oct(mode), oct(want))


def test_cli_checks_lr_before_loading_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    # the model directory does not exist either: the --lr error comes first, without a traceback
    assert main(["train", "--task", "causal-lm", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "d.jsonl"),
                 "--lr", "1e38", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "lorakit train: error: --lr must be a number in (0, 1000], got 1e+38\n"


def test_strict_dumps_writes_null_for_every_non_finite_float(tmp_path: Path) -> None:
    from lorakit.atomic import write_atomic
    from lorakit.jsonfile import dumps

    text = dumps({"a": [float("nan"), 1.5, (float("inf"), -float("inf"))], "b": {"c": float("nan")}, "d": 2})
    assert json.loads(text) == {"a": [None, 1.5, [None, None]], "b": {"c": None}, "d": 2}
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "x.json", text)
    finally:
        os.umask(old)
    assert _strict(path) == json.loads(text) and stat.S_IMODE(path.stat().st_mode) == 0o644
