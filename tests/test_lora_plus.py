"""LoRA+: parameter groups as PEFT's create_loraplus_optimizer makes them; the trainer keeps the ratio."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from tiny_models import ToyTask, train_toy
from torch import nn

import lorakit
from lorakit.cli import build_parser
from lorakit.cli.train import resolve
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)


def test_groups_match_peft(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    kw = dict(r=2, target_modules=["emb", "lin"], modules_to_save=["head"])
    ours = lorakit.inject(Net(), lorakit.LoraConfig(use_dora=True, **kw))
    groups = lorakit.lora_plus_param_groups(ours, 1e-3, 16.0, embedding_lr=1e-6)
    ours_lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(use_dora=True, **kw))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    theirs_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}

    def by_name(model, lrs, rename):
        return {rename(n): lrs[id(p)] for n, p in model.named_parameters() if p.requires_grad}

    ours_named = by_name(ours, ours_lr, lambda n: n.replace("copies.default.", "").replace(".default", "")
                         .replace("lora_magnitude", "lora_magnitude_vector"))
    theirs_named = by_name(theirs, theirs_lr, lambda n: n.replace("base_model.model.", "").replace(".default", "")
                           .replace("modules_to_save.", "").replace(".weight", "").replace(".bias", "")
                           .replace("lora_embedding_", "lora_"))
    ours_named = {k.replace(".weight", "").replace(".bias", ""): v for k, v in ours_named.items()}
    assert len(ours_named) == 7  # emb A, B; lin A, B, m; head weight, bias
    assert ours_named == pytest.approx(theirs_named)
    assert sorted(set(ours_named.values())) == pytest.approx([1e-6, 1e-3, 16e-3])


def test_without_embedding_lr_embeddings_follow_the_ratio() -> None:
    model = lorakit.inject(Net(), lorakit.LoraConfig(r=2, target_modules=["emb"]))
    groups = {g["name"]: g for g in lorakit.lora_plus_param_groups(model, 0.1, 4.0)}
    assert groups.keys() == {"A", "B"}
    assert groups["B"]["params"] == [model.emb.lora_B["default"]] and groups["B"]["lr_scale"] == 4.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), True])
def test_bad_ratio_is_refused(bad) -> None:
    with pytest.raises(lorakit.ConfigError, match="ratio"):
        lorakit.lora_plus_param_groups(lorakit.inject(Net(), lorakit.LoraConfig(target_modules=["lin"])), 1e-3, bad)


def test_trainer_schedules_every_group_at_its_ratio_and_resumes_exactly(tmp_path: Path) -> None:
    task = ToyTask(n=12)
    cfg = TrainConfig(max_steps=3, lr=1e-2, batch_size=4, warmup=1, schedule="linear", lora_plus_ratio=8.0)
    trainer = Trainer(task, lorakit.LoraConfig(r=2, target_modules=task.default_targets), cfg, tmp_path / "t",
                      log=io.StringIO(), device="cpu")
    trainer.fit()
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["B"] == pytest.approx(8.0 * lrs["A"]) and lrs["A"] > 0

    # straight 4 steps == 2 steps + resume + 2 (the optimizer's groups and state come back in order)
    common = dict(batch_size=4, keep=0, save_every=2, lora_plus_ratio=8.0)
    train_toy(str(tmp_path / "straight"), 4, **common)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    first = list_checkpoints(tmp_path / "straight" / "checkpoints")[0]
    first.rename(part / first.name)
    train_toy(str(tmp_path / "part"), 4, resume=True, **common)
    a = load_checkpoint(tmp_path / "straight").trainable
    b = load_checkpoint(tmp_path / "part").trainable
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert state["history"]["train"]


def test_cli_flags_reach_the_configs() -> None:
    args = build_parser().parse_args(["train", "--dora", "--lora-plus-ratio", "16"])
    values = resolve(args, None)
    assert values["dora"] is True and values["lora_plus_ratio"] == 16.0
    plain = resolve(build_parser().parse_args(["train"]), None)
    assert plain["dora"] is False and plain["lora_plus_ratio"] is None
    saved = {"lora": {"use_dora": True}, "train": {"lora_plus_ratio": 4.0}}
    resumed = resolve(build_parser().parse_args(["train"]), saved)
    assert resumed["dora"] is True and resumed["lora_plus_ratio"] == 4.0
