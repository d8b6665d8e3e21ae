"""Distributed training on CPU (gloo, 2 processes under torchrun): DDP and FSDP2 against one process.

Each launch runs this file as the worker (``torchrun tests/test_distributed.py MODE OUT``); the tests
compare what rank 0 wrote with a single-process run computed here.  Tolerance for "same adapter":
float32, rtol 1e-5 / atol 1e-6 (the processes' gradients are summed in another order than one
process sums its batch; observed differences are ~1e-8).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint
from lorakit.train.distributed import Padding, shard_step
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer
from tiny_models import ToyTask, make_llama

TESTS = Path(__file__).parent
RTOL, ATOL = 1e-5, 1e-6
N = 37  # 4 steps of 8 and a short one of 5: its second micro-step has 1 example, so rank 1 pads


# -- tasks the workers train ---------------------------------------------------------------------------


class CheckpointedNet(nn.Module):
    """inp → (activation-checkpointed) block → out, plus a LoRA-adapted layer the loss never uses."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp, self.block, self.unused, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))  # (B, 16); requires grad through inp's adapter, so reentrant checkpointing works
        if self.reentrant is None or not torch.is_grad_enabled():  # evaluation: nothing to recompute
            h = torch.tanh(self.block(h))
        else:
            h = checkpoint(lambda t: torch.tanh(self.block(t)), h, use_reentrant=self.reentrant)
        return self.out(h)


class CheckpointedTask(ToyTask):
    default_targets = ("inp", "block", "unused", "out")

    def __init__(self, n: int, reentrant: bool | None) -> None:
        super().__init__(n)
        torch.manual_seed(0)
        self.model = CheckpointedNet(reentrant)


