"""Many adapters on one model at once: mixed-adapter batches and hot swapping.

Mixed batches::

    with lorakit.batch_adapters(model, ["a", "b", None, "a"]):   # one entry per sample
        logits = model(input_ids).logits                           # sample 2 is the base model
        out = model.generate(input_ids, max_new_tokens=20)         # works the same

Inside the block every LoRA linear layer adds, to each token, the update of its own sample's adapter
through one segmented pass (:func:`lorakit.ops.segmented.segmented_lora`) over the adapters' weights
stacked as (n, R, k) / (n, d, R) tensors; the model's own forward knows nothing of this.  The layer's
own low-rank branch is switched off in the block and a forward hook adds the segmented update to the
base output instead, so nothing in ``layers.py`` needs to know about mixed batches.

How a per-sample assignment becomes a per-token one: a layer's input x has the batch as its leading
dimension, (batch, seq, k) in transformers (seq = 1 in each step of ``generate``; the batch stays the
same across steps).  If the leading dimension is a multiple m of the number of samples (beam search
and ``num_return_sequences`` repeat each sample m times in a row, as transformers'
``repeat_interleave`` does), each sample's entry is repeated m times.

Training works too: in training mode gradients reach each adapter only from its own samples
(multi-tenant fine-tuning in one batch); the stacks are rebuilt from the live parameters on every
forward so autograd sees them, and cached between forwards when no gradient is needed.

Hot swap (:func:`hot_swap`) copies another adapter's weights into an existing adapter's parameters in
place — same tensors, same shapes, same Python floats — so neither re-injection nor a
``torch.compile`` recompilation is needed.  Ranks are padded to the slot's rank (declare the largest
rank you will load when you inject the slot); the new adapter's scale is folded into B, so the
layer's ``scaling`` float stays what it was.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import adapter_names, lora_layers
from .errors import AdapterMismatchError, AdapterNameError, ConfigError, MergeError, UnsupportedModuleError
from .inject import lora_modules, state_of
from .io import AdapterFile, layer_params, read_adapter, training_variant_state
from .peft_keys import PREFIX
from .layers import LoraEmbedding, LoraLayer, LoraLinear
from .modules_to_save import ModulesToSave
from .ops import backends
from .ops.segment_plan import SegmentPlan, plan_segments
from .ops.segmented import segmented_lora, segmented_lora_embedding


def _triton_segmented():
    """The Triton segmented kernels, imported on first use (only where CUDA is)."""
    from .ops import triton_segmented

    return triton_segmented


_VERSION = operator.attrgetter("_version")


class _Stacks:
    """One layer's adapters for a mixed batch, stacked: A (m, R, k), B (m, d, R), scales, ranks."""

    def __init__(self, layer: LoraLinear | LoraEmbedding, names: list[str]) -> None:
        self.layer, self.names = layer, names
        self.R = max(layer.r[n] for n in names)
        self._cached: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        device = layer.lora_A[names[0]].device
        # the scales in the adapters' dtype where that is float64 (α/√r is not a float32 number); float32 else
        dtype = torch.float64 if layer.lora_A[names[0]].dtype == torch.float64 else torch.float32
        self.scales = torch.tensor([layer.scaling[n] for n in names], dtype=dtype, device=device)
        self.ranks = torch.tensor([layer.r[n] for n in names], dtype=torch.int32, device=device)
        ps = {layer.dropout_p[n] for n in names}
        self.dropout = ps.pop() if len(ps) == 1 else None  # None: the adapters disagree
        # captured once: looking parameters up in ParameterDicts on every forward costs more host time
        # than a decode step's kernels
        self.params = [t for n in names for t in (layer.lora_A[n], layer.lora_B[n])]

    def _build(self) -> tuple[Tensor, Tensor]:
        A = torch.stack([F.pad(self.layer.lora_A[n], (0, 0, 0, self.R - self.layer.r[n])) for n in self.names])
        B = torch.stack([F.pad(self.layer.lora_B[n], (0, self.R - self.layer.r[n])) for n in self.names])
        return A, B

    def get(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The stacks; rebuilt (differentiably) whenever a gradient may be needed, else cached in
        ``dtype`` (the activations') until a weight changes."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.params):
            return self._build()
        # a hot swap or an optimizer step bumps _version; map + attrgetter keeps this check cheap (it
        # runs per layer per forward: a generator over 128 parameters cost ~60 µs, this ~10 µs)
        key = (dtype, sum(map(_VERSION, self.params)))
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                A, B = self._build()
                self._cached = (key, (A.to(dtype), B.to(dtype)))
        return self._cached[1]


class _MixedBatch:
    """The state of one ``batch_adapters`` block: per-sample slots and per-layer stacks."""

    def __init__(self, model: nn.Module, names: Sequence[str | None]) -> None:
        known = adapter_names(model)
        unknown = sorted({n for n in names if n is not None and n not in known})
        if unknown:
            raise AdapterNameError(f"no adapter named {unknown[0]!r}; the model has {known or 'no adapters'}")
        self.n_samples = len(names)
        if not self.n_samples:
            raise AdapterNameError("batch_adapters needs one adapter name (or None) per sample; got an empty list")
        self.unique = list(dict.fromkeys(n for n in names if n is not None))
        self.sample_slot = [-1 if n is None else self.unique.index(n) for n in names]
        self.layers: dict[LoraLayer, tuple[_Stacks, tuple[int, ...]]] = {}
        self._plans: dict[tuple, SegmentPlan] = {}
        for qualified, layer in lora_layers(model):
            present = [n for n in self.unique if n in layer.lora_A]
            if not present:
                continue
            if layer.merged_adapters:
                raise MergeError(
                    f"layer {qualified!r} has merged adapters {layer.merged_adapters}; a mixed batch needs the base "
                    "weights alone: call lorakit.unmerge(model) first"
                )
            if not isinstance(layer, (LoraLinear, LoraEmbedding)):
                raise UnsupportedModuleError(
                    f"layer {qualified!r} is a {type(layer).__name__}; mixed-adapter batches support nn.Linear, "
                    "transformers Conv1D and nn.Embedding layers: leave it out of these adapters' target_modules"
                )
            if any(n in layer.lora_bias or n in getattr(layer, "blocks", {}) for n in present):
                raise UnsupportedModuleError(
                    f"layer {qualified!r}: adapters with a lora_bias or BD-LoRA blocks cannot be mixed in one batch; "
                    "batch them separately"
                )
            # this layer's slot of each batch-wide slot (-1: the adapter does not adapt this layer)
            local = tuple(present.index(n) if n in present else -1 for n in self.unique)
            self.layers[layer] = (_Stacks(layer, present), local)

    def token_plan(self, lead: tuple[int, ...], device: torch.device, local: tuple[int, ...]) -> SegmentPlan:
        """The adapter slot of each token (a layer input's leading shape ``lead``) for a layer whose
        slots are ``local``; cached, so all layers of one forward share one plan."""
        key = (lead, local, device)
        plan = self._plans.get(key)
        if plan is None:
            if not lead or lead[0] % self.n_samples:
                raise AdapterMismatchError(
                    f"batch_adapters was given {self.n_samples} adapter names but a layer's input has leading "
                    f"shape {lead}: its first (batch) dimension must be a multiple of {self.n_samples}"
                )
            per_sample = torch.tensor([local[s] if s >= 0 else -1 for s in self.sample_slot], dtype=torch.int64)
            rows = per_sample.repeat_interleave(lead[0] // self.n_samples)  # beams / return sequences repeat rows
            index = rows.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
            plan = plan_segments(index.to(device), max(local) + 1)
            self._plans[key] = plan
        return plan

    def hook(self, layer: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        stacks, local = self.layers[layer]  # type: ignore[index]
        (x,) = inputs
        if isinstance(layer, LoraEmbedding):  # x: ids (...)
            A, B = stacks.get(layer.lora_A[stacks.names[0]].dtype)
            plan = self.token_plan(tuple(x.shape), x.device, local)
            return segmented_lora_embedding(x, plan, A, B, stacks.scales, stacks.ranks, base=output,
                                            padding_idx=layer.base_layer.padding_idx)
        A, B = stacks.get(x.dtype)
        if layer.training and stacks.dropout is None:
            raise UnsupportedModuleError(
                f"adapters {stacks.names} have different dropout probabilities; a mixed training batch needs one "
                "(set the same dropout, or train in eval mode)"
            )
        plan = self.token_plan(tuple(x.shape[:-1]), x.device, local)
        p = stacks.dropout if layer.training else 0.0
        if (x.is_cuda and not p and not torch.is_grad_enabled() and output.dtype == x.dtype
                and output.is_contiguous() and backends.TRITON_USABLE and _triton_segmented().available()):
            # Serving: the plan and stacks were checked when built, so go straight to the kernels and
            # accumulate into the fresh base output. Host time is what a decode step is made of here.
            k, d = x.shape[-1], output.shape[-1]
            _triton_segmented().forward_into(output.view(-1, d), x.reshape(-1, k), plan, A, B, stacks.scales, stacks.ranks)
            return output
        x_low = F.dropout(x, p, training=True) if p else x  # the branch's input; the base saw x itself
        return segmented_lora(x_low, plan, A, B, stacks.scales, stacks.ranks, base=output, inplace=True)


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, sample i of each batch uses adapter ``names[i]`` (None: the base model alone).

    Every LoRA linear layer computes ``h_t = W x_t + b + s_a · B_a A_a x_t`` with a = the adapter of
    token t's sample, through one segmented low-rank pass per layer (Triton kernels on CUDA). Works
    for any model whose forward knows nothing of adapters, ``generate`` included, in eval and in
    training mode (each adapter's gradient comes from its own samples only). The active-adapter
    selection is ignored inside the block and restored after it.

    Args:
        model: a model with adapters injected (``lorakit.inject`` / ``lorakit.load_adapter``).
        names: one adapter name or None per sample; a layer's batch dimension may be a multiple of
            ``len(names)`` (each sample repeated in a row, as beam search does).

    Raises:
        AdapterNameError: an unknown name.   MergeError: a layer has merged adapters.
        UnsupportedModuleError: a named adapter adapts a Conv2d layer.   ConfigError: a DoRA adapter.
    """
    batch = _MixedBatch(model, names)
    configs = state_of(model).configs
    dora = sorted({n for n in names if n is not None and configs[n].use_dora})
    if dora:
        raise ConfigError(f"adapter {dora[0]!r} is a DoRA adapter; batch_adapters mixes plain LoRA adapters only — "
                          "run DoRA adapters one at a time with lorakit.set_adapter")
    saved: list[tuple[LoraLayer, bool]] = []
    handles = []
    try:
        for _, layer in lora_layers(model):
            saved.append((layer, layer.disabled))
            layer.disabled = True  # the layer computes the base alone; the hook adds the segmented update
            if layer in batch.layers:
                handles.append(layer.register_forward_hook(batch.hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer, disabled in saved:
            layer.disabled = disabled


def hot_swap(
    model: nn.Module, adapter_name: str, source: str | os.PathLike | AdapterFile, *, strict: bool = True
) -> None:
    """Load the adapter at ``source`` into the parameters of adapter ``adapter_name``, in place.

    The slot keeps its tensors, shapes and ``scaling`` floats, so nothing is re-injected and a
    ``torch.compile``d model is not recompiled. Per layer, with slot rank R and scale s, and the new
    adapter's rank r ≤ R and scale s':

        A_slot ← [A'; 0]  (R, k)        B_slot ← (s'/s) · [B', 0]  (d, R)    ⇒  s · B_slot A_slot = s' · B' A'

    Layers of the slot the new adapter does not adapt get ΔW = 0 (A and B zeroed).

    Args:
        source: an adapter directory (lorakit or PEFT layout) or an :class:`AdapterFile`.
        strict: refuse a new adapter whose base-model fingerprint differs from the slot's base.

    Raises:
        AdapterNameError: no adapter ``adapter_name``.
        AdapterMismatchError: a rank above the slot's (inject the slot with a larger r), a layer
            or module the slot does not have, or a shape that does not fit. Nothing is changed then.
    """
    if adapter_name not in adapter_names(model):
        raise AdapterNameError(f"no adapter named {adapter_name!r} to swap into; the model has {adapter_names(model)}")
    adapter = source if isinstance(source, AdapterFile) else read_adapter(source)
    where = adapter.path
    if adapter.config.use_dora or state_of(model).configs[adapter_name].use_dora:
        raise AdapterMismatchError(f"{where}: hot_swap swaps plain LoRA adapters only; this one or slot "
                                   f"{adapter_name!r} is DoRA — load it with lorakit.load_adapter instead")
    for config in (adapter.config, state_of(model).configs[adapter_name]):
        extra = [f for f in ("lora_bias", "target_parameters", "trainable_token_indices", "use_bdlora") if getattr(config, f)]
        if extra:
            raise AdapterMismatchError(f"{where}: hot_swap swaps plain B·A adapters only; this one or slot "
                                       f"{adapter_name!r} uses {extra[0]} — load it with lorakit.load_adapter instead")
    for qualified, module in lora_layers(model):
        if adapter_name in module.lora_A and len(layer_params(module, adapter_name)) != 2:
            raise AdapterMismatchError(f"{where}: hot_swap swaps plain B·A adapters only; layer {qualified!r} is a "
                                       f"{type(module).__name__} — load the adapter with lorakit.load_adapter instead")
    found: dict[str, Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterMismatchError(f"{where}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        found[key[len(PREFIX):]] = tensor
    # a VeLoRA / MonteCLoRA file swaps in as the plain LoRA it computes: its training state is left out
    slot_layers = [qualified for qualified, module in lora_layers(model) if adapter_name in module.lora_A]
    for key in training_variant_state(model, adapter, found, slot_layers):
        del found[key]
    if strict:
        _check_fingerprint(model, adapter_name, adapter)
    plan: list[tuple[Tensor, Tensor]] = []  # (parameter, new value) — all checked before any write
    used: set[str] = set()
    for qualified, module in lora_modules(model):
        if isinstance(module, ModulesToSave):
            if adapter_name not in module.copies:
                continue
            for key, param in layer_params(module, adapter_name).items():
                full = f"{qualified}.{key}"
                if full not in found:
                    raise AdapterMismatchError(f"{where}: missing key {PREFIX + full!r} for the slot's module to save")
                plan.append((param, found[full].reshape(param.shape)))
                used.add(full)
            continue
        if adapter_name not in module.lora_A:
            continue
        keys = list(layer_params(module, adapter_name))
        A_slot, B_slot = module.lora_A[adapter_name], module.lora_B[adapter_name]
        R = A_slot.shape[0]
        newA, newB = (found.get(f"{qualified}.{k}") for k in keys)
        if newA is None and newB is None:  # the new adapter leaves this layer alone
            plan += [(A_slot, torch.zeros_like(A_slot)), (B_slot, torch.zeros_like(B_slot))]
            continue
        if newA is None or newB is None:
            raise AdapterMismatchError(f"{where}: {qualified} has only one of {keys}")
        used.update(f"{qualified}.{k}" for k in keys)
        if newA.dim() < 2 or newB.dim() < 2 or 0 in (*newA.shape, *newB.shape):
            raise AdapterMismatchError(
                f"{where}: {qualified} has A {tuple(newA.shape)} / B {tuple(newB.shape)}; LoRA factors are non-empty "
                "matrices (r ≥ 1): the file is damaged or not a LoRA adapter"
            )
        r = newA.shape[0]
        newA, newB = newA.reshape(r, -1), newB.reshape(newB.shape[0], -1)
        if r > R:
            raise AdapterMismatchError(
                f"{where}: {qualified} has rank {r} but slot {adapter_name!r} holds rank {R}; inject the slot with "
                f"r ≥ {r} (the largest rank you will swap in)"
            )
        if newA.shape[1] != A_slot.shape[1] or newB.shape != (B_slot.shape[0], r):
            raise AdapterMismatchError(
                f"{where}: {qualified} has A {tuple(newA.shape)} / B {tuple(newB.shape)}, the slot needs "
                f"({r}, {A_slot.shape[1]}) / ({B_slot.shape[0]}, {r})"
            )
        ratio = adapter.config.scale_for(qualified) / module.scaling[adapter_name]
        A_new, B_new = torch.zeros_like(A_slot), torch.zeros_like(B_slot)
        A_new[:r] = newA.to(A_new)
        B_new[:, :r] = newB.to(device=B_new.device, dtype=torch.float64).mul(ratio).to(B_new.dtype)
        plan += [(A_slot, A_new), (B_slot, B_new)]
    extra = sorted(set(found) - used)
    if extra:
        raise AdapterMismatchError(
            f"{where}: {PREFIX + extra[0]!r} ({len(extra)} key(s) in all) has no place in slot {adapter_name!r}; "
            "inject the slot with target_modules covering every module the swapped adapters adapt"
        )
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value)


def _check_fingerprint(model: nn.Module, adapter_name: str, adapter: AdapterFile) -> None:
    from .fingerprint import describe_mismatch
    from .inject import state_of

    saved, ours = adapter.fingerprint, state_of(model).fingerprints.get(adapter_name)
    if saved is None or ours is None:
        return
    saved_modules, our_modules = dict(saved.get("modules", {})), dict(ours.get("modules", {}))
    if set(saved_modules) == set(our_modules):
        problem = describe_mismatch(saved, ours)
    else:  # the checksum covers a different set of modules: compare names and shapes only
        problem = describe_mismatch({"modules": saved_modules}, {"modules": our_modules})
    if problem:
        raise AdapterMismatchError(
            f"{adapter.path} was trained on another base model: {problem}; pass strict=False to swap it in anyway"
        )


__all__ = ["batch_adapters", "hot_swap"]
