"""transformers' Trainer + lorakit vs Trainer + PEFT: LoRA training throughput and peak memory, H200.

    python benchmarks/gpu_trainer.py          # GPU: writes gpu_trainer.json and gpu_trainer.txt under $OUT (./out)
    python benchmarks/gpu_trainer.py --tiny   # a tiny Llama on the CPU: checks the script end to end in seconds

The model is gpu_lora.py's 1.14B Llama architecture (hidden 2048, 16 layers, vocab 32000), random
weights in bf16, LoRA r=16, α=32 on all 7 projections, no dropout; ``Trainer`` with ``bf16=True``,
AdamW, no gradient checkpointing.  Contenders, each at batch 1×2048 and 8×2048:

  peft            get_peft_model(model, peft.LoraConfig(...))   PEFT's defaults (fp32 adapters under autocast)
  lorakit         lorakit.integrations.hf.get_lora_model(...)   inject + share_inputs + fuse_mlps (the default)
  lorakit_plain   the same with share=False, fuse=False         plain inject
  lorakit_compiled  lorakit + TrainingArguments(torch_compile=True)  (not run unless named in --contenders)

Per case: a warm-up ``trainer.train()`` of a few steps (allocator, cuBLAS and Triton autotuning), then a
fresh Trainer on the same model times ``steps`` steps.  Tokens/s are the Trainer's own figure,
``train_samples_per_second`` × sequence length (its ``train_runtime`` covers the whole ``train()`` call);
``steady`` is the rate between the end of the timed run's first step and its last (a callback with CUDA
synchronisation), peak memory is ``torch.cuda.max_memory_allocated`` over the timed run.  Cases left when
the time budget (``--budget`` seconds, default 150) is spent are skipped and listed as skipped; a case
that raises (an OOM, say) is listed as failed with its error, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

import lorakit  # noqa: E402
from lorakit.integrations.hf import get_lora_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ("peft", "lorakit", "lorakit_plain", "lorakit_compiled")
DEFAULT_CONTENDERS = CONTENDERS[:3]  # compiling the 1.14B model takes minutes: opt in with --contenders
lines: list[str] = []


def say(msg: str = "") -> None:
    print(msg, flush=True)
    lines.append(msg)


def build_base(tiny: bool, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                          num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16)


def prepare(name: str, model):
    torch.manual_seed(1)
    if name == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    config = lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS)
    fast = name != "lorakit_plain"
    return get_lora_model(model, config, share=fast, fuse=fast)


class TokenData(torch.utils.data.Dataset):
    """Random token sequences (input_ids = labels), fixed by the seed."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_timer(device: torch.device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the end of the first and the last optimizer step, after a device sync (only
        there: a sync at every step would keep the host from queueing ahead, which the Trainer does)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (1, state.max_steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.ends.append(time.perf_counter())

    return StepTimer()


def run_case(name: str, batch: int, seq: int, steps: int, warm: int, tiny: bool, device: torch.device, scratch: str) -> dict:
    from transformers import Trainer, TrainingArguments

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    leftover = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None  # earlier cases' leaks
    model = prepare(name, build_base(tiny, device))
    vocab = model.config.vocab_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def args(max_steps: int) -> TrainingArguments:
        return TrainingArguments(
            scratch, max_steps=max_steps, per_device_train_batch_size=batch,
            learning_rate=1e-4, bf16=True, use_cpu=tiny, save_strategy="no", logging_steps=max_steps,
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
            torch_compile=name == "lorakit_compiled",
        )

    Trainer(model=model, args=args(warm), train_dataset=TokenData(batch * warm, seq, vocab)).train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timer = make_timer(device)
    trainer = Trainer(model=model, args=args(steps), train_dataset=TokenData(batch * steps, seq, vocab),
                      callbacks=[timer])
    metrics = trainer.train().metrics
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    steady = (steps - 1) * batch * seq / (timer.ends[-1] - timer.ends[0]) if len(timer.ends) > 1 else None
    row = {
        "contender": name, "batch": batch, "seq": seq, "steps": steps,
        "tokens_per_s": metrics["train_samples_per_second"] * seq,
        "train_runtime_s": metrics["train_runtime"], "steady_tokens_per_s": steady,
        "peak_GiB": peak, "train_loss": metrics["train_loss"], "trainable": trainable,
        "allocated_before_GiB": leftover,
    }
    del trainer, model
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (checks the script)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds after which remaining cases are skipped")
    parser.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (sequences per step)")
    opts = parser.parse_args(argv)
    out = os.environ.get("OUT") or "out"
    os.makedirs(out, exist_ok=True)
    device = torch.device("cpu" if opts.tiny else "cuda")
    seq = 32 if opts.tiny else 2048
    # (batch, timed steps): about 3 s of timed training per case on an H200; 2 steps on the CPU
    shapes = [(b, 2 if opts.tiny else max(10, 80 // b)) for b in opts.batches]
    warm = 2 if opts.tiny else 3

    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "lorakit": lorakit.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        opts.contenders = [c for c in opts.contenders if c != "peft"]
    say(f"env: {env}")
    say(f"Trainer + LoRA r=16 on {TARGETS}, {'tiny Llama (CPU)' if opts.tiny else 'Llama 1.14B, bf16'}, seq {seq}")
    start = time.perf_counter()
    rows, skipped, failed = [], [], []
    for batch, steps in shapes:
        for name in opts.contenders:
            if time.perf_counter() - start > opts.budget:
                skipped.append(f"{name} {batch}x{seq}")
                continue
            try:
                with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output_dir: nothing is saved there
                    row = run_case(name, batch, seq, steps, warm, opts.tiny, device, scratch)
            except Exception as err:  # one failing case (an OOM, say) must not cost the others' figures
                traceback.print_exc()
                failed.append(f"{name} {batch}x{seq}: {type(err).__name__}: {str(err)[:300]}")
                say(f"  {name:14s} {batch}x{seq}: FAILED {failed[-1]}")
                continue
            rows.append(row)
            peak = f"{row['peak_GiB']:.1f} GiB" if row["peak_GiB"] is not None else "-"
            say(f"  {name:14s} {batch}x{seq}: {row['tokens_per_s']:,.0f} tok/s (Trainer), steady "
                f"{row['steady_tokens_per_s'] or float('nan'):,.0f} tok/s, peak {peak}, loss {row['train_loss']:.3f}")

    say("\n| batch | contender | tokens/s (Trainer) | steady tokens/s | × PEFT | peak GiB |")
    say("|---|---|---|---|---|---|")
    for row in rows:
        ref = next((r for r in rows if r["contender"] == "peft" and r["batch"] == row["batch"]), None)
        ratio = f"{row['tokens_per_s'] / ref['tokens_per_s']:.3f}" if ref else "-"
        peak = f"{row['peak_GiB']:.1f}" if row["peak_GiB"] is not None else "-"
        say(f"| {row['batch']}×{row['seq']} | {row['contender']} | {row['tokens_per_s']:,.0f} | "
            f"{row['steady_tokens_per_s'] or float('nan'):,.0f} | {ratio} | {peak} |")
    if skipped:
        say(f"skipped (time budget {opts.budget:.0f} s): {', '.join(skipped)}")
    say(f"total {time.perf_counter() - start:.0f} s")
    if failed:
        say(f"failed: {'; '.join(failed)}")
    with open(os.path.join(out, "gpu_trainer.json"), "w") as f:
        json.dump({"env": env, "rows": rows, "skipped": skipped, "failed": failed}, f, indent=1)
    with open(os.path.join(out, "gpu_trainer.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
