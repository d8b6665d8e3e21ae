"""Training throughput at the batch shapes people train with: every contender × shape × compile mode.

    python benchmarks/gpu_shapes.py                       # the whole table (over 10 min on one H200: split it across calls)
    python benchmarks/gpu_shapes.py --quick               # a subset: 1×512 and 8×2048, eager and compile
    python benchmarks/gpu_shapes.py --contenders lorakit,peft --shapes 1x2048 --modes eager,reduce-overhead
    python benchmarks/gpu_shapes.py --tiny                # a 2-layer model on the CPU (the test's smoke run)

Issue 21 (liger-kernel's fused kernels, checkpointing modes; contenders outside the default run):
    python benchmarks/gpu_shapes.py --contenders frozen,frozen-liger,peft,peft-liger,lorakit,lorakit-liger,\
        lorakit-liger-ckpt,lorakit-liger-offload --modes eager,compile
    python benchmarks/gpu_shapes.py --model 8b --contenders lorakit-liger,lorakit-liger-ckpt,lorakit-liger-offload,\
        qlora-liger,qlora-liger-ckpt,qlora-liger-offload --shapes 1x2048,8x2048 --modes eager --no-decode --steps 3
        # the 8B memory table, bf16 and NF4 bases

Writes gpu_shapes.json and gpu_shapes.txt under $OUT (or ./bench_out).

The model (issue #19): a Llama-architecture 1.14B (hidden 2048, 16 layers, MLP 8192, 16/8 heads, vocab
32000, sdpa), random weights, bf16; LoRA r = 16, α = 32 on all 7 projections; AdamW (``fused`` on CUDA, as
``lorakit train`` and transformers' Trainer default to; torch's default in every run up to 2026-12-03);
``labels = input_ids``.

One run does, in order, each step in its own subprocess (so one contender's memory, compiled code or
crash cannot touch the next one's figures):
  1. ceilings (bf16 matmul rate, copy bandwidth) and correctness: lorakit as benchmarked (inject +
     share_inputs + fuse_mlps) against PEFT on the same weights and inputs — loss and every adapter
     gradient.  A failed check stops the run: a wrong contender is never timed;
  2. per contender, one model reused for every mode and shape: 3 warm-up + 10 timed training steps per
     (mode, shape); tokens/s of the median step, peak memory, host issue time (the median time until
     the step's Python call returns, before synchronising: when it is close to the step time the step
     is bound by the host); FLOPs and bytes per step and the model FLOPs utilisation they imply;
  3. per contender and mode, after that mode's shapes, decode: a 1×128 prompt, 128 new tokens, greedy
     (the adapter stays unmerged; the frozen model is the merged adapter's reference, since a merged LoRA
     model has exactly its cost).

Modes: ``eager``; ``compile`` and ``reduce-overhead`` compile *regionally*: each decoder layer gets
``layer.compile(mode=..., dynamic=True)``, the same for every contender, so one compilation serves all
16 layers and every shape (CUDA graphs, in reduce-overhead, are recorded per shape).  Embedding, final
norm, lm_head, loss and optimizer stay eager.  ``--static`` compiles per shape instead (slower to
compile).  Decode in compiled modes uses transformers' static KV cache (one decode shape) and compiles the whole
forward (``compile``) or lets transformers' generate compile its decode step with CUDA graphs (``reduce-overhead``).

The frozen limit (as in RESULTS.md): the same model with every weight frozen and the input embeddings
requiring grad, so backward runs through every layer and computes input gradients but no weight
gradient — what any LoRA method must at least do.

Adding a contender: write one builder ``def build(ctx: Ctx) -> Built`` and decorate it with
``@contender("name")`` (``default=False`` keeps it out of the default run); then ``--contenders name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("eager", "compile", "reduce-overhead")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture model's sizes."""

    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int

    def params(self) -> int:
        """Parameters (embedding and lm_head untied, norms included)."""
        kv = self.hidden // self.heads * self.kv_heads
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.mlp + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the 7 projections of one decoder layer."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return [(h, h), (h, kv), (h, kv), (h, h), (h, self.mlp), (h, self.mlp), (self.mlp, h)]


LLAMA_1B = ModelShape(hidden=2048, layers=16, mlp=8192, heads=16, kv_heads=8, vocab=32000)
LLAMA_8B = ModelShape(hidden=4096, layers=32, mlp=14336, heads=32, kv_heads=8, vocab=128256)  # issue 21's memory table
TINY = ModelShape(hidden=64, layers=2, mlp=128, heads=4, kv_heads=2, vocab=256)
SHAPES = "1x512,1x2048,2x1024,8x2048"
QUICK_SHAPES = "1x512,8x2048"
TINY_SHAPES = "1x32,2x16"


@dataclasses.dataclass
class Ctx:
    """What a contender's builder gets."""

    shape: ModelShape
    device: torch.device
    dtype: torch.dtype
    r: int = 16
    alpha: float = 32.0
    # liger's RMSNorm / RoPE / SwiGLU autograd functions fail in Dynamo inside a compiled layer (torch 2.11): a run
    # with a compiled mode puts only the fused loss on (as `lorakit train --compile` does); Inductor fuses the rest
    layer_kernels: bool = True
    notes: list[str] = dataclasses.field(default_factory=list)

    def base_model(self, seed: int = 0) -> torch.nn.Module:
        """The random-weight Llama in ``dtype`` on ``device`` (the same weights for every contender)."""
        return llama(self.shape, self.device, self.dtype, seed)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


