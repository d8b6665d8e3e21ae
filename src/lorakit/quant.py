"""Quantising a model's frozen base to 4 bits (NF4, bitsandbytes-exact): the QLoRA base.

The layer that holds a 4-bit weight is :class:`lorakit.nf4_linear.NF4Linear` (the format and its
equations: ``lorakit.ops.nf4_format``); this module converts whole models and checkpoints to it.

* :func:`quantize_base` converts a model's frozen linears in place, before or after ``inject``.
* :func:`quantize_checkpoint` builds a model from a safetensors checkpoint tensor by tensor: the
  full-precision weights are never all in memory (each linear is read, quantised on the target
  device and dropped).
* An NF4Linear's state dict uses bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
  ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a
  transformers ``load_in_4bit`` checkpoint loads into it without bitsandbytes, and back; a full-precision
  state dict loads too (its weights are quantised as they arrive).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import QuantizationError
from .layers import LoraLayer
from .modules_to_save import ModulesToSave
from .nf4_linear import BNB_QUANT_STATE_KEY, BNB_SUFFIXES, NF4Linear, nf4_from_bnb

QUANT_TYPES = ("nf4",)


def _default_skip(model: nn.Module) -> set[int]:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return {id(head)} if head is not None else set()


def _linears(model: nn.Module, include_head: bool) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every plain nn.Linear to quantise: LoRA layers' bases included, the
    trained copies of modules_to_save (and what they stand for) left alone."""
    skip = set() if include_head else _default_skip(model)
    out: list[tuple[str, nn.Linear]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if isinstance(child, ModulesToSave) or id(child) in skip:
                continue
            if isinstance(child, LoraLayer) and id(child.base_layer) in skip:
                continue
            if type(child) is nn.Linear:
                out.append((name, child))
            else:
                walk(child, name + ".")

    walk(model, "")
    return out


def quantize_base(model: nn.Module, quant_type: str = "nf4", *, include_head: bool = False,
                  modules: Iterable[str] | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Quantise the model's frozen linear weights to NF4 in place and return the model.

    Every ``nn.Linear`` is replaced by an :class:`NF4Linear` (also inside LoRA layers, whose adapters stay
    as they are), except the output head (``model.get_output_embeddings()``) unless ``include_head``, and
    the trained copies of ``modules_to_save``.  Biases, norms and embeddings stay in their dtype.
    ``modules``: quantise only these qualified names.  ``device``: where to quantise (e.g. "cuda" to move
    a CPU model onto the GPU layer by layer, never whole in full precision there); only the quantised
    layers move — ``model.to(device)`` the rest (embeddings, norms, adapters) afterwards.  The new layers
    are frozen: a 4-bit weight gets no gradient.  Only ``nn.Linear`` is quantised (not transformers'
    Conv1D of GPT-2).
    """
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type {quant_type!r} is not supported; use one of {QUANT_TYPES}")
    chosen = _linears(model, include_head)
    if modules is not None:
        wanted = set(modules)
        names = {n for n, _ in chosen} | {n.removesuffix(".base_layer") for n, _ in chosen}
        unknown = wanted - names
        if unknown:
            raise QuantizationError(f"quantize_base: modules {sorted(unknown)[:3]} are not plain nn.Linear layers "
                                    "of this model (or are the output head: pass include_head=True)")
        chosen = [(n, m) for n, m in chosen if n in wanted or n.removesuffix(".base_layer") in wanted]
    for name, _ in chosen:  # DoRA's forward reads the full-precision weight (its row norms): refuse, change nothing
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child == "base_layer" and getattr(parent, "lora_magnitude", None):
            raise QuantizationError(f"quantize_base: {parent_name} has a DoRA adapter, which lorakit computes on a "
                                    "full-precision base only; quantize a model with plain LoRA adapters")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(module, device))
    return model


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Inside, modules create their parameters on the meta device (no memory) and their buffers as usual,
    so a model built here (``with empty_weights(): Model(config)``) is ready for :func:`quantize_checkpoint`
    with its computed buffers (rotary tables, ...) already real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def quantize_checkpoint(model: nn.Module, files: Iterable[str | os.PathLike], *, device: torch.device | str = "cpu",
                        include_head: bool = False, dtype: torch.dtype | Literal["model"] | None = None,
                        key_map: Callable[[str], str | None] | None = None, keep: Iterable[str] = ()) -> nn.Module:
    """Fill a model whose parameters are on the meta device (built inside :func:`empty_weights`) from
    safetensors ``files``, quantising its linears to NF4 as they are read.

    Each tensor is read alone (safetensors memory-maps the shard), moved to ``device``, cast to ``dtype``
    (default: as stored; "model": the dtype of the meta parameter it fills) and, for a linear's weight,
    quantised there and dropped — so the full-precision model is never whole in memory, on the host or
    the device.  Every parameter still on the meta device must be found in the files (``key_map`` maps a
    checkpoint key to the model's name, or to None to skip it); parameters the caller materialised
    (e.g. a freshly initialised head) are filled only where the files have them, and persistent buffers
    the files have are copied in.  ``keep``: qualified module names whose linears stay full precision
    (e.g. the heads a task trains as modules_to_save).  Returns the model.
    """
    from safetensors import safe_open

    kept = tuple(keep)
    linears = {n: m for n, m in _linears(model, include_head)
               if not any(n == k or n.startswith(k + ".") for k in kept)}
    targets = {name + ".weight": name for name in linears}
    params = dict(model.named_parameters())
    meta_dtypes = {n: p.dtype for n, p in params.items()}
    persistent = {n for n, _ in model.named_buffers()} & set(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            quant_parts = {k for k in keys if any(k.endswith(".weight." + s) for s in BNB_SUFFIXES)}
            for key in keys:
                if key in quant_parts:
                    continue
                name = key_map(key) if key_map else key
                if name is not None and name in persistent:
                    owner_name, _, bname = name.rpartition(".")
                    owner = model.get_submodule(owner_name) if owner_name else model
                    owner._buffers[bname] = _read(f, key, device, getattr(owner, bname).dtype)
                    continue
                if name is None or (name not in targets and name not in params):
                    continue
                if name in targets and key + "." + BNB_QUANT_STATE_KEY in quant_parts:  # saved pre-quantised (load_in_4bit)
                    lin_name = targets[name]
                    parts = {s: _read(f, key + "." + s, device) for s in BNB_SUFFIXES if key + "." + s in quant_parts}
                    t4, dtype4 = nf4_from_bnb(parts, _read(f, key, device), f"{file}: {key}")
                    old = linears[lin_name]
                    if t4.shape != (old.out_features, old.in_features):
                        raise QuantizationError(f"{file}: {key} is NF4 of shape {t4.shape}, the model's {lin_name} "
                                                f"needs ({old.out_features}, {old.in_features})")
                    new = NF4Linear(old.in_features, old.out_features, old.bias is not None, dtype=dtype4,
                                    device=device)
                    new._set(t4, dtype4)
                    parent_name, _, child = lin_name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    current = getattr(parent, child)
                    if current.bias is not None and not current.bias.is_meta:
                        new.bias = current.bias
                    setattr(parent, child, new)
                    seen.add(name)
                    continue
                # a linear's weight is quantised and dropped at once: it may stay a view of the shard
                t = _read(f, key, device, meta_dtypes[name] if dtype == "model" else dtype, own=name not in targets)
                if name in targets:
                    lin_name = targets[name]
                    old = linears[lin_name]
                    parent_name, _, child = lin_name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    current = getattr(parent, child)
                    bias = current.bias if current.bias is not None and not current.bias.is_meta else None
                    if old.bias is not None and bias is None:
                        bias = torch.zeros(old.out_features, dtype=t.dtype, device=device)  # replaced when read
                    if tuple(t.shape) != (old.out_features, old.in_features):
                        raise QuantizationError(f"{file}: {key} has shape {tuple(t.shape)}, the model's {lin_name} "
                                                f"needs ({old.out_features}, {old.in_features})")
                    setattr(parent, child, NF4Linear.from_weight(t, bias))
                    del t
                else:
                    p = params[name]
                    owner_name, _, pname = name.rpartition(".")
                    owner = model.get_submodule(owner_name) if owner_name else model
                    if isinstance(owner, NF4Linear) and pname == "bias":
                        owner.bias = nn.Parameter(t.to(owner.bias.dtype if owner.bias is not None else t.dtype),
                                                  requires_grad=False)
                    else:
                        if tuple(t.shape) != tuple(p.shape):
                            raise QuantizationError(f"{file}: {key} has shape {tuple(t.shape)}, the model's {name} "
                                                    f"needs {tuple(p.shape)}")
                        setattr(owner, pname, nn.Parameter(t, requires_grad=p.requires_grad))
                seen.add(name)
    unfilled = {n for n in set(targets) | set(params) if params[n].is_meta}
    missing = sorted(unfilled - seen - tied_parameters(model))
    if missing:
        raise QuantizationError(f"quantize_checkpoint: {missing[0]} ({len(missing)} in all) is in none of the "
                                "checkpoint files")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _read(f: Any, key: str, device: torch.device | str, dtype: torch.dtype | None = None, *,
          own: bool = True) -> torch.Tensor:
    """Tensor ``key`` of an open safetensors file on ``device``, floating point cast to ``dtype``.  ``own``: in
    memory of its own — the reader may hand out a view of the memory-mapped shard, and a kept view keeps
    the whole shard mapped, its pages read so far resident, for as long as the model lives."""
    raw = f.get_tensor(key)
    t = raw.to(device, dtype) if dtype is not None and raw.is_floating_point() else raw.to(device)
    return t.clone() if own and t.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr() else t


def tied_parameters(model: nn.Module) -> set[str]:
    """Parameter names the model ties to another (transformers' tie_word_embeddings): they need no key."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        for n, m in model.named_modules():
            if m is head:
                names.add(n + ".weight")
    return names


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The shards of a checkpoint directory (model.safetensors or model-0000x-of-0000y.safetensors)."""
    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise QuantizationError(f"{d}: no .safetensors files to quantise")
    return files


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` (or a LoRA layer's base) holds a lorakit NF4 weight."""
    return isinstance(getattr(module, "base_layer", module), NF4Linear)


def quantization_of(model: nn.Module) -> str | None:
    """"nf4" if any linear of the model is NF4, else None."""
    return "nf4" if any(isinstance(m, NF4Linear) for m in model.modules()) else None


__all__ = ["NF4Linear", "empty_weights", "QuantizationError", "is_quantized", "nf4_from_bnb", "quantization_of", "quantize_base",
           "quantize_checkpoint", "safetensors_files", "tied_parameters"]
