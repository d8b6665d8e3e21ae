"""Host work per training step, counted on the CPU: aten ops a step issues for LoRA and DoRA, and Dynamo's
guard evaluation per call of a compiled decoder layer.

    python benchmarks/cpu_host_ops.py

Where a GPU step is bound by the host (batch 1 in eager mode: the GPU waits for Python), its time follows the
number of ops the step issues, which does not depend on the device.  This counts them with ``torch.profiler`` on a
2-layer Llama (hidden 64, bf16 base, float32 adapters, r = 16 on all 7 projections, 1×16 tokens, AdamW) for lorakit
LoRA (plain inject) and DoRA, and prints the most frequent ops of each.  Then it compiles that model's decoder
layer for the frozen model and for lorakit (inject + share_inputs + fuse_mlps) and measures ``TorchDynamo Cache
Lookup`` — the guard evaluation every call of a compiled layer pays before its graph runs, host time that CUDA
graphs do not remove — with all of Dynamo's guards (``layer.compile(dynamic=True)``) and without those on module
attributes, as ``lorakit train --compile`` compiles (``lorakit.train.compute.compile_options``).  Median of 5
measurements of 20 steps each.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch
from torch.profiler import ProfilerActivity, profile

import lorakit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count(use_dora: bool) -> tuple[float, collections.Counter]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = lorakit.inject(LlamaForCausalLM(cfg).to(torch.bfloat16),
                           lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS, use_dora=use_dora))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    ms = (time.perf_counter() - t0) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return ms, collections.Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def guard_time(variant: str, options: dict | None = None) -> tuple[float, int]:
    """(µs of Dynamo cache lookup per compiled-layer call, number of calls): the median of 5 measurements of 20
    training steps, the layer compiled with torch.compile ``options``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if variant == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        model = lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
        lorakit.share_inputs(model)
        lorakit.fuse_mlps(model)
    model.train()
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    torch._dynamo.reset()
    layer.compile(dynamic=True, options=options)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    times = []
    for _ in range(5):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                model(input_ids=ids, labels=ids).loss.backward()
        lookup = next(e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup")
        times.append(lookup.cpu_time_total / lookup.count)
    return statistics.median(times), lookup.count


def main() -> None:
    linears = 2 * len(TARGETS)
    rows = {name: count(name == "DoRA") for name in ("LoRA", "DoRA")}
    for name, (ms, ops) in rows.items():
        top = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in ops.most_common(5))
        print(f"{name}: {sum(ops.values())} aten ops a step ({ms:.1f} ms on this CPU); most: {top}")
    extra = sum(rows["DoRA"][1].values()) - sum(rows["LoRA"][1].values())
    print(f"DoRA issues {extra} more ops a step: {extra / linears:.0f} per adapted linear ({linears} linears)")
    torch.set_num_threads(1)
    from lorakit.train.compute import compile_options

    for variant in ("frozen", "lorakit"):
        every, calls = guard_time(variant)
        run, _ = guard_time(variant, compile_options("default"))
        print(f"compiled decoder layer, {variant}: Dynamo cache lookup {every:.0f} µs a call with every guard, "
              f"{run:.0f} µs as lorakit train compiles (no guards on module attributes; {calls} calls)")


if __name__ == "__main__":
    main()
