"""``lorakit train``: LoRA-tune a model on a task; with no arguments, the built-in code-search demo.

Every option defaults to None here so that three sources can be told apart: what the user typed
wins, then (with --resume) what the checkpoint was trained with, then the task's own defaults.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

TASKS = ("code-search", "embedding", "causal-lm", "classification")

EPILOG = """\
examples:
  lorakit train                                   # the offline demo: code search over Python's stdlib
  lorakit train --task code-search --source ~/src/myproject --out runs/mine
  lorakit train --task causal-lm --model ./llama-1b --data chat.jsonl -r 16 --targets all-linear
  lorakit train --task classification --model ./bert-base --data reviews.jsonl --epochs 3
  lorakit train --task embedding --model ./minilm --data pairs.jsonl
  lorakit train --resume --out runs/mine          # continue from the latest checkpoint, exactly

data (JSON lines):
  causal-lm       {"text": ...} | {"prompt": ..., "completion": ...} | {"messages": [{"role", "content"}, ...]}
  classification  {"text": ..., "label": ...}
  embedding       {"query": ..., "positive": ..., "negative": ... (optional)}

--targets: comma-separated module names or dotted suffixes (q_proj,v_proj), a regular expression
matching whole names (.*attn\\.(q|v)_proj), or all-linear.
"""

# Defaults of the options every task shares (each task's own are its class's ``defaults``).
_COMMON = dict(grad_accum=1, eval_every=0, save_every=0, keep=3, seed=0, bf16=False, max_steps=None, max_bad_steps=5,
               fuse=True, kernels="liger", checkpointing="off", quantize=None, dora=False,
               lora_plus_ratio=None, compile="auto")

# Where each option lives in a checkpoint's state.json "config" (see Trainer.run_config).
_SAVED = {
    "r": ("lora", "r"), "alpha": ("lora", "lora_alpha"), "dropout": ("lora", "lora_dropout"),
    "targets": ("lora", "target_modules"), "lr": ("train", "lr"), "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"), "batch_size": ("train", "batch_size"), "grad_accum": ("train", "grad_accum"),
    "warmup": ("train", "warmup"), "schedule": ("train", "schedule"), "eval_every": ("train", "eval_every"),
    "save_every": ("train", "save_every"), "keep": ("train", "keep"), "seed": ("train", "seed"),
    "bf16": ("train", "bf16"), "max_bad_steps": ("train", "max_bad_steps"), "fuse": ("train", "fuse"),
    "kernels": ("train", "kernels"), "checkpointing": ("train", "checkpointing"), "quantize": ("train", "quantize"),
    "dora": ("lora", "use_dora"), "lora_plus_ratio": ("train", "lora_plus_ratio"),
    "compile": ("train", "compile"),
    "task": ("task",), "model": ("model",),
    "data": ("data_file",),
    "eval_data": ("eval_data_file",), "source": ("source",), "max_length": ("max_length",),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="LoRA-tune a model (default: the offline code-search demo)",
        description="LoRA-tune a local model on a task. With no arguments: adapt all-MiniLM-L6-v2 to code "
        "search over Python's standard library, offline, and report held-out recall@1 / MRR before and after.",
        epilog=EPILOG + _defaults_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--task", choices=TASKS, help="default: code-search (or the checkpoint's, with --resume)")
    g.add_argument("--model", metavar="DIR", help="local transformers checkpoint directory (nothing is downloaded)")
    g.add_argument("--data", metavar="FILE.jsonl", help="training data (causal-lm, classification, embedding)")
    g.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out data (default: 10%% of --data, seeded)")
    g.add_argument("--source", metavar="DIR", help="code-search: Python project to build pairs from (default: stdlib)")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip malformed data lines and report how many")
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--rank", dest="r", type=int, help="rank of the update BA")
    g.add_argument("--alpha", type=float, help="α; the update is scaled by α / r")
    g.add_argument("--dropout", type=float, help="dropout on the LoRA branch's input")
    g.add_argument("--targets", help="modules to adapt: names (q_proj,v_proj), a regex, or all-linear")
    g.add_argument("--dora", action="store_true", default=None,
                   help="DoRA: train a magnitude per output row too (W' = m ⊙ (W + sBA) / ‖W + sBA‖)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--lora-plus-ratio", type=float, metavar="R",
                   help="LoRA+: B factors learn at R × --lr (the LoRA+ paper suggests 16)")
    g.add_argument("--epochs", type=int, help="passes over the data (ignored with --max-steps)")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--max-length", type=int, help="tokens per example (longer ones are truncated)")
    g.add_argument("--warmup", type=float, help="warmup steps (≥ 1) or fraction of the run (< 1)")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), help="lr decay after warmup")
    g.add_argument("--seed", type=int, help="seeds data order, LoRA init and dropout")
    g.add_argument("--bf16", action="store_true", default=None,
                   help="keep the frozen base in bfloat16 and compute in bfloat16 (CUDA only; a bfloat16 checkpoint "
                        "stays bfloat16 without it); adapters and optimizer state stay float32")
    g.add_argument("--compile", choices=("off", "default", "reduce-overhead"),
                   help="torch.compile each decoder layer (reduce-overhead: with CUDA graphs); the first steps "
                        "compile. Default: off (on CUDA the measured faster choice, see README)")
    g.add_argument("--no-fuse", dest="fuse", action="store_false", default=None,
                   help="train the layers one by one: no shared q/k/v (gate/up) input pass, no fused SwiGLU MLPs "
                        "(both are exact; this is for comparing or debugging)")
    g.add_argument("--kernels", choices=("liger", "none"),
                   help="liger (default): liger-kernel's fused loss (no full logits), RMSNorm, RoPE and SwiGLU on a CUDA "
                        "GPU, for the architectures it supports (skipped on CPU, with a note); none: the model as loaded")
    g.add_argument("--checkpointing", choices=("off", "on", "offload"),
                   help="activation checkpointing of the decoder layers: off (default); on: recompute each layer in "
                        "backward; offload: recompute, and keep the layer inputs in pinned CPU memory")
    g.add_argument("--quantize", choices=("nf4",),
                   help="nf4: QLoRA — store the frozen base's linear weights in 4 bits (NF4 with double quantisation, "
                        "as bitsandbytes); the adapter still applies to the full-precision base")
    g.add_argument("--max-bad-steps", type=int, help="stop after this many NaN/inf steps in a row (default 5)")
    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--out", metavar="DIR", help="output directory (default: lorakit-runs/<task>)")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: before and after only)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default: off)")
    g.add_argument("--keep", type=int, help="checkpoints to keep (default 3; 0 keeps all)")
    g.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue from PATH (a checkpoint or a run dir), else from the latest checkpoint in --out")
    g.add_argument("--force", action="store_true", help="with --resume: accept options that differ from the checkpoint's")
    g = p.add_argument_group("distributed (launch with: torchrun --nproc_per_node N -m lorakit train ...)")
    g.add_argument("--strategy", choices=("ddp", "fsdp"),
                   help="ddp: a model copy per process; fsdp: FSDP2, base and adapters sharded (torchrun default: ddp)")
    g.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long a process waits for the others before the run fails (default 600)")
    p.set_defaults(func=run)
    return p


def _defaults_help() -> str:
    """The per-task defaults, as a table for --help."""
    lines = ["\ndefaults per task (what you type wins; with --resume, the checkpoint's settings come next):"]
    for task in TASKS:
        d = {**_COMMON, **_task_defaults(task)}
        length = f"{d['max_steps']} steps" if d.get("max_steps") else f"{d['epochs']} epoch(s)"
        targets = d.get("targets") or "the attention and MLP linears of the encoder's top 2/3 of layers"
        targets = targets if isinstance(targets, str) else ",".join(targets)
        lines.append(f"  {task:<15} -r {d['r']} --alpha {d['alpha']:g} --dropout {d['dropout']:g} --lr {d['lr']:g} "
                     f"--batch-size {d['batch_size']} --max-length {d['max_length']}, {length}, "
                     f"warmup {d['warmup']:g}, {d['schedule']}; targets {targets}")
    return "\n".join(lines) + "\n"


def parse_targets(text: str | list[str] | None) -> tuple[str, ...] | str | None:
    """"q_proj,v_proj" → names; "all-linear" or anything with regex syntax → a regex string."""
    if text is None or isinstance(text, (list, tuple)):
        return tuple(text) if text is not None else None
    if text == "all-linear" or re.search(r"[*+?\[\](){}|^$\\]", text):
        return text
    return tuple(t for t in (s.strip() for s in text.split(",")) if t)


def _task_defaults(task: str) -> dict[str, Any]:
    """The task's own defaults (lorakit.train.task.TaskDefaults), as option values."""
    if task == "code-search":
        from ..train.codesearch import CODE_SEARCH_DEFAULTS

        return CODE_SEARCH_DEFAULTS.task_defaults().options()
    module, name = {"embedding": ("embedding", "EmbeddingTask"), "causal-lm": ("causal_lm", "CausalLMTask"),
                    "classification": ("classification", "ClassificationTask")}[task]
    return getattr(importlib.import_module(f"..train.{module}", __package__), name).defaults.options()


