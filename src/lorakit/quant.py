"""Frozen base weights stored in 4 bits (NF4, bitsandbytes-exact): the QLoRA base.

:class:`NF4Linear` stands in for an ``nn.Linear`` whose weight is NF4 with double quantisation
(the format and its equations: ``lorakit.ops.nf4``).  A LoRA layer over it reads the weight only
through ``layer.base_weight()`` (which dequantises) and computes with
:func:`lorakit.ops.nf4.nf4_lora_linear`, which never keeps the dequantised weight.

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

import torch
from torch import Tensor, nn

from .errors import LorakitError
from .fingerprint import weight_checksum
from .ops.nf4 import dequantize_nf4, nf4_lora_linear
from .ops.nf4_format import BLOCK, NESTED_BLOCK, NF4Tensors, dynamic_map, nf4_map, quantize_nf4

QUANT_TYPES = ("nf4",)
_QS_KEY = "quant_state.bitsandbytes__nf4"
_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QS_KEY)


class QuantizationError(LorakitError, ValueError):
    """A model, checkpoint or option cannot be quantised or loaded as asked."""


class NF4Linear(nn.Linear):
    """``nn.Linear`` with a frozen NF4 weight: h = x Ŵᵀ + b, Ŵ = dequantised NF4 (d, k).

    Buffers: ``weight`` — the packed codes, uint8 (⌈d·k/2⌉, 1) as bitsandbytes stores them; ``absmax``
    (uint8), ``nested_absmax`` and ``offset`` (float32 stored bit-cast as int32, so ``model.to(dtype)``
    cannot round them).  ``dtype`` is the weight's original dtype, what :meth:`dequantize` and
    :meth:`to_linear` give back; ``source_checksum`` is the fingerprint sample of the full-precision
    weight it was quantised from (None when loaded already quantised), so an adapter trained over it
    carries the full-precision base's fingerprint.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.source_checksum: str | None = None
        n = in_features * out_features
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(-(-n // BLOCK), dtype=torch.uint8, device=device), persistent=False)
        self.register_buffer("nested_absmax", torch.zeros(-(-n // (BLOCK * NESTED_BLOCK)), dtype=torch.int32,
                                                          device=device), persistent=False)
        self.register_buffer("offset", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> NF4Linear:
        """Quantise ``linear``'s weight (on ``device``, default: where it is); the bias is kept as it is."""
        w = linear.weight.detach()
        if device is not None:
            w = w.to(device)
        out = cls.from_weight(w, linear.bias)
        return out

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None) -> NF4Linear:
        """An NF4Linear for the (d, k) float ``weight`` and ``bias``."""
        d, k = weight.shape
        out = cls(k, d, bias is not None, dtype=weight.dtype, device="meta")
        out._set(quantize_nf4(weight), weight.dtype)
        out.source_checksum = weight_checksum(weight)
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
        return out

    def _set(self, t: NF4Tensors, dtype: torch.dtype) -> None:
        self.weight = t.packed.reshape(-1, 1)
        self.absmax = t.absmax
        self.nested_absmax = t.nested_absmax.view(torch.int32)
        self.offset = t.offset.reshape(1).view(torch.int32)
        self.dtype = dtype

    def nf4(self) -> NF4Tensors:
        """The weight as :class:`~lorakit.ops.nf4.NF4Tensors` (views, no copy)."""
        return NF4Tensors(self.weight.view(-1), self.absmax, self.nested_absmax.view(torch.float32),
                          self.offset.view(torch.float32), (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Ŵ (d, k) in ``dtype`` (default: the original dtype) — a new tensor."""
        return dequantize_nf4(self.nf4(), dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding Ŵ in the original dtype and this bias."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def storage_bits(self) -> float:
        """Bits per weight of every buffer that stores the weight."""
        size = sum(b.numel() * b.element_size() for b in (self.weight, self.absmax, self.nested_absmax, self.offset))
        return 8.0 * size / (self.in_features * self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return nf4_lora_linear(x, self.nf4(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"nf4, dtype={str(self.dtype).removeprefix('torch.')}"

    # -- bitsandbytes' state-dict layout ------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        t = self.nf4()
        dev = t.packed.device
        meta = {"quant_type": "nf4", "blocksize": BLOCK, "dtype": str(self.dtype).removeprefix("torch."),
                "shape": [self.out_features, self.in_features], "nested_blocksize": NESTED_BLOCK,
                "nested_dtype": "float32", "nested_offset": float(t.offset.item())}
        w = prefix + "weight."
        destination[w + "absmax"] = t.absmax
        destination[w + "quant_map"] = nf4_map(dev).clone()
        destination[w + "nested_absmax"] = t.nested_absmax
        destination[w + "nested_quant_map"] = dynamic_map(dev).clone()
        destination[w + _QS_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8, device=dev)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        w = prefix + "weight."
        full = state_dict.get(prefix + "weight")
        if w + _QS_KEY not in state_dict and full is not None and full.is_floating_point():
            # a full-precision state dict: quantise its weight here (the bias loads as usual)
            if tuple(full.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight has shape {tuple(full.shape)}, this layer is "
                                  f"({self.out_features}, {self.in_features})")
                return
            self._set(quantize_nf4(full.to(self.weight.device)), full.dtype)
            self.source_checksum = weight_checksum(full)
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
            state_dict[prefix + "weight"] = self.weight
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        if w + _QS_KEY not in state_dict:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        try:
            t, dtype = nf4_from_bnb({s: state_dict[w + s] for s in _SUFFIXES if w + s in state_dict},
                                   state_dict.get(prefix + "weight"), prefix.rstrip(".") or "<root>")
        except QuantizationError as err:
            error_msgs.append(str(err))
            return
        if t.shape != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: the NF4 state is for shape {t.shape}, this layer is "
                              f"({self.out_features}, {self.in_features})")
            return
        self._set(NF4Tensors(*(x.to(self.weight.device) for x in (t.packed, t.absmax, t.nested_absmax, t.offset)),
                             t.shape), dtype)
        self.source_checksum = None
        if self.bias is not None:
            key = prefix + "bias"
            if key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[key])
            elif strict:
                missing_keys.append(key)
        local = {k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):].removeprefix("weight.")}
        for key in local - {prefix + "weight", prefix + "bias"} - {w + s for s in _SUFFIXES}:
            unexpected_keys.append(key)


def nf4_from_bnb(parts: dict[str, Tensor], packed: Tensor | None, where: str) -> tuple[NF4Tensors, torch.dtype]:
    """(NF4Tensors, original dtype) from one layer's bitsandbytes 4-bit keys (``absmax``, ``quant_map``,
    ``nested_absmax``, ``nested_quant_map``, ``quant_state.bitsandbytes__nf4``, without the ``weight.``
    prefix) and its packed ``weight``.  Raises QuantizationError naming ``where`` if anything does not fit."""
    if packed is None or _QS_KEY not in parts:
        raise QuantizationError(f"{where}: no bitsandbytes NF4 state (weight and weight.{_QS_KEY} are needed)")
    try:
        meta = json.loads(bytes(parts[_QS_KEY].to("cpu", torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise QuantizationError(f"{where}: weight.{_QS_KEY} is not bitsandbytes' packed JSON ({err})") from None
    if meta.get("quant_type") != "nf4" or meta.get("blocksize") != BLOCK:
        raise QuantizationError(f"{where}: quantised as {meta.get('quant_type')} with blocksize {meta.get('blocksize')};"
                                f" lorakit reads nf4 with blocksize {BLOCK} (bitsandbytes' default)")
    if "nested_absmax" not in parts or meta.get("nested_blocksize") != NESTED_BLOCK:
        raise QuantizationError(f"{where}: saved without double quantisation (bnb_4bit_use_double_quant=False); "
                                "lorakit reads NF4 with double quantisation only — re-save with it on")
    dev = packed.device
    for key, ref in (("quant_map", nf4_map), ("nested_quant_map", dynamic_map)):
        if key in parts and not torch.equal(parts[key].to(dev, torch.float32), ref(dev)):
            raise QuantizationError(f"{where}: weight.{key} is not bitsandbytes' standard table")
    shape = tuple(int(s) for s in meta["shape"])
    if len(shape) != 2:
        raise QuantizationError(f"{where}: NF4 weight of shape {shape}; only 2-d (linear) weights are supported")
    n = shape[0] * shape[1]
    absmax = parts["absmax"].to(dev)
    nested = parts["nested_absmax"].to(dev, torch.float32)
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // BLOCK) or absmax.dtype != torch.uint8 \
            or nested.numel() != -(-absmax.numel() // NESTED_BLOCK):
        raise QuantizationError(f"{where}: NF4 buffers do not fit shape {shape} (packed {packed.numel()}, "
                                f"absmax {absmax.numel()}, nested_absmax {nested.numel()})")
    offset = torch.tensor([float(meta["nested_offset"])], dtype=torch.float32, device=dev)
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuantizationError(f"{where}: weight.{_QS_KEY} names dtype {meta.get('dtype')!r}")
    return NF4Tensors(packed.reshape(-1).view(torch.uint8), absmax, nested, offset, (shape[0], shape[1])), dtype


# -- whole models ----------------------------------------------------------------------------------------

def _default_skip(model: nn.Module) -> set[int]:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return {id(head)} if head is not None else set()


def _linears(model: nn.Module, include_head: bool) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every plain nn.Linear to quantise: LoRA layers' bases included, the
    trained copies of modules_to_save (and what they stand for) left alone."""
    from .layers import LoraLayer, ModulesToSave

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
                        include_head: bool = False, dtype: torch.dtype | None = None,
                        key_map: Callable[[str], str] | None = None) -> nn.Module:
    """Fill a model whose parameters are on the meta device (built inside :func:`empty_weights`) from
    safetensors ``files``, quantising its linears to NF4 as they are read.

    Each tensor is read alone (safetensors memory-maps the shard), moved to ``device``, cast to ``dtype``
    (default: as stored) and, for a linear's weight, quantised there and dropped — so the full-precision
    model is never whole in memory, on the host or the device.  Every parameter and buffer of the model
    must be found in the files (``key_map`` maps a checkpoint key to the model's name); buffers the
    checkpoint lacks (e.g. rotary tables) are left to the caller.  Returns the model.
    """
    from safetensors import safe_open

    linears = dict(_linears(model, include_head))
    targets = {name + ".weight": name for name in linears}
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            quant_parts = {k for k in keys if any(k.endswith(".weight." + s) for s in _SUFFIXES)}
            for key in keys:
                if key in quant_parts:
                    continue
                name = key_map(key) if key_map else key
                if name not in targets and name not in params:
                    continue
                if name in targets and key + "." + _QS_KEY in quant_parts:  # saved pre-quantised (load_in_4bit)
                    lin_name = targets[name]
                    parts = {s: f.get_tensor(key + "." + s).to(device) for s in _SUFFIXES if key + "." + s in quant_parts}
                    t4, dtype4 = nf4_from_bnb(parts, f.get_tensor(key).to(device), f"{file}: {key}")
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
                t = f.get_tensor(key).to(device)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
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
    missing = sorted((set(targets) | set(params)) - seen - _tied(model, seen))
    if missing:
        raise QuantizationError(f"quantize_checkpoint: {missing[0]} ({len(missing)} in all) is in none of the "
                                "checkpoint files")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _tied(model: nn.Module, seen: set[str]) -> set[str]:
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
           "quantize_checkpoint", "safetensors_files"]
