"""What the training loop needs from a task (causal-lm, classification, embedding, code-search).

The loop owns ordering, batching, accumulation, optimisation, checkpoints and logging; a task owns
its data, its model-specific loss and its evaluation.  Keeping the split here lets the loop resume
exactly: the data position is just (epoch, index into that epoch's seeded permutation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


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
        """Scalar loss of the (adapted) model on a batch."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; the first key is the headline metric shown in the summary."""
        ...

    def fingerprint(self) -> str:
        """A short string identifying the task's data, checked when resuming."""
        ...
