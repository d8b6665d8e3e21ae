"""The training loop (train/trainer.py): batching, accumulation, exact resume, non-finite steps (on a pure-torch toy task)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer, TrainingError
from tiny_models import ToyTask, train_toy


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def make_trainer(tmp_path: Path, **config) -> Trainer:
    task = ToyTask(n=10)
    lora = lorakit.LoraConfig(r=2, alpha=4, target_modules=task.default_targets)
    return Trainer(task, lora, TrainConfig(**config), tmp_path, log=io.StringIO(), device="cpu")


def test_each_epoch_visits_every_example_once_with_a_short_last_step(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, batch_size=2, grad_accum=2, max_steps=6)
    assert trainer.steps_per_epoch == 3  # ceil(10 / 4)
    epoch, index, seen, sizes = 0, 0, [], []
    for _ in range(3):
        micro, epoch, index = trainer.step_indices(epoch, index)
        sizes.append([len(m) for m in micro])
        seen += [i for m in micro for i in m]
    assert sizes == [[2, 2], [2, 2], [2]] and (epoch, index) == (1, 0)
    assert sorted(seen) == list(range(10))
    assert trainer.permutation(1) != trainer.permutation(0)  # a new order each epoch...
    assert trainer.permutation(0) == make_trainer(tmp_path, batch_size=2).permutation(0)  # ...fixed by the seed


def test_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """4 micro-batches of 2 + the short last step weigh examples like batches of 8 (dropout off)."""
    a = train_toy(str(tmp_path / "a"), 4, batch_size=2, grad_accum=4, dropout=0.0)
    b = train_toy(str(tmp_path / "b"), 4, batch_size=8, grad_accum=1, dropout=0.0)
    wa, wb = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    assert a.steps == b.steps == 4


def test_base_weights_frozen_and_outputs_written(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, batch_size=4, max_steps=3)
    base = {n: p.detach().clone() for n, p in trainer.base.named_parameters() if not p.requires_grad}
    result = trainer.fit()
    for name, p in trainer.base.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trainer.params if "lora_B" in n)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["trainable_parameters"] == result.trainable == (2 * 8 + 16 * 2) + (2 * 16 + 1 * 2)
    assert [row["step"] for row in metrics["history"]["train"]] == [1, 2, 3]
    assert (tmp_path / "training.png").stat().st_size > 1000
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("k, accum", [(3, 1), (5, 2)])  # k=3: mid-epoch (10 steps of 4 per epoch of 40)
def test_resume_is_bit_identical(tmp_path: Path, k: int, accum: int) -> None:
    """N steps straight == k steps + resume + N−k (dropout on, so the RNG state must come back too)."""
    n = 14
    common = dict(batch_size=4 // accum, grad_accum=accum, eval_every=4, keep=0)
    train_toy(str(tmp_path / "straight"), n, save_every=k, **common)
    # a second run stops at step k (its checkpoint), then a third resumes it
    part = tmp_path / "part"
    part.mkdir()
    ckpts = list_checkpoints(tmp_path / "straight" / "checkpoints")
    assert [int(p.name[5:]) for p in ckpts][:2] == [k, 2 * k]
    (part / "checkpoints").mkdir()
    ckpts[0].rename(part / "checkpoints" / ckpts[0].name)
    resumed = train_toy(str(part), n, resume=True, save_every=k, **common)
    assert resumed.steps == n
    assert_identical(adapter(tmp_path / "straight"), adapter(part))
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    again = json.loads((part / "metrics.json").read_text())
    assert straight["history"] == again["history"]


def test_resume_refuses_a_contradicting_run(tmp_path: Path) -> None:
    train_toy(str(tmp_path), 4, save_every=2)
    ckpt = load_checkpoint(tmp_path)
    task = ToyTask()
    with pytest.raises(CheckpointError, match="r: checkpoint 4, now 2"):
        Trainer(task, lorakit.LoraConfig(r=2, target_modules=task.default_targets), TrainConfig(max_steps=6, lr=1e-2, batch_size=4),
                tmp_path, log=io.StringIO()).fit(ckpt, force=True)
    lora = lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=task.default_targets)
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.01, now 0.02.*--force"):
        Trainer(ToyTask(), lora, TrainConfig(max_steps=6, lr=2e-2, batch_size=4), tmp_path, log=io.StringIO()).fit(ckpt)
    result = Trainer(ToyTask(), lora, TrainConfig(max_steps=6, lr=2e-2, batch_size=4), tmp_path, log=io.StringIO()).fit(ckpt, force=True)
    assert result.steps == 6


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    task = ToyTask(n=8, poison=frozenset(range(4)))  # with batch 8 every step sees a poisoned example
    lora = lorakit.LoraConfig(r=2, alpha=4, target_modules=task.default_targets)
    log = io.StringIO()
    trainer = Trainer(task, lora, TrainConfig(max_steps=10, batch_size=8, max_bad_steps=3, save_every=1), tmp_path, log=log)
    before = {n: p.detach().clone() for n, p in trainer.params}
    with pytest.raises(TrainingError, match="last 3 steps had a NaN/inf loss"):
        trainer.fit()
    for name, p in trainer.params:  # no update ever happened
        assert torch.equal(p, before[name])
    assert "skipped step 1: non-finite loss (1 skipped so far)" in log.getvalue()
    assert "1/10 loss nan lr " in log.getvalue()  # a progress line per step that has a note
    assert list_checkpoints(tmp_path / "checkpoints") == []  # nothing saved after a bad step


def test_isolated_non_finite_step_is_skipped_and_training_goes_on(tmp_path: Path) -> None:
    task = ToyTask(n=8, poison=frozenset({3}))  # batch 4: one of every two steps is poisoned
    lora = lorakit.LoraConfig(r=2, alpha=4, target_modules=task.default_targets)
    result = Trainer(task, lora, TrainConfig(max_steps=6, batch_size=4), tmp_path, log=io.StringIO()).fit()
    assert result.skipped == 3 and result.steps == 6
    assert all(math.isfinite(v) for v in result.after.values())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 3 and metrics["examples_per_s"] > 0


def test_a_fresh_run_will_not_mix_with_old_checkpoints(tmp_path: Path) -> None:
    train_toy(str(tmp_path), 4, save_every=2)
    with pytest.raises(CheckpointError, match=r"holds 2 checkpoint\(s\) of an earlier run \(latest step-00000004\); continue it with --resume"):
        train_toy(str(tmp_path), 4, save_every=2)
    # resuming from an older checkpoint: the newer one is another future of this run
    older = list_checkpoints(tmp_path / "checkpoints")[0]
    task = ToyTask()
    lora = lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=task.default_targets)
    trainer = Trainer(task, lora, TrainConfig(max_steps=4, lr=1e-2, batch_size=4, save_every=2), tmp_path, log=io.StringIO())
    with pytest.raises(CheckpointError, match="newer than step-00000002"):
        trainer.fit(load_checkpoint(older))
    assert trainer.fit(load_checkpoint(older), force=True).steps == 4
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002", "step-00000004"]


def test_non_finite_gradient_with_a_finite_loss_is_caught(tmp_path: Path) -> None:
    task = ToyTask(n=8, poison_grad=True)
    lora = lorakit.LoraConfig(r=2, alpha=4, target_modules=task.default_targets)
    log = io.StringIO()
    with pytest.raises(TrainingError, match="stopped at step 2"):
        Trainer(task, lora, TrainConfig(max_steps=4, batch_size=4, max_bad_steps=2), tmp_path, log=log).fit()
    assert "skipped step 1: non-finite gradient" in log.getvalue()


class InterruptAt(ToyTask):
    """Sends this process SIGINT (a Ctrl-C) during the loss of the ``at``-th micro-batch."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return super().loss(model, batch)


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path: Path) -> None:
    task = InterruptAt(at=5)  # during step 3 (grad_accum 2)
    lora = lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=task.default_targets)
    log = io.StringIO()
    trainer = Trainer(task, lora, TrainConfig(max_steps=8, lr=1e-2, batch_size=2, grad_accum=2), tmp_path / "run", log=log)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert "stopped after step 3" in log.getvalue() and "lorakit train --resume --out" in log.getvalue()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000003"]
    train_toy(str(tmp_path / "run"), 8, resume=True, save_every=0, batch_size=2, grad_accum=2)
    train_toy(str(tmp_path / "straight"), 8, save_every=0, batch_size=2, grad_accum=2)
    assert_identical(adapter(tmp_path / "run"), adapter(tmp_path / "straight"))