@dataclasses.dataclass
class Built:
    """A contender ready to train: ``model(input_ids=..., labels=...).loss``; ``params`` go to AdamW
    (none: no optimizer, as for the frozen limit); ``layers`` are compiled in the compiled modes
    (default: every module whose class name ends in "DecoderLayer")."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    layers: list[torch.nn.Module] | None = None
    #: flops of the LoRA branches: the rank (0 for none) — for the FLOP count only
    lora_r: int = 0


Builder = Callable[[Ctx], Built]
#: name → builder; every contender is a row of the table
CONTENDERS: dict[str, Builder] = {}
DEFAULT_CONTENDERS: list[str] = []


def contender(name: str, *, default: bool = True) -> Callable[[Builder], Builder]:
    """Register ``fn`` as contender ``name`` (in the default run unless ``default=False``)."""

    def register(fn: Builder) -> Builder:
        if name in CONTENDERS:
            raise ValueError(f"contender {name!r} is registered twice")
        CONTENDERS[name] = fn
        if default:
            DEFAULT_CONTENDERS.append(name)
        return fn

    return register


def llama(shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------- contenders
@contender("frozen")
def build_frozen(ctx: Ctx) -> Built:
    """The frozen limit: every weight frozen, input embeddings require grad, backward through all layers."""
    m = ctx.base_model()
    m.requires_grad_(False)
    m.enable_input_require_grads()
    return Built(m, [])


def peft_model(ctx: Ctx, fp32_adapters: bool, use_dora: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=ctx.r, lora_alpha=ctx.alpha, target_modules=TARGETS, use_dora=use_dora)
    return get_peft_model(ctx.base_model(), cfg, autocast_adapter_dtype=fp32_adapters)


@contender("peft")
def build_peft(ctx: Ctx) -> Built:
    """PEFT with bf16 adapters (its fastest setting; its default float32 adapters are slower)."""
    m = peft_model(ctx, fp32_adapters=False)
    m.train()
    return Built(m, trainable(m), lora_r=ctx.r)


def lorakit_model(ctx: Ctx, *, fuse: bool = True, use_dora: bool = False) -> torch.nn.Module:
    import lorakit

    cfg = lorakit.LoraConfig(r=ctx.r, alpha=ctx.alpha, target_modules=TARGETS, use_dora=use_dora)
    m = lorakit.inject(ctx.base_model(), cfg)
    m.train()
    if fuse:  # as `lorakit train` trains
        ctx.note(f"lorakit: {lorakit.share_inputs(m)} shared-input groups, {lorakit.fuse_mlps(m)} fused MLPs")
    return m


@contender("lorakit")
def build_lorakit(ctx: Ctx) -> Built:
    """lorakit as `lorakit train` trains: inject + share_inputs + fuse_mlps, float32 adapters."""
    m = lorakit_model(ctx)
    return Built(m, trainable(m), lora_r=ctx.r)


@contender("lorakit-bf16", default=False)
def build_lorakit_bf16(ctx: Ctx) -> Built:
    """lorakit with its adapters cast to the model's dtype, as a trained model is served after
    ``model.to(torch.bfloat16)``: decode then casts no factor per token (14 kernels a decoder layer fewer,
    ``benchmarks/cpu_decode_ops.py``)."""
    m = lorakit_model(ctx).to(ctx.dtype)
    return Built(m, trainable(m), lora_r=ctx.r)


@contender("lorakit-triton", default=False)
def build_lorakit_triton(ctx: Ctx) -> Built:
    """lorakit as above with the Triton backend at every token count (``ops.backends.TRITON_MIN_ROWS`` = 0):
    what decides the backend under CUDA graphs, where launches cost no host time."""
    import torch._functorch.config
    import torch._inductor.config

    from lorakit.ops import backends

    backends.TRITON_MIN_ROWS = 0  # this contender's own process
    # Inductor's caches key a graph by its custom-op calls, not by what their bodies trace to: with them
    # on, this contender reused the torch-backend code the "lorakit" worker had compiled (2026-12-03, s19_ro3).
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    return build_lorakit(ctx)


@contender("lorakit-plain", default=False)
def build_lorakit_plain(ctx: Ctx) -> Built:
    """lorakit's plain inject (no share_inputs / fuse_mlps): the LoRA that DoRA's figures compare with."""
    m = lorakit_model(ctx, fuse=False)
    return Built(m, trainable(m), lora_r=ctx.r)


@contender("dora", default=False)
def build_dora(ctx: Ctx) -> Built:
    """lorakit DoRA (use_dora=True), float32 adapters and magnitudes; plain inject (share_inputs and
    fuse_mlps compute plain LoRA, so they leave DoRA layers alone)."""
    m = lorakit_model(ctx, fuse=False, use_dora=True)
    return Built(m, trainable(m), lora_r=ctx.r)


@contender("peft-dora", default=False)
def build_peft_dora(ctx: Ctx) -> Built:
    """PEFT DoRA (use_dora=True) with bf16 adapters, as the PEFT LoRA contender."""
    m = peft_model(ctx, fp32_adapters=False, use_dora=True)
    m.train()
    return Built(m, trainable(m), lora_r=ctx.r)


# ------------------------------------------------------------------------- 4-bit NF4 bases (issue 17)
@contender("qlora", default=False)
def build_qlora(ctx: Ctx) -> Built:
    """lorakit as the ``lorakit`` contender on an NF4 base (``lorakit.quantize_base``): QLoRA."""
    import lorakit

    m = lorakit.quantize_base(lorakit_model(ctx, fuse=False), "nf4")
    ctx.note(f"qlora: {lorakit.share_inputs(m)} shared-input groups, {lorakit.fuse_mlps(m)} fused MLPs")
    return Built(m, trainable(m), lora_r=ctx.r)


@contender("peft-bnb", default=False)
def build_peft_bnb(ctx: Ctx) -> Built:
    """PEFT over bitsandbytes' Linear4bit (NF4, double quantisation, bf16 compute: QLoRA's setup), bf16 adapters."""
    from peft import LoraConfig, get_peft_model

    from gpu_qlora import to_bnb  # bitsandbytes' CUDA build must be importable

    m = get_peft_model(to_bnb(ctx.base_model()), LoraConfig(r=ctx.r, lora_alpha=ctx.alpha, target_modules=TARGETS),
                       autocast_adapter_dtype=False)
    m.train()
    return Built(m, trainable(m), lora_r=ctx.r)


# ----------------------------------------------- liger-kernel's fused kernels and checkpointing (issue 21)
def with_kernels(ctx: Ctx, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with liger-kernel's fused loss, RMSNorm, RoPE and SwiGLU (``lorakit.fused_kernels.apply``)."""
    from lorakit import fused_kernels

    on = ctx.layer_kernels
    ctx.note(str(fused_kernels.apply(model, rope=on, norms=on, mlp=on)))
    return model