class InferenceEvalTask(ToyTask):
    """Evaluates under torch.inference_mode, as the embedding task does (FSDP2 must not keep inference tensors)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            return super().evaluate(model)


def make_task(kind: str, n: int) -> ToyTask:
    if kind == "toy":
        return ToyTask(n)
    if kind == "head":
        return InferenceEvalTask(n)
    return CheckpointedTask(n, {"ac-none": None, "ac-reentrant": True, "ac-plain": False}[kind])


def train(kind: str, out: Path, *, strategy: str | None, batch_size: int, resume: bool = False, force: bool = False,
          n: int = N, **config) -> object:
    """One run; ``strategy`` None is the single-process Trainer."""
    task = make_task(kind, n)
    # "head": LoRA on the first linear, the last one trained whole (modules_to_save, as a classifier head);
    # evaluated under inference_mode
    targets, whole = (("0",), ("2",)) if kind == "head" else (task.default_targets, ())
    lora = lorakit.LoraConfig(r=4, alpha=8, dropout=config.pop("dropout", 0.0), target_modules=targets, modules_to_save=whole)
    cfg = TrainConfig(**{"max_steps": 10, "lr": 1e-2, "grad_accum": 2, "batch_size": batch_size, **config})
    if strategy is None:
        trainer = Trainer(task, lora, cfg, out, log=io.StringIO(), device="cpu")
    else:
        from lorakit.train.distributed import DistributedTrainer

        trainer = DistributedTrainer(task, lora, cfg, out, strategy=strategy, timeout=60, log=io.StringIO())
    return trainer.fit(load_checkpoint(out) if resume else None, force=force)


# -- the worker (run by torchrun) ----------------------------------------------------------------------


def worker(mode: str, out: Path) -> None:
    import torch.distributed as dist

    from lorakit.errors import LorakitError
    from lorakit.train import distributed as D

    rank = int(os.environ["RANK"])  # also before the process group exists
    if mode == "train":
        # same adapter as one process: per-rank batch 2 × 2 ranks × accum 2 == batch 4 × accum 2
        for strategy in ("ddp", "fsdp"):
            for kind in ("toy", "head", "ac-none", "ac-reentrant", "ac-plain"):
                train(kind, out / f"{strategy}-{kind}", strategy=strategy, batch_size=2)
        # resume: straight 10 steps == 3 steps + a new trainer resuming (dropout on, so every rank's RNG matters)
        for strategy in ("ddp", "fsdp"):
            straight, part = out / f"{strategy}-straight", out / f"{strategy}-part"
            train("toy", straight, strategy=strategy, batch_size=2, save_every=3, keep=0, dropout=0.1)
            if D.is_main():
                first = list_checkpoints(straight / "checkpoints")[0]
                (part / "checkpoints").mkdir(parents=True)
                first.rename(part / "checkpoints" / first.name)
            dist.barrier()
            train("toy", part, strategy=strategy, batch_size=2, save_every=3, keep=0, dropout=0.1, resume=True)
        # the embedding task calls the model once per length chunk: a different number of times per rank
        from lorakit.train import embedding as emb

        words = "open read join sort parse compute sleep write close seek list dict set map filter reduce".split()
        pairs = [emb.EmbeddingPair(" ".join(words[i % 16 : i % 16 + 1 + i % 5]) + f" {i}", f"fn_{i}(x, y)") for i in range(24)]
        model, tokenizer = emb.load_encoder(out / "tiny-bert")
        task = emb.EmbeddingTask(model, tokenizer, pairs, pairs[:4], max_length=12, chunk_tokens=24)
        trainer = D.DistributedTrainer(task, lorakit.LoraConfig(r=4, alpha=8, target_modules=task.default_targets),
                                       TrainConfig(max_steps=4, lr=1e-3, batch_size=4), out / "ddp-embedding", timeout=60,
                                       log=io.StringIO())
        result = trainer.fit()
        total = sum(float(p.double().sum()) for _, p in trainer.params)
        (out / f"embedding-rank{rank}.json").write_text(json.dumps({"params": total, "loss": result.history["train"][-1]["loss"]}))
    elif mode.startswith("errors:"):  # each scenario must stop every rank at the same point; the message goes to a file
        scenarios = {
            # rank 1 has one more training example than rank 0
            "disagree": lambda: train("toy", out / "disagree", strategy="ddp", batch_size=2, n=N + rank),
            # a single-process checkpoint resumed by 2 processes without --force
            "world": lambda: train("toy", out / "single", strategy="ddp", batch_size=2, resume=True),
            # example 5 is NaN: only the rank that draws it sees a NaN loss
            "nan": lambda: D.DistributedTrainer(
                ToyTask(N, poison=frozenset({5})), lorakit.LoraConfig(r=4, alpha=8, target_modules=ToyTask.default_targets),
                TrainConfig(max_steps=10, lr=1e-2, batch_size=2, max_bad_steps=1), out / "nan", strategy="ddp", timeout=60,
                log=io.StringIO()).fit(),
        }
        name = mode.split(":", 1)[1]
        try:
            scenarios[name]()
            message = "no error"
        except LorakitError as err:
            message = f"{type(err).__name__}: {err}"
        (out / f"{name}-rank{rank}.txt").write_text(message)
    elif mode == "crash":  # rank 1 dies in the middle of training
        if rank == 1:
            ToyTask.loss = lambda self, model, batch: os._exit(3)  # type: ignore[method-assign]
        train("toy", out, strategy="ddp", batch_size=2)
    D.shutdown()


# -- helpers -------------------------------------------------------------------------------------------


def make_tiny_bert(path: Path) -> None:
    """A random 2-layer BERT with the installed MiniLM tokenizer (as tests/test_embedding.py builds it)."""
    import transformers

    from lorakit.train import embedding as emb

    tokenizer = transformers.AutoTokenizer.from_pretrained(emb.default_model_dir())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def torchrun(mode: str, out: Path, *args: str, module: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    target = ["-m", "lorakit", *args] if module else [str(Path(__file__)), mode, str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, *, exact: bool = False) -> None:
    """Same files, byte for byte in everything but float rounding: config bytes, metadata, keys, dtypes, shapes."""
    assert (a / "adapter" / "adapter_config.json").read_bytes() == (b / "adapter" / "adapter_config.json").read_bytes()
    with safe_open(str(a / "adapter" / "adapter_model.safetensors"), "pt") as fa, \
            safe_open(str(b / "adapter" / "adapter_model.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata()
    ta, tb = adapter(a), adapter(b)
    assert list(ta) == list(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
        if exact:
            assert torch.equal(ta[key], tb[key]), key
        else:
            torch.testing.assert_close(ta[key], tb[key], rtol=RTOL, atol=ATOL, msg=key)


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / "metrics.json").read_text())["history"]["train"]]


# -- the sampler ---------------------------------------------------------------------------------------


def test_shard_step_hand_example() -> None:
    take = list(range(10))
    assert shard_step(take, 2, 2, 0) == [[0, 1], [4, 5], [8]]
    assert shard_step(take, 2, 2, 1) == [[2, 3], [6, 7], [9]]
    last = [shard_step([7, 3, 9], 2, 2, r) for r in (0, 1)]  # micro-steps [7, 3, 9, -] → 2 + 1
    assert last == [[[7, 3]], [[9]]]
    padded = shard_step([7], 1, 2, 1)  # one example for two ranks: rank 1 runs it with weight 0
    assert padded == [[7]] and isinstance(padded[0], Padding) and padded.total == 1


@pytest.mark.parametrize("n, batch, world", [(37, 2, 2), (5, 3, 4), (16, 1, 3), (1, 2, 2)])
def test_shard_step_is_one_process_micro_batches_split(n: int, batch: int, world: int) -> None:
    """Concatenating the ranks' parts of micro-step j gives one process's micro-batch j (batch × world)."""
    take = list(range(100, 100 + n))
    shards = [shard_step(take, batch, world, r) for r in range(world)]
    width = batch * world
    single = [take[i : i + width] for i in range(0, n, width)]
    assert {len(s) for s in shards} == {len(single)}  # every rank: the same number of micro-batches
    for j, expected in enumerate(single):
        parts = [s[j] for s in shards]
        assert [i for p in parts if not isinstance(p, Padding) for i in p] == expected
        assert max(map(len, parts)) - min(len(p) for p in parts if not isinstance(p, Padding)) <= 1
        assert all(len(p) == 1 and p[0] in expected for p in parts if isinstance(p, Padding))
    assert all(s.total == n for s in shards)


# -- against one process -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    make_tiny_bert(out / "tiny-bert")
    proc = torchrun("train", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for kind in ("toy", "head", "ac-none", "ac-reentrant", "ac-plain"):
        train(kind, out / f"single-{kind}", strategy=None, batch_size=4)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_one_process_adapter(trained: Path, strategy: str) -> None:
    """10 steps over 37 examples (short last step, padded micro-batch, two epochs), grad accumulation 2."""
    assert_same_adapter(trained / "single-toy", trained / f"{strategy}-toy")
    assert losses(trained / f"{strategy}-toy") == pytest.approx(losses(trained / "single-toy"), rel=1e-6)
    assert not torch.equal(adapter(trained / "single-toy")["base_model.model.2.lora_B.weight"], torch.zeros(1, 4))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_modules_to_save_are_gathered_whole(trained: Path, strategy: str) -> None:
    assert_same_adapter(trained / "single-head", trained / f"{strategy}-head")
    tensors = adapter(trained / f"{strategy}-head")
    assert tensors["base_model.model.2.weight"].shape == (1, 16) and tensors["base_model.model.2.bias"].shape == (1,)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["ac-none", "ac-reentrant", "ac-plain"])
def test_unused_adapter_and_activation_checkpointing(trained: Path, strategy: str, kind: str) -> None:
    """An adapter the loss never reaches and checkpointed blocks: no DDP/FSDP error, the same adapter."""
    assert_same_adapter(trained / f"single-{kind}", trained / f"{strategy}-{kind}")
    tensors = adapter(trained / f"{strategy}-{kind}")
    assert torch.equal(tensors["base_model.model.unused.lora_B.weight"], torch.zeros(16, 4))  # never trained
    assert tensors["base_model.model.block.lora_B.weight"].abs().sum() > 0  # trained through the checkpoint


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_across_processes_is_exact(trained: Path, strategy: str) -> None:
    """Straight 10 steps == 3 steps, then a new 2-process trainer resuming from the checkpoint (dropout on)."""
    assert_same_adapter(trained / f"{strategy}-straight", trained / f"{strategy}-part", exact=True)
    assert losses(trained / f"{strategy}-straight") == losses(trained / f"{strategy}-part")
    ckpt = load_checkpoint(trained / f"{strategy}-straight")  # full tensors in the single-process layout + every rank's RNG
    assert len(ckpt.rng["ranks"]) == 2 and ckpt.state["config"]["world_size"] == 2
    task = ToyTask(N)
    one = Trainer(task, lorakit.LoraConfig(r=4, alpha=8, target_modules=task.default_targets), TrainConfig(), trained / "unused",
                  log=io.StringIO(), device="cpu").trainable_state()
    assert {n: t.shape for n, t in ckpt.trainable.items()} == {n: t.shape for n, t in one.items()}
    assert set(ckpt.optimizer["state"]) == set(range(len(one)))
    assert all(s["exp_avg"].shape == t.shape for s, t in zip(ckpt.optimizer["state"].values(), one.values()))


def test_a_two_process_checkpoint_resumes_on_one_process_with_force(trained: Path, tmp_path: Path) -> None:
    ckpt = list_checkpoints(trained / "ddp-straight" / "checkpoints")[0]
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name)
    with pytest.raises(lorakit.LorakitError, match="world_size: checkpoint 2.*--force"):
        train("toy", tmp_path, strategy=None, batch_size=4, resume=True, dropout=0.1, save_every=3, keep=0)
    result = train("toy", tmp_path, strategy=None, batch_size=4, resume=True, force=True, dropout=0.1, save_every=3, keep=0)
    assert result.steps == 10


def test_ddp_trains_the_embedding_task(trained: Path) -> None:
    """A varying number of model calls per rank (length chunks): DDP keeps the ranks' adapters equal."""
    a, b = (json.loads((trained / f"embedding-rank{r}.json").read_text()) for r in (0, 1))
    assert a == b and all(map(math.isfinite, a.values()))
    assert (trained / "ddp-embedding" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_refuses_the_embedding_tasks() -> None:
    from lorakit.train.distributed import DistributedTrainer

    with pytest.raises(lorakit.ConfigError, match="--strategy fsdp cannot train --task code-search yet.*--strategy ddp"):
        DistributedTrainer(types.SimpleNamespace(name="code-search"), lorakit.LoraConfig(r=4), TrainConfig(), "unused",
                           strategy="fsdp")


def test_fsdp_cli_on_a_llama_matches_one_process(tmp_path: Path) -> None:
    """`torchrun -m lorakit train --strategy fsdp` shards each decoder layer and writes full tensors; its
    layers are checkpointed with offloading (the FSDP gathers stay outside the recomputed forward).

    All examples have the same length, so causal-lm's token-mean equals the example-mean and a
    per-rank batch of 2 on 2 ranks is one batch of 4."""
    model = make_llama(tmp_path / "llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i:03d}: {'abcdefgh'[i % 8] * 6}"}) + "\n" for i in range(30)))
    common = ["train", "--task", "causal-lm", "--model", str(model), "--data", str(data), "--max-steps", "3", "--dropout", "0",
              "--lr", "1e-3", "--targets", "all-linear", "--seed", "1"]
    proc = torchrun("", tmp_path, *common, "--batch-size", "2", "--strategy", "fsdp", "--out", str(tmp_path / "fsdp"),
                    "--checkpointing", "offload", module=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports
    from lorakit.cli import main

    assert main([*common, "--batch-size", "4", "--out", str(tmp_path / "single")]) == 0
    assert_same_adapter(tmp_path / "single", tmp_path / "fsdp")
    a = adapter(tmp_path / "fsdp")
    assert len(a) == 2 * 7 * 2 and all(t.numel() > 0 for t in a.values())  # 2 layers × 7 linears × A, B: whole


# -- failures end every rank ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    out = tmp_path_factory.mktemp("errors")
    train("toy", out / "single", strategy=None, batch_size=4, max_steps=3, save_every=3)
    # one launch per scenario, as in real use: a run that failed is not continued in the same process group
    for name in ("disagree", "world", "nan"):
        proc = torchrun(f"errors:{name}", out)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [(out / f"{name}-rank{r}.txt").read_text() for r in (0, 1)] for name in ("disagree", "world", "nan")}