def resolve(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Each option's value: typed > checkpoint's > task default > common default."""
    typed = {k: getattr(args, k) for k in _SAVED if getattr(args, k, None) is not None}
    from_ckpt: dict[str, Any] = {}
    for key, where in _SAVED.items():
        node: Any = saved or {}
        for part in where:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            from_ckpt[key] = node
    task = typed.get("task") or from_ckpt.get("task") or "code-search"
    values = {**_COMMON, "task": task, "model": None, "data": None, "eval_data": None, "source": None,
              **_task_defaults(task), **from_ckpt, **typed}
    if "targets" in typed:
        values["targets"] = parse_targets(typed["targets"])
    elif isinstance(values.get("targets"), list):
        values["targets"] = tuple(values["targets"])
    if "epochs" in typed and "max_steps" not in typed:
        values["max_steps"] = None  # an explicit --epochs replaces a default or saved step budget
    return values


def build_task(v: dict[str, Any], skip_bad_lines: bool, quantize: Any = None) -> Any:
    """The task; ``quantize`` (integrations.local_models.QuantizedLoad): its model comes quantised, streamed."""
    task = v["task"]
    if task == "code-search":
        if v["data"]:
            raise ConfigError(
                "--task code-search builds its pairs from --source DIR; for your own JSONL pairs use --task embedding"
            )
        from ..train.codesearch import build_code_search_task

        return build_code_search_task(v["source"], v["max_length"], v["seed"], model_dir=v["model"], quantize=quantize)
    if not v["data"]:
        raise ConfigError(f"--task {task} needs --data FILE.jsonl (see lorakit train --help for the line format)")
    if task == "embedding":
        from ..train.embedding import build_embedding_task

        return build_embedding_task(v["model"], v["data"], eval_file=v["eval_data"], max_length=v["max_length"],
                                    seed=v["seed"], skip_bad_lines=skip_bad_lines, quantize=quantize)
    if not v["model"]:
        raise ConfigError(f"--task {task} needs --model DIR, a local transformers checkpoint directory")
    if task == "causal-lm":
        from ..train.causal_lm import CausalLMTask as cls
    else:
        from ..train.classification import ClassificationTask as cls
    return cls(v["model"], v["data"], eval_data=v["eval_data"], max_length=v["max_length"],
               skip_bad_lines=skip_bad_lines, seed=v["seed"], quantize=quantize)


def _abs(path: str) -> str:
    """Absolute, so a resumed run started from another directory compares equal; a missing path stays as typed
    (its error message, e.g. the hub-name hint, should show what the user wrote)."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own progress line is the one to read
    transformers.utils.logging.set_verbosity_error()  # e.g. a fresh classification head is expected, not news
    from ..config import LoraConfig
    from ..train.checkpoint import load_checkpoint, resolve as resolve_checkpoint
    from ..train.config import TrainConfig
    from ..train.trainer import Trainer

    ckpt = None
    if args.resume is not None:
        # a PATH, else the run in --out, else the default --out of the task
        where = args.resume or args.out or f"lorakit-runs/{args.task or 'code-search'}"
        ckpt = load_checkpoint(resolve_checkpoint(where))
    for key in ("model", "data", "eval_data", "source"):
        if getattr(args, key, None) is not None:
            setattr(args, key, _abs(getattr(args, key)))
    v = resolve(args, ckpt.state.get("config") if ckpt else None)
    out = Path(args.out or (ckpt.path.parent.parent if ckpt and args.resume else f"lorakit-runs/{v['task']}"))
    # the training options are checked before the (slow) model and data loading
    config = TrainConfig(
        lr=v["lr"], epochs=v["epochs"], max_steps=v["max_steps"], batch_size=v["batch_size"], grad_accum=v["grad_accum"],
        warmup=v["warmup"], schedule=v["schedule"], eval_every=v["eval_every"], save_every=v["save_every"],
        keep=v["keep"], seed=v["seed"], bf16=bool(v["bf16"]), max_bad_steps=v["max_bad_steps"], fuse=bool(v["fuse"]),
        kernels=v["kernels"], checkpointing=v["checkpointing"], quantize=v["quantize"],
        lora_plus_ratio=v["lora_plus_ratio"],
        compile=v["compile"],
    )
    from ..train import distributed

    dist = bool(args.strategy or distributed.launched() and int(os.environ["WORLD_SIZE"]) > 1)
    quantize = None
    if config.quantize:  # the model is streamed onto the device it trains on, quantised as it is read
        from ..integrations.local_models import QuantizedLoad
        from ..train.trainer import default_device

        quantize = QuantizedLoad(config.quantize, distributed.local_device() if dist else default_device(), config.bf16)
    task = build_task(v, args.skip_bad_lines, quantize)
    if getattr(task, "skipped", 0):
        print(f"--skip-bad-lines: skipped {task.skipped} bad line(s) of the data", file=sys.stderr)
    targets = v.get("targets") or task.default_targets
    lora = LoraConfig(r=v["r"], alpha=v["alpha"], dropout=v["dropout"], target_modules=targets,
                      task_type={"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}.get(v["task"], "FEATURE_EXTRACTION"),
                      base_model_name_or_path=v["model"], use_dora=bool(v["dora"]))
    extra = {"model": v["model"], "data_file": v["data"], "eval_data_file": v["eval_data"], "source": v["source"],
             "max_length": v["max_length"]}
    if dist:
        trainer = distributed.DistributedTrainer(task, lora, config, out, extra=extra, strategy=args.strategy or "ddp",
                                                 timeout=args.dist_timeout)
    else:
        trainer = Trainer(task, lora, config, out, extra=extra)
    try:
        trainer.fit(ckpt, force=args.force)
    finally:
        distributed.shutdown()
    if trainer.is_main:
        saved = "adapter/, metrics.json, training.png" + (", checkpoints/" if config.save_every else "")
        print(f"done: {saved} in {out}")
    return 0