def lorakit_liger(ctx: Ctx, mode: str, nf4: bool = False) -> Built:
    """inject (→ NF4 base, ``lorakit.quantize_base``) → fused kernels → share_inputs + fuse_mlps (lorakit's fused
    MLP replaces liger's SwiGLU) → checkpointing ``mode``: what ``lorakit train --checkpointing mode`` does on a GPU."""
    import lorakit

    m = lorakit.inject(ctx.base_model(), lorakit.LoraConfig(r=ctx.r, alpha=ctx.alpha, target_modules=TARGETS))
    if nf4:
        lorakit.quantize_base(m, "nf4")
    with_kernels(ctx, m)
    ctx.note(f"lorakit: {lorakit.share_inputs(m)} shared-input groups, {lorakit.fuse_mlps(m)} fused MLPs, "
             f"checkpointing {mode} on {lorakit.checkpointing(m, mode)} layers")
    m.train()
    return Built(m, trainable(m), lora_r=ctx.r)


@contender("frozen-liger", default=False)
def build_frozen_liger(ctx: Ctx) -> Built:
    """The frozen limit with liger's fused kernels (the limit at large batch: no full logits)."""
    built = build_frozen(ctx)
    with_kernels(ctx, built.model)
    return built


@contender("peft-liger", default=False)
def build_peft_liger(ctx: Ctx) -> Built:
    """PEFT (bf16 adapters) with liger's kernels on the model inside it."""
    m = peft_model(ctx, fp32_adapters=False)
    with_kernels(ctx, m.base_model.model)
    m.train()
    return Built(m, trainable(m), lora_r=ctx.r)


@contender("lorakit-liger", default=False)
def build_lorakit_liger(ctx: Ctx) -> Built:
    """lorakit + liger's kernels, no checkpointing."""
    return lorakit_liger(ctx, "off")


@contender("lorakit-liger-ckpt", default=False)
def build_lorakit_liger_ckpt(ctx: Ctx) -> Built:
    """lorakit + liger's kernels, each decoder layer recomputed in backward."""
    return lorakit_liger(ctx, "on")


@contender("lorakit-liger-offload", default=False)
def build_lorakit_liger_offload(ctx: Ctx) -> Built:
    """lorakit + liger's kernels, layers recomputed and their inputs kept in pinned CPU memory."""
    return lorakit_liger(ctx, "offload")


@contender("qlora-liger", default=False)
def build_qlora_liger(ctx: Ctx) -> Built:
    """lorakit on an NF4 base (quantize_base) + liger's kernels, no checkpointing."""
    return lorakit_liger(ctx, "off", nf4=True)


@contender("qlora-liger-ckpt", default=False)
def build_qlora_liger_ckpt(ctx: Ctx) -> Built:
    """lorakit on an NF4 base + liger's kernels, layers recomputed."""
    return lorakit_liger(ctx, "on", nf4=True)


@contender("qlora-liger-offload", default=False)
def build_qlora_liger_offload(ctx: Ctx) -> Built:
    """lorakit on an NF4 base + liger's kernels, layers recomputed, inputs in pinned CPU memory."""
    return lorakit_liger(ctx, "offload", nf4=True)


# ------------------------------------------------------------------------------------ FLOPs and bytes
def step_flops(shape: ModelShape, batch: int, seq: int, lora_r: int) -> float:
    """Model FLOPs of one training step (no recomputation counted).

    Linear layers: forward 2·T·k·d each, backward to the input the same again (frozen weights get no
    gradient); attention: QKᵀ and PV, causal (half the square), forward 2·B·S²·h per layer, backward
    twice that; LoRA (k → d, rank r): forward 2·T·r·(k + d), backward twice that (∂A, ∂B, ∂x).
    """
    tokens = batch * seq
    linear = sum(2 * tokens * k * d for k, d in shape.linears()) * shape.layers + 2 * tokens * shape.hidden * shape.vocab
    attention = 2 * batch * seq * seq * shape.hidden * shape.layers
    lora = sum(2 * tokens * lora_r * (k + d) for k, d in shape.linears()) * shape.layers
    return 2 * linear + 3 * attention + 3 * lora


