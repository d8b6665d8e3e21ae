"""Training on many processes through torch.distributed: torchrun, DDP and FSDP2.

Launch::

    torchrun --nproc_per_node N -m lorakit train ... --strategy ddp|fsdp

Every process builds the same task and model, then :class:`DistributedTrainer` (a
:class:`~lorakit.train.trainer.Trainer`) changes exactly the loop's seams:

* **data** — step ``t`` of the run takes the next ``batch_size · world_size · grad_accum`` examples
  of the epoch's seeded permutation (the same permutation a single process uses).  :func:`shard_step`
  cuts them into the micro-steps a single process with ``batch_size · world_size`` would use and
  gives each rank a contiguous part of each.  So the global batch is per-rank batch × world size ×
  grad-accum, the data position stays the global pair (epoch, index), and a 2-process run gives the
  adapter of a 1-process run with twice the batch (up to float summation order) whenever the task's
  loss is a mean over examples.  Tasks whose loss couples the examples of a micro-batch (the
  embedding tasks' in-batch negatives, causal-lm's token-weighted mean) see per-rank batches.
* **gradients** — each micro-batch's loss is weighted by ``its examples × world_size / step
  examples``; DDP and FSDP average over ranks, which makes the sum the global example-weighted mean
  even when the last step of an epoch gives ranks unequal shares.  A rank whose share of a micro-step
  is empty runs a :class:`Padding` batch (one real example weighted 0) so every rank issues the same
  collectives.  Only adapter parameters (and ``modules_to_save``) require gradients, so only they are
  reduced and only they have optimizer state.
* **wrapping** — DDP with ``static_graph=True``: adapters on modules the loss never reaches and
  activation checkpointing (reentrant or not) work without ``find_unused_parameters``; buffers are
  not re-broadcast, so a task may call the model a different number of times on each rank.  FSDP2
  (``fully_shard``) shards every transformer block (the model's ``_no_split_modules``; every LoRA
  layer for other models) and then the root: frozen base weights and adapters alike.  FSDP needs
  the same model calls on every rank, which the embedding tasks do not make (refused with a reason).
* **saving** — only rank 0 writes and prints.  Under FSDP every rank gathers the adapter's full
  tensors (``DTensor.full_tensor``) and rank 0 writes them with :func:`lorakit.save_adapter`, so
  the files are exactly a single-process run's format.  Checkpoints hold full trainable tensors, the
  full optimizer state and every rank's RNG state; a checkpoint from any world size has the same
  layout as a single-process one.
* **failures** — the process group has a timeout (``--dist-timeout``); ranks check at start that
  they agree on the run; a checkpoint from another world size is refused unless ``--force``; a
  non-finite loss on one rank skips the step on every rank.

Why a Trainer subclass rather than a flag inside the loop: the single-process loop stays readable
and testable without a process group, and everything distributed is in this one file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, LorakitError
from .checkpoint import Checkpoint, CheckpointError, capture_rng
from .config import TrainConfig
from .task import Task
from .trainer import Trainer

STRATEGIES = ("ddp", "fsdp")
#: tasks whose loss calls the model a data-dependent number of times (length-chunked encoding)
_VARIABLE_CALLS = ("embedding", "code-search")
#: seconds a collective (or the start-up rendezvous) may wait for the other ranks
DEFAULT_TIMEOUT = 600.0


class DistributedError(LorakitError, RuntimeError):
    """The processes of a distributed run cannot work together (timeout, disagreement, bad launch)."""


# -- process group ------------------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process saves files and prints (rank 0)."""
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(timeout: float = DEFAULT_TIMEOUT) -> None:
    """Join the run torchrun started (env://): NCCL on GPUs, gloo on CPUs; no-op if already joined.

    ``timeout`` bounds the wait for the other ranks at start-up and in every later collective, so a
    rank that never arrives (crashed, another command line, a node that cannot connect) ends the run
    with an error instead of a hang.

    Raises:
        DistributedError: not launched by torchrun, or the other ranks did not join within ``timeout``.
    """
    if dist.is_initialized():
        return
    if not launched():
        raise DistributedError(
            "--strategy needs one process per GPU started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
            "are not set); launch with `torchrun --nproc_per_node N -m lorakit train ... --strategy ddp`, or drop "
            "--strategy to train in this one process"
        )
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, TimeoutError, ValueError) as err:  # DistStoreError is a RuntimeError
        raise DistributedError(
            f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: the other processes did not join at {where} "
            f"within {timeout:g} s ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check that every "
            "node runs the same torchrun command (same --nnodes, --nproc_per_node, --rdzv-endpoint) and can reach "
            "the others, or raise --dist-timeout"
        ) from None


# what gloo and NCCL say when another process is gone or a collective waited too long
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "end of file", "socket closed", "remote process exited")
_TIMED_OUT = ("timed out", "timeout", "watchdog")


