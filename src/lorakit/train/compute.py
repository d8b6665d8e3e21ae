"""How the training step computes: the dtypes the frozen base and the adapters are kept in, and torch.compile.

Dtypes.  On a CUDA GPU the frozen base stays in bfloat16 when the checkpoint is bfloat16 or ``--bf16``
asks for it; everything trained (LoRA factors, ``modules_to_save`` copies) is float32, and so is
AdamW's state, which takes its parameters' dtype.  The step then runs under bfloat16 autocast.  Holding
the base in float32 and relying on autocast would keep two bytes per frozen weight more for nothing:
every product is computed in bfloat16 anyway.  On the CPU everything is float32.

Compilation.  ``--compile default`` / ``reduce-overhead`` compile each decoder layer alone
(``layer.compile()``, regional compilation): one compilation serves every layer, a model's outer parts
(embedding, loss) stay eager, and — since ``nn.Module.compile`` compiles in place — parameter names and
state dicts stay the plain module's (no ``_orig_mod.``), so checkpoints, ``--resume`` and adapter files
are the same whether a run was compiled or not.  Layers are compiled with ``dynamic=True``: batches are
padded to their longest example, so sequence lengths change from step to step and a shape-specialised
graph would recompile at each new length.  Evaluation runs eagerly (:func:`eager`).

Guards.  Before every call of a compiled layer Dynamo checks that what it read while tracing still holds
(its guards): input shapes and dtypes, global state such as grad mode and autocast, and every module
attribute the forward touched — for a LoRA layer its adapter bookkeeping (active adapters, scaling, dropout,
the factor containers), about 25 checks per adapted linear.  That check is host time each layer call pays,
and at small batches host time sets the pace.  A run never changes a module while its compiled layers run:
adapters are not switched, merged or added, and evaluation runs eagerly.  So the run drops the guards on
module attributes (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``) and keeps those on inputs, shapes
and global state.  Measured on the CPU (``benchmarks/cpu_host_ops.py``): a lorakit decoder layer's check
takes about half the time (94 → 48 µs a call; the frozen layer's 62 → 36).  The compiled regions are
removed when :meth:`Trainer.fit` ends, so a model handed back is never run by code that stopped checking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..layer_checkpointing import compile_inside, decoder_layers

#: values of ``--compile``; "auto" is what the option defaults to (see :func:`resolve_compile`)
COMPILE_MODES = ("off", "default", "reduce-overhead")

# The default on CUDA, from the measurements in benchmarks/RESULTS.md (H200, the 1.14B Llama, r = 16):
# reduce-overhead runs this model 1.4-3.6x faster than eager at every batch shape once compiled
# (gpu_shapes.py, one run), and `lorakit train --compile reduce-overhead` works (liger's loss kernel
# only inside compiled layers) at 27.1k steady tokens/s at 1 x 2048, 4.44 GiB.  It stays opt-in because
# (a) compiling costs about 70 s before the first step, more than a short run saves; (b) the causal-lm
# default has dropout 0.05, whose compiled CUDA route (custom_ops.dense_dropout_lora) has never run
# under CUDA graphs on a GPU; (c) CUDA graphs are recorded per batch shape (pad_for_graphs bounds how
# many).  The README recommends --compile reduce-overhead for long runs.
CUDA_DEFAULT_COMPILE = "off"


def base_dtype(model: nn.Module, device: torch.device, bf16: bool) -> torch.dtype:
    """The dtype the frozen base is kept in: bfloat16 on CUDA when ``bf16`` or when most of the
    checkpoint's floating-point parameters (by count) are bfloat16; float32 otherwise (always on the CPU)."""
    if device.type != "cuda":
        return torch.float32
    if bf16:
        return torch.bfloat16
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return torch.bfloat16 if counts and max(counts, key=counts.__getitem__) == torch.bfloat16 else torch.float32


def cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to ``dtype``, except those of modules transformers keeps in float32
    (``_keep_in_fp32_modules``) when ``dtype`` is lower.  Buffers (e.g. rotary frequencies) stay as the
    model made them: they are small, and some must stay float32."""
    keep: set[str] = set()
    if dtype != torch.float32:
        for m in model.modules():
            keep.update(getattr(m, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.dtype == dtype:
                continue
            if keep and any(k in name.split(".") for k in keep):
                continue
            p.data = p.data.to(dtype)


def trainable_to_float32(model: nn.Module) -> None:
    """Every trained parameter in float32 (so AdamW's moments are float32 too)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()


def optimizer_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation: ``fused`` on CUDA (one multi-tensor kernel per step), torch's default elsewhere.

    The LoRA step updates a few hundred small tensors (two per adapted linear); the default ``foreach``
    implementation issues about a dozen multi-tensor kernels for them, each with its own host time, which
    matters where the step is bound by the host (batch 1, CUDA graphs: the optimizer stays eager).  The
    fused kernel computes the same update; its state (``step`` on the device) loads from either kind's
    checkpoint (``Optimizer.load_state_dict`` moves it)."""
    return {"fused": True} if device.type == "cuda" else {}


def resolve_compile(mode: str, device: torch.device) -> str:
    """``--compile``'s value for this run: "auto" is :data:`CUDA_DEFAULT_COMPILE` on CUDA, "off" elsewhere."""
    if mode == "auto":
        return CUDA_DEFAULT_COMPILE if device.type == "cuda" else "off"
    return mode


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """The modules ``--compile`` compiles: the model's decoder layers
    (:func:`lorakit.layer_checkpointing.decoder_layers`, the same blocks activation checkpointing wraps),
    else the whole model."""
    return decoder_layers(model) or [model]


def compile_options(mode: str) -> dict:
    """``torch.compile`` options for ``mode`` ("default" or "reduce-overhead") without the guards on module
    attributes (the module docstring says why that is safe in a run); torch < 2.8 has no guard filter and
    keeps them.  Options, not ``mode=``: torch.compile takes one or the other, so the mode's own options are
    spelled out (for "reduce-overhead", Inductor's CUDA graphs)."""
    import torch._inductor  # (loaded by compiling anyway)

    options = dict(torch._inductor.list_mode_options(mode))
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip is not None:
        options["guard_filter_fn"] = skip
    return options


def compile_model(model: nn.Module, mode: str) -> int:
    """Compile ``model``'s regions (:func:`compile_regions`) in place with ``torch.compile`` mode ``mode``
    ("default" or "reduce-overhead", with :func:`compile_options`); "off" undoes it.  A layer checkpointed
    with "offload" is compiled inside its checkpoint (:func:`lorakit.layer_checkpointing.compile_inside` says
    why).  Returns the number of regions compiled."""
    regions = compile_regions(model)
    if mode != "off":
        # A LoRA layer with dropout draws its mask seed with torch.randint inside the compiled region;
        # Inductor's own generator would draw other seeds than eager mode, so a compiled run would train
        # another adapter than an eager one.  Falling back to torch's generator keeps them identical
        # (one scalar draw per layer and step: no measurable cost).
        import torch._inductor.config

        torch._inductor.config.fallback_random = True

    def compile_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(forward, dynamic=True, options=compile_options(mode))

    for region in regions:
        if mode == "off":
            region._compiled_call_impl = None  # what nn.Module.compile sets; None is eager again
            compile_inside(region, None)
        elif not compile_inside(region, compile_forward):
            region.compile(dynamic=True, options=compile_options(mode))  # (a fresh dict: torch.compile pops from it)
    return 0 if mode == "off" else len(regions)


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s compiled regions eagerly inside the block (evaluation: a no-grad pass at other
    shapes would compile a second set of graphs — and record CUDA graphs — for a small share of the run)."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    offloaded = []  # (layer, its forward compiled inside the checkpoint)
    for m in model.modules():
        forward = m.__dict__.get("forward")
        if compile_inside(m, None):
            offloaded.append((m, forward))
    try:
        yield
    finally:
        for m, fn in compiled:  # the same compiled callables: their caches are kept
            m._compiled_call_impl = fn
        for m, forward in offloaded:
            m.forward = forward


#: ``--compile reduce-overhead`` pads sequence lengths to a multiple of this (see :func:`pad_for_graphs`)
GRAPH_LENGTH_MULTIPLE = 64


def pad_for_graphs(batch: object, pad_token_id: int | None, multiple: int = GRAPH_LENGTH_MULTIPLE) -> object:
    """Right-pad a token batch's sequence length to a multiple of ``multiple``, so CUDA graphs (recorded once
    per shape) meet a few lengths instead of one per batch.

    Applies to a dict with 2-D ``input_ids`` and ``attention_mask`` (B, T): every (B, T) tensor of it grows
    to (B, T'), ``input_ids`` with ``pad_token_id`` (0 if None), ``labels`` with -100, the rest with 0.  The
    added positions are masked out and carry no label, and come after every real token, so a causal model's
    outputs at real tokens and the mean loss are unchanged.  Anything else is returned as it is.
    """
    if not isinstance(batch, dict):
        return batch
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if not (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.dim() == 2
            and mask.shape == ids.shape):
        return batch
    extra = -ids.shape[1] % multiple
    if not extra:
        return batch
    fills = {"input_ids": pad_token_id or 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fills.get(k, 0))
            if isinstance(v, torch.Tensor) and v.shape == ids.shape else v for k, v in batch.items()}
