"""Finding target modules and wrapping them: ``inject``.

Targets are found by structure (module type) and by name (the config's rules), never by substrings
of parameter names.  ``inject`` is all-or-nothing: every target is resolved and checked before the
model is touched, and a failure while wrapping restores the model as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterNameError, TargetError, UnsupportedFeatureError, UnsupportedModuleError
from .fingerprint import WeightSample, fingerprint, weight_checksum
from .layers import ADAPTABLE, LoraLayer, LoraLinear, LoraParameter, is_hf_conv1d, supports, wrap
from .modules_to_save import ModulesToSave, TrainableTokens
from .patterns import fullmatch, is_plain
from .nf4_linear import NF4Linear

STATE_ATTR = "_lorakit"


@dataclasses.dataclass
class LorakitState:
    """What lorakit remembers on an injected model: each adapter's config and base fingerprint."""

    configs: dict[str, LoraConfig] = dataclasses.field(default_factory=dict)
    fingerprints: dict[str, dict] = dataclasses.field(default_factory=dict)


def state_of(model: nn.Module) -> LorakitState:
    """The model's LorakitState (an empty one if nothing was injected)."""
    return model.__dict__.get(STATE_ATTR) or LorakitState()


def candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(qualified name, module in the tree, the base module it stands for), wrappers seen through.

    A LoRA layer is listed under its own name with its base module; what is inside it is not listed.
    """

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, nn.Module]]:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if isinstance(child, LoraLayer):
                yield name, child, child.base_layer
                inner = child.base_layer
                while isinstance(inner, LoraLayer):  # nested parameter wrappers: PEFT's <module>.base_layer
                    name += ".base_layer"
                    yield name, inner, inner.base_layer
                    inner = inner.base_layer
            elif isinstance(child, ModulesToSave):
                yield name, child, child.original_module
            else:
                yield name, child, child
                yield from walk(child, name + ".")

    return walk(model, "")


def name_matches(entry: str, name: str) -> bool:
    """A list entry matches a module's full dotted name or a dotted suffix of it."""
    return name == entry or name.endswith("." + entry)