def communication_failure(err: BaseException, timeout: float) -> str | None:
    """One sentence on what a failed collective means, or None if ``err`` is not a communication failure."""
    text = str(err)
    low = text.lower()
    is_dist = isinstance(err, dist.DistError) or any(w in low for w in ("gloo", "nccl", "processgroup", "c10d"))
    first = re.sub(r"^\[[^\]]*\]\s*", "", (text.strip().splitlines() or [""])[0])  # gloo's "[file.cc:553] "
    first = first.split(". ")[0][:200]
    if any(w in low for w in _PEER_GONE) and (is_dist or "peer" in low):
        return (f"another process of the run stopped during training ({first}); see its own error above, fix it and "
                "continue with --resume from the last checkpoint")
    if any(w in low for w in _TIMED_OUT) and is_dist:
        return (f"a collective waited more than --dist-timeout {timeout:g} s for the other processes ({first}); one is "
                "stuck or much slower (raise --dist-timeout if it is only slow), continue with --resume from the last "
                "checkpoint")
    if isinstance(err, dist.DistError):
        return f"the communication between the processes failed during training ({first}); continue with --resume"
    return None


def shutdown() -> None:
    """Leave the process group (if joined), so the launcher sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        # A trainer that failed may sit in a reference cycle with its DDP wrapper; collect it while the
        # process group still exists, or its communication thread is torn down at interpreter exit and
        # the process aborts ("terminate called without an active exception") after a clean error.
        gc.collect()
        dist.destroy_process_group()


# -- the sampler ---------------------------------------------------------------------------------------


class Padding(list):
    """A micro-batch that only keeps this rank in step with the others: it holds one real example
    (so the model runs and every collective is issued) but counts for none."""


class ShardedStep(list):
    """One rank's micro-batches of one optimizer step; ``total`` = the step's examples over all ranks."""

    def __init__(self, micro: list[list[int]], total: int) -> None:
        super().__init__(micro)
        self.total = total


def shard_step(take: Sequence[int], batch_size: int, world: int, rank: int) -> ShardedStep:
    """Rank ``rank``'s micro-batches of the optimizer step whose examples are ``take``.

    ``take`` (at most ``batch_size · world · grad_accum`` consecutive indices of the epoch's
    permutation) is cut into micro-steps of ``batch_size · world`` — the micro-batches one process
    with batch size ``batch_size · world`` would use — and micro-step ``j`` is split into ``world``
    contiguous parts whose sizes differ by at most one, part ``r`` going to rank ``r``.  Every rank
    gets the same number of micro-batches; an empty part becomes a :class:`Padding` batch.

    Example: take = [0..9], batch 2, world 2 → micro-steps [0..3], [4..7], [8, 9];
    rank 0 gets [0, 1], [4, 5], [8]; rank 1 gets [2, 3], [6, 7], [9].
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    width = batch_size * world
    micro: list[list[int]] = []
    for start in range(0, len(take), width):
        chunk = list(take[start : start + width])
        q, rem = divmod(len(chunk), world)
        lo = rank * q + min(rank, rem)
        part = chunk[lo : lo + q + (rank < rem)]
        micro.append(part if part else Padding(chunk[:1]))
    return ShardedStep(micro, len(take))


