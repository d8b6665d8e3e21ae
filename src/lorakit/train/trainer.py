"""The training loop: one Trainer for every task.

A run is a sequence of optimizer steps.  Step ``t`` consumes the next ``batch_size · grad_accum``
examples of the current epoch's permutation (a permutation of the training set seeded by
(seed, epoch) alone, independent of every other random generator), split into ``grad_accum``
micro-batches whose losses are weighted by their share of the step's examples.  The last step of an
epoch may be short; the next step starts the next epoch.  So the whole data position is the pair
(epoch, index), which is what a checkpoint stores, and resuming is exact.  A first Ctrl-C lets the
current step finish, saves a checkpoint and stops, so an interrupted run loses nothing either.
The learning rate follows :mod:`.schedule`; the run's files are written by :mod:`.outputs`.

Distributed training (``distributed.DistributedTrainer``) overrides only the seams: :meth:`Trainer.wrap`
(the one place the model is wrapped), :meth:`Trainer.step_indices` (the one place data indices are
chosen), :attr:`Trainer.is_main` (who saves and logs), and the small hooks next to them (gradient
sync per micro-batch, averaging a number over processes, what a checkpoint gathers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

import lorakit

from ..config import LoraConfig
from ..errors import LorakitError
from .checkpoint import Checkpoint, CheckpointError, capture_rng, clean_stale, restore_rng, save_checkpoint
from .compute import (
    base_dtype,
    cast_base,
    compile_model,
    compile_regions,
    eager,
    optimizer_kernel,
    pad_for_graphs,
    resolve_compile,
    trainable_to_float32,
)
from .config import TrainConfig
from .outputs import STEADY_AFTER, TrainResult, clean_stale_outputs, summary_lines, write_outputs
from .progress import Progress
from .resume import check_same_run, later_checkpoints, load_trainable
from .schedule import lr_factor, set_lr, warmup_steps
from .task import Task, batch_to, count_tokens


def default_device() -> torch.device:
    """Where a single-process run trains: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (e.g. the loss kept being NaN/inf)."""


class Trainer:
    """Trains LoRA adapters for a :class:`~lorakit.train.task.Task`.

    Args:
        task: data, loss and evaluation.
        lora: what to adapt; ``modules_to_save`` is extended with the task's.
        config: how to train.
        out: output directory (``adapter/``, ``metrics.json``, ``checkpoints/``).
        extra: run facts (model path, data paths, ...) stored in checkpoints and compared on resume.
        log: where progress and the summary go.
    """

    def __init__(
        self,
        task: Task,
        lora: LoraConfig,
        config: TrainConfig,
        out: str | Path,
        *,
        extra: dict[str, Any] | None = None,
        log: TextIO | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.task, self.config, self.out = task, config, Path(out)
        self.extra = dict(extra or {})
        self.log = log or sys.stderr
        self.device = torch.device(device) if device is not None else default_device()
        if config.bf16 and self.device.type != "cuda":
            raise lorakit.ConfigError("--bf16 needs a CUDA GPU; on CPU train in float32 (drop --bf16)")
        if not task.train_examples:
            raise TrainingError(f"task {task.name!r} has no training examples")
        saved = tuple(dict.fromkeys((*lora.modules_to_save, *task.modules_to_save)))
        self.lora = lora.replace(modules_to_save=saved) if saved != tuple(lora.modules_to_save) else lora
        torch.manual_seed(config.seed)  # LoRA A init draws from the global generator
        random.seed(config.seed)
        # The frozen base in its training dtype before LoRA wraps it, so the adapters are made float32 from
        # the start; then anything else trained (modules_to_save copies) to float32 too (compute.py).
        self.base_dtype = base_dtype(task.model, self.device, config.bf16)
        cast_base(task.model, self.base_dtype)
        model = lorakit.inject(task.model, self.lora)
        #: what was done to the model besides LoRA (kernels, fusion, checkpointing), printed when fit starts
        self.setup_notes: list[str] = []
        if config.quantize:  # after inject: the trained copies of modules_to_save stay full precision
            # A task built for --quantize brings its linears quantised already (streamed from the checkpoint,
            # its load_note says how); this converts what is left, the same layers a whole model gets.
            lorakit.quantize_base(model, config.quantize, device=self.device)
            count = sum(isinstance(m, lorakit.NF4Linear) for m in model.modules())
            how = getattr(task, "load_note", None) or "the task's model was loaded whole, then quantised"
            self.setup_notes.append(
                f"base quantised to {config.quantize}: {count} linear layer(s), 4.13 bits a weight; {how}")
        self.compile_mode = resolve_compile(config.compile, self.device)
        if config.kernels == "liger":  # before fuse_mlps, whose fused MLP then replaces liger's SwiGLU
            # Compiled decoder layers get the loss kernel alone (it runs outside them): Inductor fuses norms,
            # RoPE and SwiGLU itself, and liger's autograd functions inside a compiled layer fail in Dynamo
            # (torch 2.11, H200, 2026-12-03: AssertionError in overwrite_tensor_vt_proxy at LigerRMSNorm).
            layer_kernels = self.compile_mode == "off"
            report = lorakit.fused_kernels.apply(model, device=self.device, rope=layer_kernels, norms=layer_kernels,
                                                 mlp=layer_kernels)
            self.setup_notes.append(str(report) + ("" if layer_kernels else
                                                   " (compiled layers: Inductor fuses their norms, RoPE and SwiGLU)"))
        trainable_to_float32(model)
        #: autocast dtype of forward passes (None: float32 throughout)
        self.amp_dtype = torch.bfloat16 if self.base_dtype == torch.bfloat16 else None
        if config.fuse:
            # Exact rewrites that only save work and memory: q/k/v and gate/up share one pass over their
            # input, and SwiGLU MLPs keep gate/up instead of their product for backward (docs/gpu-notes.md).
            groups, fused = lorakit.share_inputs(model), lorakit.fuse_mlps(model)
            self.setup_notes.append(
                f"shared input passes: {groups} group(s); fused SwiGLU MLPs: {fused}"
                + ("" if fused else " (no SwiGLU MLP with a LoRA down_proj in this model: nothing fused)"))
        if config.checkpointing != "off":
            layers = lorakit.checkpointing(model, config.checkpointing)
            self.setup_notes.append(f"activation checkpointing ({config.checkpointing}): {layers} layer(s)")
        self.model = self.wrap(model)  # also puts it on self.device
        self.base = model
        #: regions that ``fit`` compiles in place (nn.Module.compile): names and state dicts stay the plain model's
        self.compiled_regions = len(compile_regions(model)) if self.compile_mode != "off" else 0
        self.params = [(n, p) for n, p in self.base.named_parameters() if p.requires_grad]
        if config.lora_plus_ratio is None:
            groups: list[dict[str, Any]] = [{"params": [p for _, p in self.params]}]
        else:
            groups = lorakit.lora_plus_param_groups(self.base, config.lr, config.lora_plus_ratio)
            names = {id(p): n for n, p in self.params}
            # the optimizer numbers parameters group by group; checkpoints rely on self.params in that order
            self.params = [(names[id(p)], p) for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                           **optimizer_kernel(self.device))
        self.steps_per_epoch = math.ceil(len(task.train_examples) / (config.batch_size * config.grad_accum * self.world_size))
        self.total = config.max_steps or config.epochs * self.steps_per_epoch
        self.warmup = warmup_steps(config.warmup, self.total)
        self._perm_cache: tuple[int, list[int]] | None = None
        self._progress: Progress | None = None  # the live bar, erased before other lines are printed
        self._interrupted = False  # set by the first Ctrl-C (see _catch_interrupt)

    # -- seams for distributed training (distributed.DistributedTrainer overrides them) -------------
    #: processes training together; a step takes batch_size × grad_accum × world_size examples
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this process saves files and prints (rank 0)."""
        return True

    def wrap(self, model: nn.Module) -> nn.Module:
        """The one place the model gets wrapped (DDP / FSDP) and put on ``self.device``."""
        return model.to(self.device)

    def step_examples(self, micro: list[list[int]]) -> int:
        """Examples of the whole step (over all processes): each micro-batch's loss is weighted by its share."""
        return sum(len(ids) for ids in micro)

    def examples_in(self, ids: list[int]) -> int:
        """Examples a micro-batch counts for (a distributed padding batch counts for none)."""
        return len(ids)

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's backward: whether gradients are reduced over processes now."""
        return contextlib.nullcontext()

    def mean_over_processes(self, value: float) -> float:
        return value

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def rng_state(self) -> dict[str, Any]:
        return capture_rng()

    def permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order of the training set; seeded by (seed, epoch) alone."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.task.train_examples), generator=g).tolist())
        return self._perm_cache[1]

    def step_indices(self, epoch: int, index: int) -> tuple[list[list[int]], int, int]:
        """The micro-batches of the step starting at (epoch, index), and the position after it."""
        perm = self.permutation(epoch)
        take = perm[index : index + self.config.batch_size * self.config.grad_accum * self.world_size]
        bs = self.config.batch_size
        micro = [take[i : i + bs] for i in range(0, len(take), bs)]
        index += len(take)
        return (micro, epoch + 1, 0) if index >= len(perm) else (micro, epoch, index)

    # -- the run ---------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter by its name in the model (what a checkpoint stores)."""
        return {n: p.detach() for n, p in self.params}

    def run_config(self) -> dict[str, Any]:
        """What defines this run (task, data fingerprint, LoRA and training settings, extras); stored in
        checkpoints and metrics.json, compared by :meth:`check_resume`."""
        lora = {k: v for k, v in self.lora.to_peft_dict().items() if k not in ("inference_mode", "base_model_name_or_path")}
        return {"task": self.task.name, "data": self.task.fingerprint(), "lora": lora,
                "train": dataclasses.asdict(self.config), **self.extra}

    def check_resume(self, ckpt: Checkpoint, force: bool) -> None:
        """Refuse a checkpoint whose run differs from this one (unless ``force``, where it can be)."""
        check_same_run(ckpt, self.run_config(), force)

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint's trainable tensors, optimizer state and random generators (names and shapes checked)."""
        load_trainable(ckpt, self.params)
        self.optimizer.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt.rng)

    def evaluate(self) -> dict[str, float]:
        """Task metrics, without disturbing any random generator the training uses."""
        py_state = random.getstate()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast(), eager(self.base):
            self.model.eval()
            try:
                metrics = {k: float(v) for k, v in self.task.evaluate(self.base).items()}
            finally:
                self.model.train()
                random.setstate(py_state)
        return metrics

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _print(self, *lines: str) -> None:
        if self.is_main:
            if self._progress is not None:
                self._progress.clear()
            for line in lines:
                print(line, file=self.log, flush=True)

    def fit(self, resume: Checkpoint | None = None, *, force: bool = False) -> TrainResult:
        """Train to ``max_steps`` / ``epochs``; write the adapter, metrics.json and the plot into ``out``.
        With ``--compile``, the layers are compiled while it runs and back to eager when it ends, however it
        ends: their compiled code does not check module attributes (``compute.compile_options``), so a model
        handed back must not run it."""
        if self.compiled_regions:
            compile_model(self.base, self.compile_mode)
        try:
            return self._fit(resume, force)
        finally:
            if self.compiled_regions:
                compile_model(self.base, "off")

    def _fit(self, resume: Checkpoint | None, force: bool) -> TrainResult:
        cfg = self.config
        ckpt_dir = self.out / "checkpoints"
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in clean_stale(ckpt_dir):
                self._print(f"removed an incomplete checkpoint left by a crash: {stale}")
            for stale in clean_stale_outputs(self.out):
                self._print(f"removed an incomplete output left by a crash: {stale}")
        problem = self._later_checkpoints(ckpt_dir, resume, force) if self.is_main else ""
        if self.mean_over_processes(float(bool(problem))) > 0:  # every process stops, not only the main one
            raise CheckpointError(problem or "the main process refused the output directory (see its error)")
        report = lorakit.trainable_parameters(self.base)
        self._print(
            f"task {self.task.name}: {len(self.task.train_examples)} training examples, "
            f"{self.total} steps of {cfg.batch_size}×{cfg.grad_accum} on {self.device.type}",
            f"trainable parameters: {report.trainable:,} of {report.total:,} ({report.percent:.3f}%)",
            *self.setup_notes,
            f"frozen base in {str(self.base_dtype).removeprefix('torch.')}, trained parameters and optimizer state "
            "in float32" + (f", {str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp_dtype else ""),
        )
        if self.compiled_regions:
            self._print(f"torch.compile (mode {self.compile_mode}): {self.compiled_regions} layer(s) compile on first "
                        "use; the first steps take longer while they do (evaluation runs eagerly)")
        step = epoch = index = skipped = bad_run = 0
        history: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
        if resume is not None:
            self.check_resume(resume, force)
            self.restore(resume)
            s = resume.state
            step, epoch, index, skipped = s["step"], s["epoch"], s["index"], s["skipped"]
            history = s["history"]
            self._print(f"resumed from {resume.path} at step {step} (epoch {epoch}, example {index})")
        before = history["eval"][0] if history["eval"] else None
        if before is None:
            before = {"step": 0, **self.evaluate()}
            history["eval"].append(before)
            self._print("before: " + _fmt(before))
        self.model.train()
        progress = Progress(self.total, self.log, cfg.log_every, start_step=step) if self.is_main else None
        self._progress = progress
        tokens, examples, t_start = 0, 0, time.monotonic()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        restore_sigint = self._catch_interrupt()
        steady_from: tuple[float, int] | None = None  # (time, tokens) when STEADY_AFTER steps were done
        try:
            first_step = step
            while step < self.total:
                t_step = time.monotonic()
                micro, next_epoch, next_index = self.step_indices(epoch, index)
                lr = cfg.lr * lr_factor(step, self.total, self.warmup, cfg.schedule)
                set_lr(self.optimizer, lr)  # LoRA+ groups keep their ratio
                n_step = self.step_examples(micro)
                examples += n_step
                loss_acc = torch.zeros((), device=self.device)  # read once a step, not once a micro-batch
                for k, ids in enumerate(micro):
                    if self.compile_mode == "reduce-overhead" and k == 0:
                        # A new CUDA-graph generation per optimizer step, not per micro-batch: the gradients
                        # accumulated so far are graph outputs, which the next generation may overwrite.
                        torch.compiler.cudagraph_mark_step_begin()
                    batch = self.task.collate([self.task.train_examples[i] for i in ids])
                    tokens += count_tokens(batch)  # before the copy to the GPU: counting there would wait for it
                    batch = batch_to(batch, self.device)
                    if self.compile_mode == "reduce-overhead":
                        batch = pad_for_graphs(batch, getattr(getattr(self.task, "tokenizer", None), "pad_token_id", None))
                    # each micro-batch counts by its share of the step's examples (a short last one counts less);
                    # × world_size because DDP/FSDP average the processes' gradients
                    weight = self.examples_in(ids) * self.world_size / n_step
                    with self.grad_sync(last=k == len(micro) - 1):
                        with self._autocast():
                            loss = self.task.loss(self.model, batch)
                        (loss * weight).backward()
                    loss_acc = loss_acc + loss.detach().float() * weight
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for _, p in self.params], cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
                )
                if hasattr(norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
                    norm = norm.full_tensor()
                # one wait for the GPU a step: the loss and whether the gradient is finite, read together
                loss_sum, grad_finite = torch.stack([loss_acc, torch.isfinite(norm).float().to(loss_acc.device)]).tolist()
                loss_sum = self.mean_over_processes(loss_sum)  # so every process skips a non-finite step alike
                note = ""
                if math.isfinite(loss_sum) and grad_finite:
                    self.optimizer.step()
                    bad_run = 0
                else:
                    skipped += 1
                    bad_run += 1
                    what = "loss" if not math.isfinite(loss_sum) else "gradient"
                    note = f"skipped step {step + 1}: non-finite {what} ({skipped} skipped so far)"
                self.optimizer.zero_grad(set_to_none=True)
                step, epoch, index = step + 1, next_epoch, next_index
                if step == first_step + STEADY_AFTER:
                    steady_from = time.monotonic(), tokens
                history["train"].append({"step": step, "loss": loss_sum, "lr": lr})
                if self.compiled_regions and step == first_step + 1:
                    note = "; ".join(filter(None, [note, f"first step {time.monotonic() - t_step:.1f} s, compilation included"]))
                if progress is not None:
                    progress.update(step, loss_sum, lr, n_step, note)
                if bad_run >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"stopped at step {step}: the last {bad_run} steps had a NaN/inf loss or gradient "
                        f"({skipped} skipped in all); lower --lr, check the data, or resume from the last checkpoint "
                        f"in {ckpt_dir}"
                    )
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total:
                    history["eval"].append({"step": step, **self.evaluate()})
                    self._print(f"step {step}: " + _fmt(history["eval"][-1]))
                due = cfg.save_every and (step % cfg.save_every == 0 or step == self.total) and bad_run == 0
                stop = self.mean_over_processes(float(self._interrupted)) > 0  # every process stops at this step
                if due or stop:
                    self.save(ckpt_dir, step, epoch, index, skipped, history)
                if stop:
                    self._print(f"stopped after step {step}; checkpoint {ckpt_dir / f'step-{step:08d}'}; "
                                f"continue with: lorakit train --resume --out {self.out}")
                    raise KeyboardInterrupt
        finally:
            restore_sigint()
        if progress is not None:
            progress.close()
        self._progress = None
        t_end = time.monotonic()
        elapsed = t_end - t_start
        steady = None
        if steady_from is not None and step > first_step + STEADY_AFTER:
            steady = self.mean_over_processes(tokens - steady_from[1]) * self.world_size / max(t_end - steady_from[0], 1e-9)
        tokens = round(self.mean_over_processes(tokens) * self.world_size)  # every process's tokens, like examples
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        after = {"step": step, **self.evaluate()}
        if history["eval"][-1].get("step") != step:
            history["eval"].append(after)
        result = TrainResult(step, skipped, before, after, history, report.trainable, report.total,
                             elapsed, examples / max(elapsed, 1e-9), tokens / max(elapsed, 1e-9), steady, peak)
        self.write_outputs(result)  # on every process: FSDP gathers the adapter there
        if self.is_main:
            self._summary(result)
        return result

    def _catch_interrupt(self) -> Callable[[], None]:
        """First Ctrl-C: finish the current step, save a checkpoint and stop (resumable exactly);
        a second Ctrl-C stops at once.  Returns the function that puts the old handler back."""
        self._interrupted = False
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # signal handlers can only be set from the main thread
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            self._print("\ninterrupted: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)")

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def _later_checkpoints(self, ckpt_dir: Path, resume: Checkpoint | None, force: bool) -> str:
        """Why the run cannot start in ``ckpt_dir`` ("" if it can; see resume.later_checkpoints)."""
        problem, deleted = later_checkpoints(ckpt_dir, resume, force)
        if deleted:
            start = resume.step if resume is not None else 0
            self._print(f"--force: deleted {deleted} checkpoint(s) in {ckpt_dir} past step {start}")
        return problem

    def save(self, root: Path, step: int, epoch: int, index: int, skipped: int, history: dict[str, Any]) -> Path | None:
        """Write checkpoint ``step`` (position: the next step starts at example ``index`` of ``epoch``)."""
        if not self.is_main:
            return None
        state = {"step": step, "epoch": epoch, "index": index, "skipped": skipped, "history": history,
                 "scheduler": {"schedule": self.config.schedule, "warmup": self.warmup, "total": self.total},
                 "config": self.run_config(), "lorakit_version": lorakit.__version__}
        return save_checkpoint(
            root, step, trainable=self.trainable_state(), optimizer=self.optimizer_state(), state=state,
            rng=self.rng_state(), write_adapter=lambda path: lorakit.save_adapter(self.base, path), keep=self.config.keep,
        )

    def write_outputs(self, result: TrainResult) -> None:
        """The run's results in ``out``: adapter/, metrics.json and training.png."""
        if not self.is_main:
            return
        write_outputs(self.out, self.base, self.task, result, self.run_config())

    def _summary(self, result: TrainResult) -> None:
        self._print(*summary_lines(result, result.peak_gib))


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step")