"""The learning-rate schedule.

Learning rate, with W warmup steps and T total steps, at step t (0-based):

    t < W:  lr · (t + 1) / W
    else:   lr · ½ (1 + cos(π p))  (cosine)   or   lr · (1 − p)  (linear),   p = (t − W) / max(1, T − W)

LoRA+ parameter groups (``lorakit.lora_plus_param_groups``) carry an ``lr_scale``: they get the
scheduled lr times that ratio, so the ratio holds at every step.
"""

from __future__ import annotations

import math

import torch


def warmup_steps(warmup: float, total: int) -> int:
    """W: ``warmup`` steps when ≥ 1, else that fraction of the ``total`` steps (rounded)."""
    return int(warmup) if warmup >= 1 else int(round(warmup * total))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at 0-based step ``step`` (see the module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group ``lr``, times its ``lr_scale`` (LoRA+ groups keep their ratio)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
