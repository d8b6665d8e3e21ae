"""Kernels per decode step: the frozen (merged) model against lorakit with unmerged adapters, counted on the CPU.

With CUDA graphs a decode step's host time is gone and its GPU time is a chain of tiny kernels, each a few µs
whatever its size, so the number of kernels a step launches predicts its time.  This script counts, in one eager
decode step of a small Llama of the benchmark's architecture (the count per decoder layer does not depend on the
sizes), the aten ops that launch a kernel: views, no-op casts and allocations are left out.  It also times greedy
decoding of that small model on the CPU, where each op's cost is host work (dispatch, Python), as it is for an
eager decode step on a GPU: tokens/s, median of 5 runs.

    python benchmarks/cpu_decode_ops.py [--layers 16]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

# aten ops that launch no kernel of their own (views, metadata, allocation without a fill)
_NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::t", "aten::transpose", "aten::slice", "aten::select", "aten::unsqueeze",
    "aten::expand", "aten::as_strided", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::lift_fresh",
    "aten::split", "aten::squeeze", "aten::permute", "aten::contiguous", "aten::empty", "aten::empty_strided",
    "aten::_reshape_alias", "aten::narrow", "aten::chunk", "aten::unbind", "aten::resolve_conj", "aten::resolve_neg",
    "aten::result_type", "aten::new_empty", "aten::promote_types", "aten::empty_like", "aten::size", "aten::stride",
}


def kernel_ops(model: torch.nn.Module) -> collections.Counter:
    """Top-level aten ops of one decode step (one new token after an 8-token prompt) that launch a kernel."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=gen)
    token = torch.randint(0, model.config.vocab_size, (1, 1), generator=gen)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(token, past_key_values=cache, use_cache=True)
    counts: collections.Counter = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in _NO_KERNEL:
            continue
        if e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"):
            continue  # counted with its parent
        if e.name == "aten::to" and not any(c.name == "aten::_to_copy" for c in e.cpu_children):
            continue  # a cast to the dtype the tensor has: no copy
        counts[e.name] += 1
    return counts


def decode_tokens_per_s(model: torch.nn.Module, new_tokens: int = 64, runs: int = 5) -> float:
    """Greedy decode of ``new_tokens`` after an 8-token prompt, DynamicCache, median tokens/s over ``runs``."""
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    times = []
    with torch.no_grad():
        model.generate(prompt, **kw)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model.generate(prompt, **kw)
            times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


VARIANTS = ("frozen", "lorakit", "lorakit-bf16")


def build(name: str, layers: int) -> torch.nn.Module:
    """A variant of the small bf16 Llama: "frozen"; "lorakit", float32 adapters as trained (r 16, all linears) with
    shared-input groups and fused MLPs, as in the batch-shape benchmark; "lorakit-bf16", the same with its
    adapters cast to bf16, as a trained model is served after ``model.to(torch.bfloat16)``."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    if name != "frozen":
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, target_modules="all-linear"))
        lorakit.share_inputs(model)
        lorakit.fuse_mlps(model)
        if name == "lorakit-bf16":
            model.to(torch.bfloat16)
    return model


def layer_kernels(name: str) -> tuple[collections.Counter, int]:
    """(one decoder layer's kernel-launching ops, the ops outside the layers) of variant ``name``."""
    one, two = kernel_ops(build(name, 1)), kernel_ops(build(name, 2))
    layer = two - one  # (Counter subtraction keeps the positive counts; a layer only adds ops)
    return layer, sum(one.values()) - sum(layer.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers to scale the count to")
    args = parser.parse_args()
    total = {}
    for name in VARIANTS:
        layer, outside = layer_kernels(name)
        total[name] = outside + args.layers * sum(layer.values())
        print(f"{name:12s} per decoder layer {sum(layer.values()):3d}, outside the layers {outside:3d}: "
              + ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in sorted(layer.items())))
    print(f"one decode step at {args.layers} layers: " + ", ".join(
        f"{name} {total[name]} ({total[name] / total['frozen']:.2f}×)" for name in VARIANTS))
    torch.set_num_threads(1)  # host work, not parallel GEMMs
    speed = {name: decode_tokens_per_s(build(name, 2)) for name in VARIANTS}
    print("eager decode on the CPU, 2 layers, 64 new tokens, tokens/s: " + ", ".join(
        f"{name} {speed[name]:.0f} ({speed[name] / speed['frozen']:.2f}×)" for name in VARIANTS))


if __name__ == "__main__":
    main()
