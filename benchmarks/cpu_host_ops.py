"""Host work per training step, counted on the CPU: aten ops a step issues for LoRA and DoRA.

    python benchmarks/cpu_host_ops.py

Where a GPU step is bound by the host (batch 1 in eager mode: the GPU waits for Python), its time follows the
number of ops the step issues, which does not depend on the device.  This counts them with ``torch.profiler`` on a
2-layer Llama (hidden 64, bf16 base, float32 adapters, r = 16 on all 7 projections, 1×16 tokens, AdamW) for lorakit
LoRA (plain inject) and DoRA, and prints the most frequent ops of each.
"""

from __future__ import annotations

import collections
import os
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


def main() -> None:
    linears = 2 * len(TARGETS)
    rows = {name: count(name == "DoRA") for name in ("LoRA", "DoRA")}
    for name, (ms, ops) in rows.items():
        top = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in ops.most_common(5))
        print(f"{name}: {sum(ops.values())} aten ops a step ({ms:.1f} ms on this CPU); most: {top}")
    extra = sum(rows["DoRA"][1].values()) - sum(rows["LoRA"][1].values())
    print(f"DoRA issues {extra} more ops a step: {extra / linears:.0f} per adapted linear ({linears} linears)")


if __name__ == "__main__":
    main()