def step_bytes(shape: ModelShape, batch: int, seq: int, lora_r: int, weight_bytes: int = 2) -> float:
    """The fewest bytes one training step moves through device memory, counting: the frozen weights read
    in forward and backward; each linear's input and output read/written once in forward and its
    gradients once in backward (bf16); logits and their gradient in float32 (written, read); and for
    LoRA float32 adapters their gradient and AdamW's read of p, g, m, v and write of p, m, v."""
    tokens = batch * seq
    weights = 2 * shape.params() * weight_bytes
    acts = sum(2 * 2 * tokens * (k + d) for k, d in shape.linears()) * shape.layers
    logits = 4 * 4 * tokens * shape.vocab
    adapters = sum(lora_r * (k + d) for k, d in shape.linears()) * shape.layers
    return weights + acts + logits + 9 * 4 * adapters


# ------------------------------------------------------------------------------------------ the worker
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_MODE: list[tuple[str, bool]] = []  # the mode the layers are compiled in now


def set_mode(layers: list[torch.nn.Module], mode: str, dynamic: bool, module_guards: bool = True) -> None:
    """Regional compilation: each decoder layer compiled alone (``mode`` "eager" undoes it).

    ``compile`` keeps its compiled code from one shape to the next (dynamic shapes: one compilation serves
    them, as in a training run); ``reduce-overhead`` starts afresh per shape, so one shape's CUDA graphs
    and their memory pool are gone before the next shape's peak memory is measured."""
    if _MODE == [(mode, dynamic)] and mode == "compile":
        return
    torch._dynamo.reset()  # frees CUDA-graph trees and compiled code of the previous mode / shape
    _MODE[:] = [(mode, dynamic)]
    from lorakit.layer_checkpointing import compile_inside
    from lorakit.train.compute import compile_options

    def settings() -> dict:
        if module_guards:
            return {"mode": None if mode == "compile" else mode, "dynamic": dynamic}
        # as `lorakit train --compile` compiles
        return {"dynamic": dynamic, "options": compile_options("default" if mode == "compile" else mode)}

    for layer in layers:
        if mode == "eager":
            layer._compiled_call_impl = None
            compile_inside(layer, None)
        elif not compile_inside(layer, lambda forward: torch.compile(forward, **settings())):  # offloaded: inside
            layer.compile(**settings())


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_cell(built: Built, opt: torch.optim.Optimizer | None, ids: torch.Tensor, mode: str, device: torch.device,
               warm: int, steps: int, autocast: bool = False, fresh: bool = True) -> dict[str, Any]:
    """``fresh``: empty the allocator's cache and reset the peak first (a profiled step must not, or it
    would time cudaMalloc / cudaFree that a steady step never calls)."""
    model = built.model
    graphs = mode == "reduce-overhead"

    def step() -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):  # as Trainer(bf16=True) runs
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    if fresh:
        reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(warm):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    step_s, host_s, losses = [], [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        host_s.append(t1 - t0)
        step_s.append(t2 - t0)
        losses.append(loss)
    med = statistics.median(step_s)
    return {"tokens_per_s": ids.numel() / med, "step_ms": 1e3 * med, "host_ms": 1e3 * statistics.median(host_s),
            "peak_GiB": peak_gib(device), "warmup_s": warm_s, "loss": float(losses[-1]),
            "step_ms_all": [round(1e3 * s, 3) for s in step_s]}


#: kernel families, by name prefix: cuBLAS GEMMs, Inductor's and lorakit's Triton kernels, attention, the rest
_FAMILIES = (("gemm", ("nvjet", "sm90_xmma", "cutlass", "ampere_", "sm80_")), ("inductor", ("triton_",)),
             ("lorakit", ("_xa_kernel", "_tall_kernel", "_merge_kernel", "_mask_kernel", "_fwd_kernel", "_bwd_kernel")),
             ("attention", ("cudnn", "flash", "fmha", "pytorch_flash")))


def _family(name: str) -> str:
    return next((fam for fam, prefixes in _FAMILIES if name.startswith(prefixes)), "other")


def profile_step(built: Built, opt: torch.optim.Optimizer | None, ids: torch.Tensor, mode: str,
                 device: torch.device, autocast: bool = False, top: int = 25) -> dict[str, Any]:
    """Where one (warm) training step's GPU time goes: kernel count and time, per family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_cell(built, opt, ids, mode, device, 0, 1, autocast, fresh=False)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] if device.type == "cuda" else []
    total = sum(e.self_device_time_total for e in kernels)
    kernels.sort(key=lambda e: -e.self_device_time_total)
    families: dict[str, list[float]] = {}
    for e in kernels:
        fam = families.setdefault(_family(e.key), [0, 0.0])
        fam[0] += e.count
        fam[1] += e.self_device_time_total / 1e3
    host = sorted((e for e in prof.key_averages() if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)
    return {"kernels": sum(e.count for e in kernels), "kernel_ms": total / 1e3,
            "families": {k: {"count": c, "ms": round(ms, 3)} for k, (c, ms) in families.items()},
            "host_top": [{"name": e.key[:90], "count": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 3)}
                         for e in host[:top]],
            "top": [{"name": e.key[:90], "count": e.count, "ms": round(e.self_device_time_total / 1e3, 3)}
                    for e in kernels[:top]]}


def decode_cell(model: torch.nn.Module, prompt: torch.Tensor, new: int, mode: str, device: torch.device) -> dict[str, Any]:
    """Greedy generation of exactly ``new`` tokens.  Compiled modes use a static KV cache (one decode shape):
    ``compile`` compiles the whole forward here (static shapes, no CUDA graphs); ``reduce-overhead`` leaves it to
    transformers' own ``generate``, which compiles the decode step with CUDA graphs for a static cache on a GPU (its
    default ``CompileConfig``) and runs the prefill eagerly: what users get from
    ``generate(..., cache_implementation="static")``.  Compiling the forward ourselves under reduce-overhead failed
    for every model, the plain one too (2026-12-03, H200: "accessing tensor output of CUDAGraphs that has been
    overwritten")."""
    kwargs: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if mode != "eager":
        kwargs["cache_implementation"] = "static"
        torch._dynamo.reset()
    if mode == "compile":
        model.forward = torch.compile(model.forward, dynamic=False)
    if mode != "reduce-overhead":
        kwargs["disable_compile"] = True  # compiled above (or eager): transformers must not compile on its own

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    try:
        return _timed_decode(run, prompt, device)
    finally:
        if "forward" in vars(model):
            del model.forward  # the class's forward again
        for module in model.modules():  # the model whose generate ran holds transformers' compiled decode step
            vars(module).pop("_compiled_call", None)
        torch._dynamo.reset()


def _timed_decode(run: Callable[[], torch.Tensor], prompt: torch.Tensor, device: torch.device) -> dict[str, Any]:
    reset_peak(device)
    t0 = time.perf_counter()
    out = run()  # warm-up: compilation, CUDA graphs
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    generated = out.shape[1] - prompt.shape[1]
    return {"tokens_per_s": generated / min(times), "new_tokens": generated, "warmup_s": warm_s,
            "peak_GiB": peak_gib(device)}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() == "none":  # decode only
        return []
    shapes = []
    for part in text.split(","):
        b, _, t = part.strip().lower().partition("x")
        if not (b.isdigit() and t.isdigit()):
            raise SystemExit(f"--shapes: {part!r} is not BATCHxSEQ (e.g. 1x512)")
        shapes.append((int(b), int(t)))
    return shapes


def run_worker(name: str, args: argparse.Namespace, out_json: str | None) -> dict[str, Any]:
    """One contender: build once, then per mode every shape and decode. Results are written after each cell."""
    device, dtype, shape = setup(args)
    res: dict[str, Any] = {"contender": name, "train": {}, "decode": {}, "errors": {}}

    def save() -> None:
        if out_json:
            with open(out_json + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(out_json + ".tmp", out_json)

    ctx = Ctx(shape, device, dtype, layer_kernels=args.modes == "eager")
    t0 = time.perf_counter()
    built = CONTENDERS[name](ctx)
    res["build_s"] = time.perf_counter() - t0
    res["notes"] = ctx.notes
    res["trainable"] = sum(p.numel() for p in built.params)
    layers = built.layers if built.layers is not None else decoder_layers(built.model)
    res["compiled_layers"] = len(layers)
    opt = torch.optim.AdamW(built.params, lr=1e-5, fused=device.type == "cuda") if built.params else None
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, shape.vocab, (1, args.prompt), generator=gen).to(device)
    for mode in args.modes.split(","):
        for b, t in parse_shapes(args.shapes):
            key = f"{mode}/{b}x{t}"
            ids = torch.randint(0, shape.vocab, (b, t), generator=gen).to(device)
            try:
                set_mode(layers, mode, dynamic=not args.static, module_guards=not args.no_module_guards)
                cell = train_cell(built, opt, ids, mode, device, args.warmup, args.steps, args.autocast)
                if args.profile:
                    try:
                        cell["profile"] = profile_step(built, opt, ids, mode, device, args.autocast)
                    except Exception as e:  # a profiler problem must not cost the timed cell
                        cell["profile"] = {"error": f"{type(e).__name__}: {e}"}
                cell["GFLOP"] = step_flops(shape, b, t, built.lora_r) / 1e9
                cell["GB"] = step_bytes(shape, b, t, built.lora_r) / 1e9
                res["train"][key] = cell
                mem = f"{cell['peak_GiB']:.2f} GiB" if cell["peak_GiB"] is not None else "-"
                print(f"  {name:10s} {key:22s} {cell['tokens_per_s'] / 1e3:8.2f}k tok/s  step {cell['step_ms']:8.2f} ms"
                      f"  host {cell['host_ms']:8.2f} ms  peak {mem}  (warm-up {cell['warmup_s']:.1f} s)", flush=True)
            except Exception as e:  # one failed cell (e.g. a CUDA-graph error) must not cost the others
                res["errors"][key] = f"{type(e).__name__}: {str(e)[:400]}"
                print(f"  {name:10s} {key:22s} FAILED {res['errors'][key]}", flush=True)
                traceback.print_exc(limit=3)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            save()
        if args.no_decode:
            continue
        key = f"{mode}/1x{args.prompt}+{args.new_tokens}"
        built.model.eval()
        try:
            # Decode does not use the compiled layers (decode_cell compiles its own way): with regional compilation
            # the static cache's in-place update inside each layer broke CUDA-graph trees for the frozen model and
            # lorakit alike (2026-12-03: "accessing tensor output of CUDAGraphs that has been overwritten"), and
            # under dynamic=True Inductor failed on it ("indices must be int64 ... float64").
            set_mode(layers, "eager", dynamic=False)
            cell = decode_cell(built.model, prompt, args.new_tokens, mode, device)
            res["decode"][key] = cell
            print(f"  {name:10s} decode {key:22s} {cell['tokens_per_s']:8.1f} tok/s (warm-up {cell['warmup_s']:.1f} s)",
                  flush=True)
        except Exception as e:
            res["errors"]["decode/" + key] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"  {name:10s} decode {key} FAILED {res['errors']['decode/' + key]}", flush=True)
            traceback.print_exc(limit=3)
        built.model.train()
        save()
    set_mode(layers, "eager", dynamic=False)
    return res


