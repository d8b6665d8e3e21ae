"""What the training loop needs from a task (causal-lm, classification, embedding, code-search).

The loop owns ordering, batching, accumulation, optimisation, checkpoints and logging; a task owns
its data, its model-specific loss and its evaluation.  Keeping the split here lets the loop resume
exactly: the data position is just (epoch, index into that epoch's seeded permutation).

Three members are optional, read with ``getattr`` so a task may leave them out: ``skipped: int`` (bad
data lines dropped by ``--skip-bad-lines``; the CLI reports it), ``info() -> dict`` (extra facts
merged into metrics.json, e.g. classification labels) and ``load_note: str`` (how a model built for
``--quantize`` was loaded: streamed, or whole and why; the trainer prints it).  ``loss`` and ``evaluate`` receive the model
already on the training device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class TaskDefaults:
    """A task's settings for the ``lorakit train`` options the user does not give (each task class
    carries its own as ``defaults``); what the user types wins, then a resumed checkpoint's settings."""

    #: rank of the update BA
    r: int
    #: α; the update is scaled by s = α / r
    alpha: float
    #: dropout on the LoRA branch's input
    dropout: float
    #: peak AdamW learning rate
    lr: float
    #: examples per micro-batch
    batch_size: int
    #: tokens per example (per text, for the embedding tasks)
    max_length: int
    #: lr decay after warmup: "cosine", "linear" or "constant"
    schedule: str
    #: warmup steps (≥ 1) or fraction of the run (< 1)
    warmup: float = 0.05
    #: passes over the data, when ``max_steps`` is None
    epochs: int = 1
    #: optimizer steps; None: ``epochs`` decides
    max_steps: int | None = None
    #: LoraConfig.target_modules; None: the task chooses from the model (its ``default_targets``)
    targets: tuple[str, ...] | str | None = None
    #: None: the CLI's common default
    seed: int | None = None

    def options(self) -> dict[str, Any]:
        """The ``lorakit train`` option values (dest names), leaving out those that are None."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@runtime_checkable
class Task(Protocol):
    """A training task as the loop sees it."""

    name: str
    #: the base model (a transformers model), before LoRA is injected
    model: nn.Module
    #: the tokenizer or processor the model needs (saved beside merged models)
    tokenizer: Any
    #: LoraConfig.target_modules used when the user gives no --targets
    default_targets: Sequence[str] | str
    #: modules trained and saved whole (e.g. a classifier head)
    modules_to_save: tuple[str, ...]
    #: training examples; the loop draws indices from a seeded permutation per epoch
    train_examples: Sequence[Any]

    def collate(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        """Turn a list of examples into one batch of tensors (dynamic padding)."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of the (adapted, possibly DDP-wrapped) model on a batch already on its device.

        The mean over the batch: the loop weights micro-batches by their number of examples."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; the first key is the headline metric shown in the summary.

        Called in eval mode under torch.no_grad(); put inputs on ``next(model.parameters()).device``.
        Random generators are saved and restored around it, so it cannot disturb exact resume."""
        ...

    def fingerprint(self) -> str:
        """A short string identifying the task's data, checked when resuming."""
        ...


# Optional members (not part of the Protocol check; the loop and CLI use getattr):
#   skipped: int                 data lines skipped by --skip-bad-lines
#   info() -> dict[str, Any]     extra JSON facts for metrics.json
#   load_note: str               how the model was loaded for --quantize (integrations.local_models.load_quantized)


def batch_to(batch: Any, device: torch.device) -> Any:
    """A collated batch (a tensor, or a dict of them, nested) with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    return batch


def count_tokens(batch: Any) -> int:
    """Real (unpadded) tokens in a batch: its attention_mask, or packed ``*_lengths`` (the embedding task)."""
    if not isinstance(batch, dict):
        return 0
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        return int(batch["attention_mask"].sum())
    lengths = sum(int(v.sum()) for k, v in batch.items() if k.endswith("lengths") and isinstance(v, torch.Tensor))
    return lengths + sum(count_tokens(v) for v in batch.values() if isinstance(v, dict))
