"""Managing the adapters of an injected model: select, disable, delete, merge, count."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

from torch import nn

from .errors import AdapterNameError
from .fused_mlp import unfuse_mlps
from .inject import STATE_ATTR, _set_child, lora_modules, refresh, state_of
from .layers import LoraLayer
from .modules_to_save import ModulesToSave, TrainableTokens
from .nf4_linear import NF4Linear


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of the model, with its qualified name."""
    for name, module in lora_modules(model):
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into the model, in order of injection."""
    return list(state_of(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters forward currently adds (the same on every layer that has them)."""
    for _, layer in lora_layers(model):
        if layer.active_adapters:
            return list(layer.active_adapters)
    return []


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterNameError(f"no adapter named {unknown[0]!r}; the model has {known or 'no adapters (inject one first)'}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s): their updates add up; only they are trainable.

    An adapter that is merged but no longer active is unmerged first, so the output always
    equals base + the active adapters.
    """
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for _, layer in lora_layers(model):
        stale = [n for n in layer.merged_adapters if n not in names]
        if stale:
            layer.unmerge(stale)
    refresh(model, names)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base alone (merged updates are taken out and put back)."""
    touched: list[tuple[nn.Module, bool, list[str]]] = []
    try:
        for _, module in lora_modules(model):
            merged = list(getattr(module, "merged_adapters", []))
            if merged:
                module.unmerge()
            touched.append((module, module.disabled, merged))
            module.disabled = True
        yield model
    finally:
        for module, was_disabled, merged in touched:
            module.disabled = was_disabled
            if merged:
                module.merge(merged)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left without adapters become plain modules again."""
    _check_names(model, [name])
    for qualified, module in list(lora_modules(model)):
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.remove_adapter(name)
            if not module.lora_A:
                _set_child(model, qualified, module.base_layer)
        elif isinstance(module, ModulesToSave) and name in module.copies:
            del module.copies[name]
            module.active_adapters = [a for a in module.active_adapters if a != name]
            if not module.copies:
                _set_child(model, qualified, module.original_module)
    state = state_of(model)
    del state.configs[name]
    state.fingerprints.pop(name, None)
    if not state.configs:
        model.__dict__.pop(STATE_ATTR, None)


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """W ← W + s·BA for the given (default: active) adapters; merging twice changes nothing."""
    if adapter_names is not None:
        _check_names(model, adapter_names)
    for _, layer in lora_layers(model):
        layer.merge(None if adapter_names is None else [n for n in adapter_names if n in layer.lora_A])


def unmerge(model: nn.Module) -> None:
    """Undo every merge: W ← W − s·BA (exact up to the weight dtype's rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights and return plain modules with the original
    state-dict keys (modules_to_save keep the active adapter's trained copy).

    A 4-bit (NF4) base is dequantised into its original dtype first — every NF4 linear of the model,
    adapted or not — so the result is a plain full-precision model."""
    for name, module in list(lora_modules(model)):
        if isinstance(module, LoraLayer):
            if isinstance(module.base_layer, NF4Linear):
                module.base_layer = module.base_layer.to_linear()
            module.merge()
            _set_child(model, name, module.base_layer)
        elif isinstance(module, TrainableTokens):
            _set_child(model, name, module.merged_module())
        else:
            _set_child(model, name, module.current())
    unfuse_mlps(model)  # plain modules again: no MLP keeps lorakit's fused forward
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            _set_child(model, name, module.to_linear())
    model.__dict__.pop(STATE_ATTR, None)
    return model


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters, per LoRA layer and for the whole model."""

    trainable: int
    total: int
    per_layer: tuple[tuple[str, int, int], ...]  # (name, trainable, total)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len(n) for n, _, _ in self.per_layer] + [5])
        lines = [f"{'layer':<{width}}  {'trainable':>12}  {'all':>14}  {'%':>7}"]
        for name, trainable, total in self.per_layer:
            lines.append(f"{name:<{width}}  {trainable:>12,}  {total:>14,}  {100.0 * trainable / max(total, 1):>6.2f}%")
        lines.append(f"{'total':<{width}}  {self.trainable:>12,}  {self.total:>14,}  {self.percent:>6.2f}%")
        return "\n".join(lines)


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable / all parameters, per LoRA layer and in total (each tensor counted once)."""
    per_layer = []
    for name, module in lora_modules(model):
        params = list(module.parameters())
        per_layer.append((name, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)))
    params = list(model.parameters())
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        per_layer=tuple(per_layer),
    )