# -- wrapping ------------------------------------------------------------------------------------------


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: transformer blocks (by the model's ``_no_split_modules``),
    else every LoRA layer and ``modules_to_save`` copy."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if units:
        return units
    from ..inject import lora_modules

    return [m for _, m in lora_modules(model)]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the adapter parameters (frozen ones are not reduced: DDP skips requires_grad=False).

    ``static_graph=True`` records in the first step which parameters the loss reaches and in what
    order, so adapters the loss never uses (PEFT's "unused parameters" failure) and reentrant
    activation checkpointing ("marked ready twice") both work without ``find_unused_parameters``.
    ``broadcast_buffers=False``: buffers (position ids, rotary frequencies) are equal on every rank
    already, and broadcasting them at every forward would hang a task that calls the model a
    different number of times on different ranks (the embedding tasks encode in length chunks).
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model.to(device), device_ids=[device.index] if device.type == "cuda" else None, static_graph=True,
        broadcast_buffers=False
    )


def wrap_fsdp(model: nn.Module, device: torch.device, *, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard each transformer block, then the root (frozen base and adapters alike).

    FSDP2 keeps parameters as ``DTensor`` shards (dim 0 over the ranks) and all-gathers a block's
    parameters just before its forward/backward, so requires_grad may differ within a block.  With
    ``param_dtype`` (bfloat16 on GPUs) parameters are gathered and used in that dtype and gradients
    reduced in float32; this also lets a bfloat16 base and float32 adapters share one block.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    units = _fsdp_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # moves every shard to the mesh's device
    # FSDP2 creates each block's gathered parameters at its first gather and reuses them after; created
    # inside torch.inference_mode (an evaluation before training) they would be inference tensors that
    # training cannot refill.  So gather once now, in normal mode.
    for unit in (*units, model):
        unit.unshard()
        unit.reshard()
    return model


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a sharded DTensor; ``t`` itself otherwise)."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like`` (sharded the same way if ``like`` is a DTensor)."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


# -- the trainer ---------------------------------------------------------------------------------------


class DistributedTrainer(Trainer):
    """A :class:`~lorakit.train.trainer.Trainer` on every process of a torchrun launch.

    Args:
        strategy: "ddp" (the model fits on one GPU) or "fsdp" (FSDP2: shard base and adapters).
        timeout: seconds any collective may wait for the other ranks.
        Other arguments as for :class:`Trainer`; ``config.batch_size`` is per rank.
    """

    def __init__(
        self,
        task: Task,
        lora: LoraConfig,
        config: TrainConfig,
        out: str | Path,
        *,
        strategy: str = "ddp",
        timeout: float = DEFAULT_TIMEOUT,
        extra: dict[str, Any] | None = None,
        log: TextIO | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "fsdp" and task.name in _VARIABLE_CALLS:
            raise ConfigError(
                f"--strategy fsdp cannot train --task {task.name} yet: it encodes each batch in a number of model calls "
                "that differs between processes, and FSDP needs the same gathers on every process; use --strategy ddp"
            )
        if not 0 < timeout < float("inf"):
            raise ConfigError(f"--dist-timeout must be a number of seconds > 0, got {timeout}")
        init_process_group(timeout)
        self.strategy, self.rank, self.world_size, self.timeout = strategy, rank(), world_size(), timeout
        self._gathered: dict[str, Any] | None = None
        extra = dict(extra or {})
        if self.world_size > 1:  # compared on resume (see check_resume); absent for 1 process, as in Trainer
            extra["world_size"] = self.world_size
        super().__init__(task, lora, config, out, extra=extra, log=log, device=device or local_device())
        if self.rank > 0:  # same LoRA init everywhere (seeded in Trainer), different dropout masks per rank
            _reseed(config.seed, self.rank)

    def fit(self, resume: Checkpoint | None = None, *, force: bool = False) -> Any:
        """:meth:`Trainer.fit`; a failure of the communication during the run (a peer died, a collective
        timed out) ends it with a :class:`DistributedError` naming this rank and what happened."""
        try:
            return super().fit(resume, force=force)
        except RuntimeError as err:
            what = communication_failure(err, self.timeout)
            if what is None:
                raise
            raise DistributedError(f"rank {self.rank} of {self.world_size}: {what}") from None

    # -- seams of the loop -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        self._check_agreement(model)
        if self.strategy == "fsdp":
            return wrap_fsdp(model, self.device, param_dtype=self.amp_dtype)
        return wrap_ddp(model, self.device)

    def step_indices(self, epoch: int, index: int) -> tuple[list[list[int]], int, int]:
        micro, epoch, index = super().step_indices(epoch, index)  # the global step, cut for one process
        take = [i for m in micro for i in m]
        return shard_step(take, self.config.batch_size, self.world_size, self.rank), epoch, index

    def step_examples(self, micro: list[list[int]]) -> int:
        return micro.total if isinstance(micro, ShardedStep) else super().step_examples(micro)

    def examples_in(self, ids: list[int]) -> int:
        return 0 if isinstance(ids, Padding) else len(ids)

    @contextlib.contextmanager
    def grad_sync(self, last: bool) -> Iterator[None]:
        """FSDP reduces gradients on a step's last micro-batch only.  DDP reduces after every
        micro-batch: its static graph must see a synchronised backward before any ``no_sync`` (torch
        asserts otherwise), which would make the first step after a resume sum in another order than
        the uninterrupted run (no bit-exact resume) — and an adapter's gradients are small."""
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        yield

    def mean_over_processes(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)  # SUM: gloo has no AVG
        return float(t) / self.world_size

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self._gathered is not None:
            return self._gathered["trainable"]
        return super().trainable_state()

    def optimizer_state(self) -> dict[str, Any]:
        if self._gathered is not None:
            return self._gathered["optimizer"]
        return super().optimizer_state()

    def rng_state(self) -> dict[str, Any]:
        if self._gathered is not None:
            return self._gathered["rng"]
        return super().rng_state()

    # -- saving: every rank gathers, rank 0 writes ---------------------------------------------------
    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[dict[str, torch.Tensor]]:
        """Full trainable tensors, by name, on every rank; on rank 0 they also stand in the model for
        the duration (so :func:`lorakit.save_adapter` writes whole tensors).  A collective."""
        full = {name: full_tensor(p.detach()) for name, p in self.params}
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        if self.is_main and self.strategy == "fsdp":
            for name, t in full.items():
                owner_name, _, leaf = name.rpartition(".")
                owner = self.base.get_submodule(owner_name)
                swapped.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        try:
            yield full
        finally:
            for owner, leaf, original in swapped:
                owner._parameters[leaf] = original

    def _full_optimizer_state(self) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every sharded state tensor gathered (same order on every rank)."""
        sd = self.optimizer.state_dict()
        state = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in sorted(s.items())}
                 for i, s in sorted(sd["state"].items())}
        return {**sd, "state": state}

    def _all_rng(self) -> dict[str, Any]:
        """Rank 0's generators (what a single-process resume restores) plus every rank's under "ranks"."""
        mine = capture_rng()
        every: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, every, dst=0)
        return {**mine, "ranks": every} if self.is_main else mine

    def save(self, root: Path, step: int, epoch: int, index: int, skipped: int, history: dict[str, Any]) -> Path | None:
        with self.full_parameters() as full:
            self._gathered = {"trainable": full, "optimizer": self._full_optimizer_state(), "rng": self._all_rng()}
            try:
                return super().save(root, step, epoch, index, skipped, history)
            finally:
                self._gathered = None

    def write_outputs(self, result: Any) -> None:
        with self.full_parameters():
            super().write_outputs(result)

    # -- resuming ---------------------------------------------------------------------------------
    def check_resume(self, ckpt: Checkpoint, force: bool) -> None:
        saved = int(ckpt.state.get("config", {}).get("world_size", 1))
        if saved != self.world_size and not force:
            b, a = self.config.batch_size, self.config.grad_accum
            raise CheckpointError(
                f"{ckpt.path} was written by a run of {saved} process(es), this run has {self.world_size}: the global "
                f"batch would change from {b}×{saved}×{a} to {b}×{self.world_size}×{a} examples per step; relaunch "
                f"with {saved} process(es) in all (torchrun --nnodes × --nproc_per_node), or pass --force to continue "
                "from the same data position with the new world size (adjust --batch-size/--grad-accum to keep the "
                "global batch)"
            )
        super().check_resume(ckpt, force)

    def restore(self, ckpt: Checkpoint) -> None:
        params = dict(self.params)
        trainable = {n: shard_like(t, params[n]) if n in params and t.shape == params[n].shape else t
                     for n, t in ckpt.trainable.items()}
        optimizer = ckpt.optimizer
        if self.strategy == "fsdp":
            ordered = [p for _, p in self.params]  # optimizer.state_dict() numbers parameters in this order
            state = {i: {k: shard_like(v, ordered[int(i)]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                         for k, v in s.items()} for i, s in ckpt.optimizer["state"].items()}
            optimizer = {**ckpt.optimizer, "state": state}
        ranks = ckpt.rng.get("ranks")
        exact = isinstance(ranks, list) and len(ranks) == self.world_size
        rng = ranks[self.rank] if exact else {k: v for k, v in ckpt.rng.items() if k != "ranks"}
        super().restore(dataclasses.replace(ckpt, trainable=trainable, optimizer=optimizer, rng=rng))
        if not exact and self.rank > 0:  # another world size (--force): fresh, distinct generators per rank
            _reseed(self.config.seed + int(ckpt.state["step"]), self.rank)

    # -- agreement -------------------------------------------------------------------------------
    def _check_agreement(self, model: nn.Module) -> None:
        """Every rank must train the same thing; a difference (another data file on one node, another
        command line) is found here, on every rank, instead of as a hang or a silent divergence."""
        run = self.run_config()  # not its extra facts: model and data paths may differ between nodes
        facts = {
            "task": run["task"],
            "data (fingerprint)": run["data"],
            "number of training examples": len(self.task.train_examples),
            "LoRA settings": run["lora"],
            "training options": run["train"],
            "trainable parameters": [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad],
            "strategy": self.strategy,
        }
        # plain values are exchanged as they are (to show them), structures as digests
        mine = {k: v if isinstance(v, (str, int)) else hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
                for k, v in facts.items()}
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        for key in facts:
            values = [e[key] for e in every]
            odd = [r for r, v in enumerate(values) if v != values[0]]
            if odd:
                shown = f" ({values[0]!r} on rank 0, {values[odd[0]]!r} on rank {odd[0]})" if isinstance(facts[key], (str, int)) else ""
                raise DistributedError(
                    f"the ranks disagree on the {key}{shown}: rank(s) {odd} differ from rank 0; every process must run "
                    "the same command on the same data and model (check the files on every node)"
                )


def _reseed(seed: int, rank: int) -> None:
    """Distinct, reproducible generators for rank ``rank`` > 0 (dropout masks must differ across ranks)."""
    derived = (seed * 1_000_003 + rank * 7_919) % 2**63
    torch.manual_seed(derived)
    random.seed(derived)

