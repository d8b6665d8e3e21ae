"""`lorakit train` on 1 and 2 GPUs: tokens/s of DDP and FSDP2 against one process (issue 6).

    python benchmarks/gpu_distributed.py          # on a machine with ≥ 2 GPUs (device kind nvidia-h200-x2)

The driver launches, one after another, with torchrun:

    single   1 process, plain Trainer (no wrapper)        the baseline
    ddp-1    1 process, DistributedTrainer --strategy ddp  the wrapper's own overhead
    fsdp-1   1 process, DistributedTrainer --strategy fsdp
    ddp-2    2 processes, DDP                              target: ≥ 1.9× single
    fsdp-2   2 processes, FSDP2 (base and adapters sharded per decoder layer)

Model: the 1.14B Llama-architecture benchmark model of benchmarks/gpu_lora.py (hidden 2048, 16 layers,
intermediate 8192, 16 heads / 8 kv heads, vocab 32000), random init, bfloat16 base, LoRA r = 16 (α 32)
on all 7 projections with float32 adapters, AdamW, --bf16 (autocast; FSDP gathers parameters in
bfloat16 and reduces gradients in float32).  Per process: batch 8 × 2048 random tokens, so the global
batch grows with the GPUs (weak scaling, as data parallelism is used).  This runs the real training
loop (lorakit.train.trainer.Trainer / lorakit.train.distributed.DistributedTrainer); a synthetic task
times each micro-batch from its start (after a CUDA sync) and tokens/s counts every process's tokens
between the start of step WARM and the start of the last step.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): it is set here for every launched process as well.
Writes gpu_distributed.json and gpu_distributed.txt under $OUT (or ./bench_out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

OUT = Path(os.environ.get("OUT") or "bench_out")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [("single", 1, None), ("ddp-1", 1, "ddp"), ("fsdp-1", 1, "fsdp"), ("ddp-2", 2, "ddp"), ("fsdp-2", 2, "fsdp")]


class SyntheticTask:
    """Random-token causal-LM batches; ``loss`` stamps the start of every micro-batch (after a sync)."""

    name = "synthetic"
    tokenizer = None
    default_targets = TARGETS
    modules_to_save: tuple[str, ...] = ()

    def __init__(self, model, n: int, seq: int, seed: int) -> None:
        import torch

        self.model, self.seq = model, seq
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32000, (n, seq), generator=g)
        self.train_examples = list(range(n))
        self.stamps: list[float] = []

    def collate(self, examples):
        import torch

        ids = self.ids[torch.tensor(examples)]
        return {"input_ids": ids, "labels": ids}

    def loss(self, model, batch):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return model(**batch).loss

    def evaluate(self, model):
        return {}

    def fingerprint(self) -> str:
        return f"synthetic{len(self.train_examples)}x{self.seq}"


def llama(device, tiny: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if tiny else \
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
    cfg = LlamaConfig(**size, num_attention_heads=16, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def worker(args: argparse.Namespace) -> None:
    import torch

    import lorakit
    from lorakit.train import distributed as D
    from lorakit.train.config import TrainConfig
    from lorakit.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = D.local_device()
    steps = args.warm + args.steps + 1
    task = SyntheticTask(llama(device, args.tiny), steps * args.batch * world, args.seq, seed=1)
    lora = lorakit.LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=TARGETS)
    config = TrainConfig(lr=1e-5, max_steps=steps, batch_size=args.batch, warmup=0, bf16=device.type == "cuda", log_every=1000)
    out = Path(args.run_dir)
    if args.strategy:
        trainer = D.DistributedTrainer(task, lora, config, out, strategy=args.strategy, log=io.StringIO(), device=device)
    else:
        trainer = Trainer(task, lora, config, out, log=io.StringIO(), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit()
    stamps = task.stamps  # one per micro-batch = one per step here (grad_accum 1)
    sec = stamps[-1] - stamps[args.warm]
    tokens = (len(stamps) - 1 - args.warm) * args.batch * args.seq * world
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if D.is_main():
        row = {"case": args.case, "processes": world, "strategy": args.strategy or "none", "tokens_per_s": tokens / sec,
               "seconds": sec, "tokens": tokens, "peak_GiB_rank0": peak, "batch_per_gpu": f"{args.batch}x{args.seq}",
               "final_loss": trainer_loss(out)}
        Path(args.result).write_text(json.dumps(row) + "\n")
    D.shutdown()


def trainer_loss(out: Path) -> float | None:
    try:
        return json.loads((out / "metrics.json").read_text())["history"]["train"][-1]["loss"]
    except (OSError, KeyError, IndexError, ValueError):
        return None


def driver(args: argparse.Namespace) -> int:
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() or (2 if args.tiny else 0)  # --tiny: a CPU dry run of the whole script
    rows, lines = [], []

    def say(msg: str = "") -> None:
        print(msg, flush=True)
        lines.append(msg)

    say(f"lorakit train, Llama 1.14B (random init), LoRA r=16 on 7 projections, bf16, per GPU {args.batch}×{args.seq} tokens")
    say(f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (--tiny)'} ×{gpus}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for case, nproc, strategy in CASES:
        if nproc > gpus:
            say(f"  {case:8s} skipped: needs {nproc} GPUs, this machine has {gpus}")
            continue
        result = OUT / f"gpu_distributed_{case}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(Path(__file__)),
               "--worker", "--case", case, "--result", str(result), "--run-dir", str(OUT / "runs" / case),
               *(["--tiny"] if args.tiny else []), "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warm", str(args.warm)]
        if strategy:
            cmd += ["--strategy", strategy]
        env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        try:  # a hung launch must not eat the device time of the cases after it
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.case_timeout)
        except subprocess.TimeoutExpired as err:
            say(f"  {case:8s} TIMED OUT after {args.case_timeout} s")
            (OUT / f"gpu_distributed_{case}.stderr.txt").write_text(str(err.stderr or ""))
            continue
        if proc.returncode != 0 or not result.exists():
            say(f"  {case:8s} FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] }")
            (OUT / f"gpu_distributed_{case}.stderr.txt").write_text(proc.stderr)
            continue
        rows.append(json.loads(result.read_text()))
    base = next((r["tokens_per_s"] for r in rows if r["case"] == "single"), None)
    say("")
    say("| case | GPUs | strategy | tokens/s | × single | peak GiB (rank 0) | last loss |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "—"
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "—"
        say(f"| {r['case']} | {r['processes']} | {r['strategy']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_GiB_rank0']:.1f} | {loss} |")
    for r in rows:
        if r["processes"] == 2 and base:
            verdict = "met" if r["tokens_per_s"] / base >= 1.9 else "NOT met"
            say(f"target ≥ 1.9× on 2 GPUs, {r['strategy']}: {verdict} ({r['tokens_per_s'] / base:.2f}×)")
    (OUT / "gpu_distributed.json").write_text(json.dumps({"rows": rows, "gpus": gpus, "torch": torch.__version__}, indent=1))
    (OUT / "gpu_distributed.txt").write_text("\n".join(lines) + "\n")
    return 0 if rows else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", default="single", help=argparse.SUPPRESS)
    p.add_argument("--strategy", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warm", type=int, default=3, help="untimed steps first")
    p.add_argument("--case-timeout", type=float, default=240, help="seconds one launch may take")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: checks the script, measures nothing")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
