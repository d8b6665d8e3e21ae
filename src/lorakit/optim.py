"""LoRA+ (Hayou, Ghosh & Yu 2024): B learns faster than A.

    η_B = ratio · η_A        (the paper suggests ratio ≈ 2⁴ for most tasks)

A LoRA layer's update s·B A starts with B = 0; with one learning rate for both factors, feature learning
is inefficient at large width.  :func:`lora_plus_param_groups` returns optimizer parameter groups in
PEFT's arrangement (``peft.optimizers.create_loraplus_optimizer``): every trainable matrix that is not
a B (A factors, modules_to_save weights) at ``lr``; B factors and every trainable 1-D tensor (DoRA
magnitudes, biases) at ``ratio · lr``; and, if ``embedding_lr`` is given, an embedding adapter's A and B
at that rate (PEFT's ``loraplus_lr_embedding``, whose default is 1e-6).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .errors import ConfigError
from .layers import LoraEmbedding, LoraLayer


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float, *, embedding_lr: float | None = None,
                           weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: pass them to any ``torch.optim`` optimizer.

    Example::

        opt = torch.optim.AdamW(lorakit.lora_plus_param_groups(model, lr=2e-4, ratio=16))

    Args:
        model: a model with adapters injected; only parameters with ``requires_grad`` are grouped.
        lr: η_A, the learning rate of A factors and other matrices.
        ratio: η_B / η_A (> 0; LoRA+ uses ≥ 1).
        embedding_lr: a fixed rate for embedding adapters' A and B (PEFT's ``loraplus_lr_embedding``);
            None: they follow the A / B rule like every other layer.
        weight_decay: every group's weight decay.

    Returns:
        Non-empty groups, each ``{"params", "lr", "weight_decay", "lr_scale", "name"}``: ``lr_scale`` is
        the group's rate over ``lr``, so a scheduler that sets ``group["lr"] = lr_t · group["lr_scale"]``
        keeps the ratio; ``name`` is "A", "B" or "embedding".  Within a group, parameters keep the order
        of ``model.named_parameters()``.

    Raises:
        ConfigError: lr, ratio or embedding_lr not a finite number > 0.
    """
    for what, value in (("lr", lr), ("ratio", ratio), ("embedding_lr", embedding_lr)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"LoRA+ {what} must be a finite number > 0, got {value!r}")
    kind: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            embedding = isinstance(module, LoraEmbedding) and embedding_lr is not None
            for p in module.lora_A.values():
                kind[id(p)] = "embedding" if embedding else "A"
            for p in module.lora_B.values():
                kind[id(p)] = "embedding" if embedding else "B"
    rates = {"A": float(lr), "B": float(lr) * ratio, "embedding": float(embedding_lr or lr)}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "embedding": []}
    for _, p in model.named_parameters():
        if p.requires_grad:
            groups[kind.get(id(p), "B" if p.dim() == 1 else "A")].append(p)
    return [{"params": params, "lr": rates[name], "weight_decay": weight_decay, "lr_scale": rates[name] / lr,
             "name": name} for name, params in groups.items() if params]