# ------------------------------------------------------------------------------ ceilings and correctness
def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Ceilings, then lorakit (inject + share_inputs + fuse_mlps) vs PEFT on the same weights and inputs."""
    import lorakit

    device, dtype, shape = setup(args)
    res: dict[str, Any] = {}
    if device.type == "cuda":
        from triton.testing import do_bench

        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        res["bf16_mm_TFLOPs"] = 2 * 8192**3 / do_bench(lambda: a @ b, return_mode="median") / 1e9
        src = torch.randn(2**28, device=device)
        dst = torch.empty_like(src)
        res["copy_TBps"] = 2 * src.numel() * 4 / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e9
        del a, b, src, dst
        print(f"ceilings: bf16 8192³ matmul {res['bf16_mm_TFLOPs']:.0f} TFLOP/s, copy {res['copy_TBps']:.2f} TB/s "
              "(read + write)", flush=True)
    ctx = Ctx(shape, device, dtype)
    b, t = args.check_shape
    res["check"] = compare_with_peft(ctx, lorakit_model(ctx), (b, t), use_dora=False)
    if "dora" in args.contenders.split(","):  # DoRA's own kernels are checked before DoRA is timed
        res["dora_check"] = compare_with_peft(ctx, lorakit_model(ctx, fuse=False, use_dora=True), (b, t), use_dora=True)
        res["check"]["ok"] = res["check"]["ok"] and res["dora_check"]["ok"]
    return res


def compare_with_peft(ctx: Ctx, ours: torch.nn.Module, check_shape: tuple[int, int], use_dora: bool) -> dict[str, Any]:
    """Loss and adapter gradients of ``ours`` against PEFT (same adapter kind) on a float32 base."""
    import lorakit

    # PEFT on the same base in the run's dtype (float32 adapters; bf16 adapters as benchmarked) and — the
    # reference — on a float32 base.  lorakit passes when its distance to the reference is within twice
    # PEFT's (a bf16 model's gradients through 16 layers differ from float32 ones by several percent,
    # whoever computes them; a wrong kernel is off by O(1)).
    shape, dtype = ctx.shape, ctx.dtype
    peft_fp32 = peft_model(ctx, fp32_adapters=True, use_dora=use_dora)
    peft_bf16 = peft_model(ctx, fp32_adapters=False, use_dora=use_dora)
    reference = peft_model(Ctx(shape, ctx.device, torch.float32), fp32_adapters=True, use_dora=use_dora)
    g = torch.Generator(device="cpu").manual_seed(7)
    ours_layers = dict(lorakit.lora_layers(ours))
    peers = [m.base_model.model for m in (peft_fp32, peft_bf16, reference)]

    def peer_params(peer: torch.nn.Module, name: str) -> list[torch.Tensor]:
        mod = peer.get_submodule(name)
        extra = [mod.lora_magnitude_vector["default"].weight] if use_dora else []
        return [mod.lora_A["default"].weight, mod.lora_B["default"].weight] + extra

    def our_params(layer: lorakit.LoraLayer) -> list[torch.Tensor]:
        extra = [layer.lora_magnitude["default"]] if use_dora else []
        return [layer.lora_A["default"], layer.lora_B["default"]] + extra

    with torch.no_grad():  # the same nonzero adapters everywhere, so every gradient path counts
        for name, layer in ours_layers.items():
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.02)
            if use_dora:  # a magnitude off the initial norm, so m matters
                m = layer.lora_magnitude["default"]
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g).to(m.device))
            for peer in peers:
                for dst, src in zip(peer_params(peer, name), our_params(layer)):
                    dst.copy_(src)
    b, t = check_shape
    ids = torch.randint(0, shape.vocab, (b, t), generator=g).to(ctx.device)
    losses, grads = [], []
    for model in (ours, peft_fp32, peft_bf16, reference):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([])
    for name, layer in ours_layers.items():
        grads[0] += [p.grad.flatten() for p in our_params(layer)]
        for gl, peer in zip(grads[1:], peers):
            gl += [p.grad.flatten() for p in peer_params(peer, name)]
    with torch.no_grad():  # the adapters must change the loss by more than the errors, or the check proves nothing
        loss_base = float(ctx.base_model()(input_ids=ids, labels=ids).loss)
    ref_loss, ref_grads = losses[-1], torch.cat(grads[-1])

    def errors(i: int) -> dict[str, float]:
        return {"loss": abs(losses[i] - ref_loss) / abs(ref_loss), "adapter_grads": rel(torch.cat(grads[i]), ref_grads),
                "worst_single_grad": max(rel(x, y) for x, y in zip(grads[i], grads[-1]))}

    errs, peft_fp32_errs, peft_bf16_errs = errors(0), errors(1), errors(2)
    peft_errs = {k: max(peft_fp32_errs[k], peft_bf16_errs[k]) for k in errs}
    floor = 1e-4  # float32 against float32 (the CPU run): both are at rounding level
    ok = all(errs[k] <= max(2 * peft_errs[k], floor) for k in errs)
    effect = abs(ref_loss - loss_base) / abs(loss_base)
    ok = ok and effect > 10 * max(errs["loss"], 1e-7)
    kind = "DoRA" if use_dora else "LoRA"
    print(f"{kind} correctness against PEFT on a float32 base, same weights and inputs ({b}x{t}, {str(dtype)[6:]}, "
          f"{len(ours_layers)} adapted linears), relative errors lorakit / PEFT fp32 adapters / PEFT bf16 adapters "
          f"({str(dtype)[6:]} base): " + ", ".join(f"{k} {v:.1e} / {peft_fp32_errs[k]:.1e} / {peft_bf16_errs[k]:.1e}"
                                                   for k, v in errs.items())
          + f"; the adapters move the loss by {effect:.1e}" + ("  ok" if ok else "  FAILED"), flush=True)
    return {"shape": f"{b}x{t}", "dtype": str(dtype), "kind": kind, "errors": errs,
            "peft_fp32_adapters_errors": peft_fp32_errs, "peft_bf16_adapters_errors": peft_bf16_errs, "ok": ok,
            "rule": "lorakit's error ≤ max(2 × PEFT's larger, 1e-4), all against PEFT on a float32 base",
            "adapters": len(ours_layers), "adapter_effect_on_loss": effect}


# -------------------------------------------------------------------------------------- the parent
def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, ModelShape]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return device, dtype, model_shape(args)


def model_shape(args: argparse.Namespace) -> ModelShape:
    return TINY if args.tiny else LLAMA_8B if args.model == "8b" else LLAMA_1B


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", help=f"comma-separated, of: {', '.join(CONTENDERS)} (default: "
                                        f"{','.join(DEFAULT_CONTENDERS)})")
    p.add_argument("--shapes", help=f"BATCHxSEQ list (default {SHAPES}; --quick {QUICK_SHAPES})")
    p.add_argument("--modes", help=f"of {','.join(MODES)} (default all; --quick eager,compile)")
    p.add_argument("--quick", action="store_true", help="a subset: shapes 1x512,8x2048, modes eager,compile")
    p.add_argument("--tiny", action="store_true", help=f"a tiny model ({TINY}) for a CPU smoke test")
    p.add_argument("--model", choices=("1b", "8b"), default="1b",
                   help=f"1b: {LLAMA_1B} (default); 8b: {LLAMA_8B} (issue 21's memory table)")
    p.add_argument("--static", action="store_true", help="compile per shape (dynamic=False) instead of once")
    p.add_argument("--no-module-guards", action="store_true",
                   help="compile as lorakit train does: without Dynamo's guards on module attributes")
    p.add_argument("--no-decode", action="store_true", help="skip the decode measurements")
    p.add_argument("--profile", action="store_true", help="after each cell, profile one step's GPU kernels")
    p.add_argument("--autocast", action="store_true", help="train under bf16 autocast (as Trainer(bf16=True) does)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check (never for figures you keep)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompt", type=int, help="decode prompt length (default 128; --tiny 8)")
    p.add_argument("--new-tokens", type=int, help="decode tokens generated (default 128; --tiny 8)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="output directory (default $OUT)")
    p.add_argument("--in-process", action="store_true", help="run every contender in this process (tests only)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per contender subprocess")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.contenders = args.contenders or ",".join(DEFAULT_CONTENDERS)
    unknown = [c for c in args.contenders.split(",") if c not in CONTENDERS]
    if unknown:
        p.error(f"--contenders: unknown {unknown}; registered: {', '.join(CONTENDERS)}")
    args.shapes = args.shapes or (TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else SHAPES)
    parse_shapes(args.shapes)
    args.modes = args.modes or ("eager,compile" if args.quick else ",".join(MODES))
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    args.prompt = args.prompt or (8 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.check_shape = (1, 16) if args.tiny else (1, 256)
    return args


def spawn(args: argparse.Namespace, argv: list[str], worker: str, path: str) -> dict[str, Any]:
    """Run ``worker`` in a fresh interpreter; its JSON (possibly partial) or the reason it has none."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", worker, "--worker-json", path]
    try:
        proc = subprocess.run(cmd, timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    res: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    if rc != 0:
        res.setdefault("errors", {})["process"] = f"exit status {rc}"
    return res


def table(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The printed tables: tokens/s (× the best frozen limit at that shape), peak GiB, host ms, MFU."""
    lines: list[str] = []
    shapes = [f"{b}x{t}" for b, t in parse_shapes(args.shapes)]
    modes = args.modes.split(",")
    rows = results["contenders"]
    peak = results.get("check", {}).get("bf16_mm_TFLOPs")

    def best(name: str, s: str) -> float | None:
        vals = [rows[name]["train"][f"{m}/{s}"]["tokens_per_s"] for m in modes
                if f"{m}/{s}" in rows.get(name, {}).get("train", {})]
        return max(vals) if vals else None

    limit = {s: best("frozen", s) for s in shapes} if "frozen" in rows else {}
    lines.append("tokens/s (median step) [× the best frozen limit at that shape] / peak GiB / host ms per step")
    lines.append(f"| contender | mode | " + " | ".join(shapes) + " |")
    lines.append("|---|---|" + "---|" * len(shapes))
    for name, r in rows.items():
        for m in modes:
            cells = []
            for s in shapes:
                c = r.get("train", {}).get(f"{m}/{s}")
                if c is None:
                    err = r.get("errors", {}).get(f"{m}/{s}") or r.get("errors", {}).get("process", "not run")
                    cells.append("fails: " + err[:60])
                    continue
                x = f" [{c['tokens_per_s'] / limit[s]:.2f}×]" if limit.get(s) else ""
                mem = f" / {c['peak_GiB']:.2f}" if c["peak_GiB"] is not None else ""
                cells.append(f"{c['tokens_per_s'] / 1e3:.1f}k{x}{mem} / {c['host_ms']:.1f}")
            lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("best mode per shape: tokens/s, × best frozen limit, × PEFT's best")
    for name in rows:
        parts = []
        for s in shapes:
            v, pe = best(name, s), best("peft", s) if "peft" in rows else None
            if v is None:
                parts.append(f"{s}: -")
                continue
            parts.append(f"{s}: {v / 1e3:.1f}k" + (f" {v / limit[s]:.2f}×lim" if limit.get(s) else "")
                         + (f" {v / pe:.2f}×peft" if pe else ""))
        lines.append(f"  {name:12s} " + "; ".join(parts))
    lines.append("")
    lines.append("work per step (model FLOPs, fewest bytes) and MFU of the best mode"
                 + (f" (against the measured bf16 matmul rate {peak:.0f} TFLOP/s)" if peak else ""))
    for name, r in rows.items():
        parts = []
        for s in shapes:
            cells = [c for k, c in r.get("train", {}).items() if k.endswith("/" + s)]
            if not cells:
                continue
            c = max(cells, key=lambda c: c["tokens_per_s"])
            mfu = f", MFU {c['GFLOP'] / c['step_ms'] / peak * 100:.0f}%" if peak else ""
            parts.append(f"{s}: {c['GFLOP']:.4g} GFLOP, {c['GB']:.3g} GB{mfu}")
        lines.append(f"  {name:12s} " + "; ".join(parts))
    dec = {n: r.get("decode", {}) for n, r in rows.items() if r.get("decode")}
    if dec:
        lines.append("")
        lines.append(f"decode tokens/s (1×{args.prompt} prompt, {args.new_tokens} new tokens, greedy; adapters unmerged; "
                     "the frozen model = the merged reference)")
        for name, cells in dec.items():
            lines.append(f"  {name:12s} " + "; ".join(f"{k.split('/')[0]}: {c['tokens_per_s']:.1f}" for k, c in cells.items()))
    errs = {n: r["errors"] for n, r in rows.items() if r.get("errors")}
    if errs:
        lines.append("")
        lines.append("errors:")
        for n, e in errs.items():
            for k, v in e.items():
                lines.append(f"  {n} {k}: {v}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker:
        if args.worker == "_check":
            res = run_check(args)
        else:
            res = run_worker(args.worker, args, args.worker_json)  # written after each cell: a crash keeps the rest
        with open(args.worker_json, "w") as f:
            json.dump(res, f, indent=1)
        return 0
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {"env": env(), "args": {k: v for k, v in vars(args).items() if k != "check_shape"},
                               "model": dataclasses.asdict(model_shape(args)), "contenders": {},
                               "compilation": "regional: layer.compile() on each decoder layer, dynamic="
                                              + ("False" if args.static else "True")
                                              + (", no guards on module attributes" if args.no_module_guards else "")}
    print(f"env: {results['env']}", flush=True)
    print(f"contenders {args.contenders}; shapes {args.shapes}; modes {args.modes}; {results['compilation']}", flush=True)
    t_start = time.perf_counter()

    def write() -> None:
        results["wall_s"] = time.perf_counter() - t_start
        with open(os.path.join(args.out, "gpu_shapes.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    def work(worker: str) -> dict[str, Any]:
        path = os.path.join(args.out, f".worker_{worker}.json")
        if args.in_process:
            return run_check(args) if worker == "_check" else run_worker(worker, args, path)
        return spawn(args, argv, worker, path)

    if not args.no_check:
        results["check"] = work("_check")
        write()
        if not results["check"].get("check", {}).get("ok"):
            print("CORRECTNESS CHECK FAILED (or did not run): nothing is timed", flush=True)
            return 1
    for name in args.contenders.split(","):
        print(f"\n== {name} ==", flush=True)
        results["contenders"][name] = work(name)
        write()
    lines = table(results, args)
    lines.append(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "gpu_shapes.txt"), "w") as f:
        f.write(text + "\n")
    write()
    return 0


def env() -> dict[str, Any]:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        import triton

        info["triton"] = triton.__version__
    return info


if __name__ == "__main__":
    sys.exit(main())