def _matches(spec: tuple[str, ...] | str | None, name: str, what: str = "target_modules") -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):  # a regex over the whole name, matched in bounded time
        return name == spec if is_plain(spec) else fullmatch(spec, name, what=what)
    return any(name_matches(entry, name) for entry in spec)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def resolve_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config.modules_to_save`` names.

    With ``config.strict_targets`` (a config a user wrote) an entry is a full name or dotted
    suffix and every entry must match; otherwise (a config read from an adapter file) PEFT's rule
    applies: any suffix of the name matches and entries that match nothing are ignored (PEFT writes
    ``["classifier", "score"]`` for every sequence-classification model).
    """
    strict = config.strict_targets
    found = [
        (name, entry)
        for name, _, _ in candidates(model)
        for entry in config.modules_to_save
        if (name_matches(entry, name) if strict else name.endswith(entry))
    ]
    unmatched = [e for e in config.modules_to_save if e not in {entry for _, entry in found}]
    if unmatched and strict:
        raise TargetError(f"modules_to_save entries {unmatched} match no module of the model; {_hint(model)}")
    names = sorted({name for name, _ in found})
    return [n for n in names if not any(n.startswith(outer + ".") for outer in names)]  # the outermost of nested matches


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config`` adapts, in model order.

    Raises:
        TargetError: no target_modules given, an entry that matches nothing, or nothing matched.
        UnsupportedModuleError: a matched module that lorakit cannot adapt.
    """
    spec = config.target_modules
    if spec is None and config.target_parameters:
        spec = ()
    if spec is None:
        raise TargetError("target_modules is not set; name the modules to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    saved = set(resolve_modules_to_save(model, config))
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    targets: list[str] = []
    unsupported: list[str] = []
    used_entries: set[str] = set()
    # nn.MultiheadAttention never calls its out_proj's forward (it reads the weight): adapt the attention itself
    inside_attention = {name + ".out_proj" for name, _, base in candidates(model) if isinstance(base, nn.MultiheadAttention)}
    for name, _, base in candidates(model):
        if name in saved or any(name.startswith(s + ".") for s in saved) or _matches(config.exclude_modules, name, "exclude_modules"):
            continue
        if name in inside_attention:
            if spec != ALL_LINEAR and _matches(spec, name):
                unsupported.append(f"{name} (the out_proj of an nn.MultiheadAttention: target the attention module)")
                used_entries.update(entry for entry in spec if isinstance(spec, tuple) and name_matches(entry, name))
            continue
        if spec == ALL_LINEAR:
            if _is_linear(base) and base is not head:
                targets.append(name)
            continue
        if not _matches(spec, name):
            continue
        if isinstance(spec, tuple):
            used_entries.update(entry for entry in spec if name_matches(entry, name))
        if supports(base):
            targets.append(name)
        elif isinstance(spec, tuple) or not list(base.children()):  # a regex may match containers
            unsupported.append(f"{name} ({type(base).__name__})")
    if unsupported:
        raise UnsupportedModuleError(
            f"target_modules matches modules lorakit cannot adapt: {', '.join(unsupported[:5])}; "
            f"lorakit adapts {ADAPTABLE} — narrow target_modules"
        )
    bases = {name: base for name, _, base in candidates(model)}
    quantized = [f"{name} ({bases[name].weight.dtype})" for name in targets if _quantized(bases[name])]
    if quantized:  # e.g. bitsandbytes' Linear4bit/Linear8bitLt: nn.Linear subclasses with packed integer weights
        raise UnsupportedModuleError(
            f"target_modules matches layers with quantized (integer) weights: {', '.join(quantized[:5])}; lorakit "
            "cannot compute with bitsandbytes' layers — load the base in bfloat16, float16 or float32 and call "
            "lorakit.quantize_base(model, 'nf4'), or load the load_in_4bit checkpoint with lorakit.quantize_checkpoint"
        )
    if isinstance(spec, tuple) and config.strict_targets:  # PEFT ignores entries that match nothing; a user's typo is caught
        unmatched = [entry for entry in spec if entry not in used_entries]
        if unmatched:
            raise TargetError(f"target_modules entries {unmatched} match no module of the model (a typo?); {_hint(model)}")
    if not targets and not config.target_parameters:
        raise TargetError(f"target_modules {spec!r} matches no adaptable module; {_hint(model)}")
    return targets


def resolve_parameters(model: nn.Module, config: LoraConfig) -> list[tuple[str, list[str]]]:
    """(module name, its parameter names to adapt, innermost wrapper first) for ``config.target_parameters``.

    An entry names ``<module>.<parameter>`` in full or by a dotted suffix, as in PEFT; a module's
    parameters nest in the order the module registers them, and a parameter some earlier adapter
    already wraps keeps its wrapper.  Raises TargetError for an entry that matches nothing (from a
    user's config) or when nothing matches (from a file).
    """
    entries = config.target_parameters or ()
    found: list[tuple[str, list[str]]] = []
    used: set[str] = set()
    for name, module, base in candidates(model):
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
            continue
        if name.endswith(".base_layer") and isinstance(module, LoraParameter):
            continue  # an inner wrapper: its module is listed once, under the outermost wrapper's name
        owner = module.module() if isinstance(module, LoraParameter) else module
        wrapped = _wrapped_parameters(module)
        names = list(wrapped)
        for pname, _ in owner.named_parameters(recurse=False):
            hits = [e for e in entries if name_matches(e, f"{name}.{pname}")]
            used.update(hits)
            if hits and pname not in names:
                names.append(pname)
        if len(names) > len(wrapped) or any(name_matches(e, f"{name}.{p}") for e in entries for p in wrapped):
            found.append((name, names))
    unmatched = [e for e in entries if e not in used]
    if entries and (unmatched and config.strict_targets or len(unmatched) == len(entries)):
        raise TargetError(f"target_parameters entries {unmatched} match no parameter of the model (name them "
                          "'<module>.<parameter>', e.g. 'mlp.experts.gate_up_proj')")
    return found


def resolve_tokens(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Embedding name → token ids for ``config.trainable_token_indices`` (PEFT's rule: a list means the
    model's input embeddings, else a module named ``embed_tokens``; a dict names modules, full or by
    dotted suffix).  Every entry must match an nn.Embedding."""
    spec = config.trainable_token_indices
    if not spec:
        return {}
    embeddings = {name: base for name, _, base in candidates(model) if isinstance(base, nn.Embedding)}
    if not isinstance(spec, Mapping):
        getter = getattr(model, "get_input_embeddings", None)
        inputs = getter() if callable(getter) else None
        names = [n for n, b in embeddings.items() if b is inputs] or [n for n in embeddings if name_matches("embed_tokens", n)]
        if len(names) != 1:
            raise TargetError("trainable_token_indices is a list but the model's input embedding is not found; give "
                              "a dict {'<embedding module name>': [ids]}")
        return {names[0]: tuple(spec)}
    out: dict[str, tuple[int, ...]] = {}
    for entry, ids in spec.items():
        names = [n for n in embeddings if name_matches(entry, n)]
        if not names:
            raise TargetError(f"trainable_token_indices names {entry!r}, which matches no nn.Embedding of the model")
        out.update({n: tuple(ids) for n in names})
    return out


def _wrapped_parameters(module: nn.Module) -> list[str]:
    """The parameters a chain of parameter wrappers adapts, innermost first."""
    out: list[str] = []
    while isinstance(module, LoraParameter):
        out.insert(0, module.parameter_name)
        module = module.base_layer
    return out


def _quantized(module: nn.Module) -> bool:
    """A quantized base lorakit cannot compute with (bitsandbytes' own layers); lorakit's NF4Linear it can."""
    if isinstance(module, NF4Linear):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not (weight.dtype.is_floating_point or weight.dtype.is_complex)


def _hint(model: nn.Module) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name, _, base in candidates(model) if supports(base)})
    return f"adaptable module names here include {leaves[:12]}"


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to the modules ``config`` targets, in place; returns ``model``.

    Each target is wrapped in a LoRA layer (A random, B zero, so the model's output is unchanged),
    every other parameter is frozen, and ``config.modules_to_save`` get a trainable copy.  The first
    adapter injected becomes active; later ones are added inactive (select them with
    :func:`lorakit.set_adapter`).  On any error the model is left exactly as it was.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise AdapterNameError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    state = state_of(model)
    if adapter_name in state.configs:
        raise AdapterNameError(f"the model already has an adapter named {adapter_name!r}; pick another name or delete it")
    targets = resolve_targets(model, config)
    to_save = resolve_modules_to_save(model, config)
    parameters = resolve_parameters(model, config)
    tokens = resolve_tokens(model, config)
    clash = sorted(set(tokens) & (set(targets) | set(to_save)))
    if clash:
        raise UnsupportedFeatureError(f"{clash[0]!r} has trainable tokens and is also adapted or saved whole: lorakit "
                                      "does not support trainable tokens on a LoRA-adapted embedding; pick one")
    modules = dict((name, (module, base)) for name, module, base in candidates(model))
    replaced: list[tuple[str, nn.Module]] = []
    added: list[nn.Module] = []
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    # Taken before any init runs: PiSSA / OLoRA change the base weight, the adapter belongs to the original.
    base_fingerprint = fingerprint({name: unmerged_base_weight(modules[name][0]) for name in targets})
    try:
        for name in targets:
            module, base = modules[name]
            if isinstance(module, LoraParameter):
                raise UnsupportedModuleError(f"module {name!r} holds target_parameters adapters; it cannot also be a "
                                             "target_modules target (as in PEFT) — exclude it")
            if not isinstance(module, LoraLayer):
                module = wrap(module, name)
                module.train(base.training)  # a wrapper starts in training mode; it must follow the model's mode
                _set_child(model, name, module)
                replaced.append((name, base))
            blocks = {"blocks": config.bd_blocks(name)} if config.use_bdlora else {}
            if blocks and blocks["blocks"] != (1, 1) and not isinstance(module, LoraLinear):
                raise UnsupportedModuleError(f"BD-LoRA (use_bdlora) adapts linear layers only; {name!r} is a "
                                             f"{type(module.base_layer).__name__}")
            module.add_adapter(
                adapter_name, config.rank_for(name), config.scale_for(name), config.dropout, config.init, config.use_dora,
                bias=config.lora_bias, **blocks,
            )
            added.append(module)
        for name, pnames in parameters:
            module, _ = modules[name]
            if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
                raise UnsupportedModuleError(f"module {name!r} is both a target_modules target and holds target_parameters; "
                                             "adapt it one way (as PEFT requires)")
            outer = module
            for pname in pnames[len(_wrapped_parameters(module)):]:
                outer = LoraParameter(outer, pname)
                outer.train(module.training)
            if outer is not module:
                _set_child(model, name, outer)
                replaced.append((name, module))
            wrapper = outer
            while isinstance(wrapper, LoraParameter):
                key = f"{name}.{wrapper.parameter_name}"
                if any(name_matches(e, key) for e in config.target_parameters or ()):
                    wrapper.add_adapter(adapter_name, config.rank_for(key), config.scale_for(key), config.dropout,
                                        config.init, config.use_dora, bias=config.lora_bias)
                    added.append(wrapper)
                wrapper = wrapper.base_layer
        for name in to_save:
            module, base = modules[name]
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(base)
                module.train(base.training)
                _set_child(model, name, module)
                replaced.append((name, base))
            module.add_adapter(adapter_name)
            added.append(module)
        for name, ids in tokens.items():
            module, base = modules[name]
            if isinstance(module, LoraLayer) or (isinstance(module, ModulesToSave) and not isinstance(module, TrainableTokens)):
                raise UnsupportedFeatureError(f"{name!r} is adapted by another adapter; lorakit does not support "
                                              "trainable tokens on a LoRA-adapted or saved-whole embedding")
            if not isinstance(module, TrainableTokens):
                module = TrainableTokens(base)
                module.train(base.training)
                _set_child(model, name, module)
                replaced.append((name, base))
            module.add_adapter(adapter_name, ids)
            added.append(module)
    except BaseException:
        for module in added:
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                module.remove_adapter(adapter_name)
            elif isinstance(module, ModulesToSave) and adapter_name in module.copies:
                del module.copies[adapter_name]
        for name, base in reversed(replaced):
            _set_child(model, name, base)
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        raise
    state.configs[adapter_name] = config
    state.fingerprints[adapter_name] = base_fingerprint
    model.__dict__[STATE_ATTR] = state
    active = next((layer.active_adapters for _, layer in lora_modules(model) if layer.active_adapters), None)
    refresh(model, active if active else [adapter_name])
    return model


def unmerged_base_weight(layer: nn.Module) -> torch.Tensor | WeightSample:
    """What the fingerprint reads of a target (a LoRA layer or the plain module it wraps): the base weight
    as it was before any adapter — merged updates taken out, and what PiSSA / OLoRA inits moved into their
    adapters put back.  A 4-bit base gives the sample of the full-precision weight it was quantised from,
    so an adapter trained over it matches that full-precision base."""
    base = layer.base_layer if isinstance(layer, LoraLayer) else layer
    if isinstance(base, NF4Linear):
        shape = (base.out_features, base.in_features)
        return WeightSample(shape, base.source_checksum or weight_checksum(base.dequantize()))
    if not isinstance(layer, LoraLayer):
        return layer.in_proj_weight if isinstance(layer, nn.MultiheadAttention) else layer.weight
    return layer.original_weight()


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    """Every LoRA layer and modules-to-save wrapper, with its qualified name."""
    for name, module, _ in candidates(model):
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def refresh(model: nn.Module, active: list[str]) -> None:
    """Make ``active`` the active adapters everywhere; only their parameters stay trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(model):
        if isinstance(module, LoraLayer):
            module.active_adapters = [a for a in active if a in module.lora_A]
            for name in module.active_adapters:
                for p in module.trainable(name):
                    p.requires_grad_(True)
        else:
            module.active_adapters = [a for a in active if a in module.copies]
            for name in module.active_adapters:
                module.copies[name].requires_grad_(True)