def test_ranks_that_disagree_all_stop_with_the_reason(errors: dict[str, list[str]]) -> None:
    for message in errors["disagree"]:
        assert message.startswith("DistributedError: the ranks disagree on the data (fingerprint) ('toy37' on rank 0, "
                                  "'toy38' on rank 1)"), message


def test_other_world_size_on_resume_needs_force(errors: dict[str, list[str]]) -> None:
    for message in errors["world"]:
        assert "written by a run of 1 process(es), this run has 2" in message and "--force" in message, message


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(errors: dict[str, list[str]]) -> None:
    a, b = errors["nan"]
    assert a == b and a.startswith("TrainingError: stopped at step "), (a, b)


def test_a_crashing_rank_ends_the_launch(tmp_path: Path) -> None:
    proc = torchrun("crash", tmp_path, timeout=90)  # a hang would raise TimeoutExpired
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]


def test_a_rank_that_never_joins_times_out_with_a_message() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    code = "from lorakit.train.distributed import init_process_group as i; i(timeout=2)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DistributedError: rank 0 of 2: the other processes did not join" in proc.stderr
    assert "within 2 s" in proc.stderr and "--dist-timeout" in proc.stderr


def test_strategy_without_torchrun_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train.distributed import DistributedError, init_process_group

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DistributedError, match="torchrun --nproc_per_node N -m lorakit train"):
        init_process_group()


if __name__ == "__main__":  # the worker: torchrun tests/test_distributed.py MODE OUT
    from lorakit.errors import LorakitError
    from lorakit.train.distributed import rank

    try:
        worker(sys.argv[1], Path(sys.argv[2]))
    except LorakitError as err:
        print(f"rank {rank()}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
