"""How to train: :class:`TrainConfig`, every field a ``lorakit train`` option, checked when it is made."""

from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError
from .compute import COMPILE_MODES

SCHEDULES = ("cosine", "linear", "constant")
#: the largest --lr accepted: far above any useful AdamW rate, and far below where AdamW's float32
#: arithmetic overflows (≈ 3.4e37)
MAX_LR = 1e3
KERNELS = ("liger", "none")
CHECKPOINTING = ("off", "on", "offload")


@dataclasses.dataclass
class TrainConfig:
    """How to train; every field is a ``lorakit train`` option."""

    lr: float = 2e-4
    #: passes over the training data (ignored when max_steps is set)
    epochs: int = 1
    #: stop after this many optimizer steps
    max_steps: int | None = None
    #: examples per micro-batch
    batch_size: int = 16
    #: micro-batches per optimizer step
    grad_accum: int = 1
    #: warmup steps (≥ 1) or fraction of the run (< 1)
    warmup: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.0
    #: gradients are clipped to this global norm (None: no clipping)
    max_grad_norm: float | None = 1.0
    #: evaluate every N steps (0: only before and after)
    eval_every: int = 0
    #: checkpoint every N steps (0: no checkpoints)
    save_every: int = 0
    #: checkpoints kept (0: all)
    keep: int = 3
    seed: int = 0
    #: stop after this many non-finite steps in a row
    max_bad_steps: int = 5
    #: keep the frozen base in bfloat16 and compute in bfloat16 autocast (CUDA only; a bfloat16 checkpoint
    #: is kept in bfloat16 without it); adapters and their optimizer state stay float32
    bf16: bool = False
    #: torch.compile the decoder layers: "off", "default", "reduce-overhead" (CUDA graphs), or "auto"
    #: (see lorakit.train.compute.resolve_compile)
    compile: str = "auto"
    #: share one pass over q/k/v's (gate/up's) input and fuse SwiGLU MLPs: exact, less work and memory
    fuse: bool = True
    #: "liger": liger-kernel's fused loss (no full logits), norms, RoPE and SwiGLU on CUDA; "none"
    kernels: str = "liger"
    #: activation checkpointing of the decoder layers: "off", "on" (recompute) or "offload" (recompute,
    #: layer inputs kept in pinned CPU memory)
    checkpointing: str = "off"
    #: "nf4": the frozen base's linear weights are stored in 4 bits (QLoRA), quantised layer by layer onto
    #: the training device; None: as loaded
    quantize: str | None = None
    #: LoRA+: B factors (and 1-D trainables) learn at this multiple of lr (lorakit.lora_plus_param_groups); None: off
    lora_plus_ratio: float | None = None
    #: progress line every N steps when stderr is not a terminal
    log_every: int = 10

    def __post_init__(self) -> None:
        checks = [
            (0 < self.lr <= MAX_LR, f"--lr must be a number in (0, {MAX_LR:g}], got {self.lr}"),
            (self.epochs >= 1, f"--epochs must be ≥ 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be ≥ 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be ≥ 1, got {self.grad_accum}"),
            (0 <= self.warmup < math.inf, f"--warmup must be ≥ 0 (steps, or a fraction < 1), got {self.warmup}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every and --save-every must be ≥ 0"),
            (self.keep >= 0, f"--keep must be ≥ 0 (0 keeps all), got {self.keep}"),
            (self.max_bad_steps >= 1, f"max_bad_steps must be ≥ 1, got {self.max_bad_steps}"),
            (self.kernels in KERNELS, f"--kernels must be one of {KERNELS}, got {self.kernels!r}"),
            (self.checkpointing in CHECKPOINTING,
             f"--checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}"),
            (self.quantize in (None, "nf4"), f"--quantize must be nf4 (or left out), got {self.quantize!r}"),
            (self.lora_plus_ratio is None or (self.lora_plus_ratio > 0 and math.isfinite(self.lora_plus_ratio)),
             f"--lora-plus-ratio must be > 0, got {self.lora_plus_ratio}"),
            (self.compile in ("auto", *COMPILE_MODES),
             f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}"),
            # CUDA graphs keep what the layers save in their own static memory pool: copying it to the CPU
            # frees nothing there, and the copies coming back are not pool memory
            (not (self.checkpointing == "offload" and self.compile == "reduce-overhead"),
             "--checkpointing offload does not combine with --compile reduce-overhead (CUDA graphs keep saved "
             "activations in a static pool, so offloading frees nothing); use --compile default, or "
             "--checkpointing on"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