class CountedToyTask(ToyTask):
    """ToyTask whose batches say how many tokens they hold (an attention mask of ones, 3 per example)."""

    def collate(self, examples: list[int]) -> dict[str, torch.Tensor]:
        return {**super().collate(examples), "attention_mask": torch.ones(len(examples), 3)}


def test_steady_throughput_leaves_out_the_warm_up_steps(tmp_path: Path) -> None:
    """tokens/s after the first STEADY_AFTER steps (compilation happens there) — none for a run that short."""
    from lorakit.train.outputs import STEADY_AFTER

    def fit(out: Path, steps: int):
        task = CountedToyTask(n=10)
        lora = lorakit.LoraConfig(r=2, alpha=4, target_modules=task.default_targets)
        return Trainer(task, lora, TrainConfig(batch_size=4, max_steps=steps), out, log=io.StringIO(), device="cpu").fit()

    short = fit(tmp_path / "short", STEADY_AFTER)
    assert short.steady_tokens_per_s is None and short.peak_gib is None  # CPU: no GPU peak
    longer = fit(tmp_path / "long", STEADY_AFTER + 3)
    assert longer.tokens_per_s > 0 and longer.steady_tokens_per_s is not None and longer.steady_tokens_per_s > 0
    metrics = json.loads((tmp_path / "long" / "metrics.json").read_text())
    assert metrics["steady_tokens_per_s"] == round(longer.steady_tokens_per_s, 1) and metrics["peak_gpu_GiB"] is None


@pytest.mark.parametrize("compile_mode, layer_kernels", [("off", True), ("default", False)])
def test_compiled_layers_get_the_loss_kernel_only(tmp_path: Path, monkeypatch, compile_mode: str, layer_kernels: bool) -> None:
    """liger's norm/RoPE/SwiGLU autograd functions fail inside a compiled layer: with --compile only the loss is fused."""
    seen = {}

    def fake_apply(model, **kwargs):
        seen.update(kwargs)
        return "kernels: none (test)"

    monkeypatch.setattr(lorakit.fused_kernels, "apply", fake_apply)
    make_trainer(tmp_path, batch_size=4, max_steps=1, kernels="liger", compile=compile_mode)
    assert (seen["rope"], seen["norms"], seen["mlp"]) == (layer_kernels,) * 3 and "loss" not in seen
