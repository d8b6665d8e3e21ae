"""The frozen 4-bit base layer: :class:`NF4Linear`, an ``nn.Linear`` whose weight is NF4 (bitsandbytes-exact).

A LoRA layer over it reads the weight only through ``layer.base_weight()`` (which dequantises) and
computes with :func:`lorakit.ops.nf4.nf4_lora_linear`, which never keeps the dequantised weight.  Its
state dict uses bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a
transformers ``load_in_4bit`` checkpoint loads into it without bitsandbytes, and back; a full-precision
state dict loads too (its weights are quantised as they arrive).  Converting whole models:
``lorakit.quant``.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from .errors import QuantizationError
from .fingerprint import weight_checksum
from .ops.nf4 import dequantize_nf4, nf4_lora_linear
from .ops.nf4_format import BLOCK, NESTED_BLOCK, NF4Tensors, dynamic_map, nf4_map, quantize_nf4

BNB_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", BNB_QUANT_STATE_KEY)


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
        destination[w + BNB_QUANT_STATE_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8, device=dev)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        w = prefix + "weight."
        full = state_dict.get(prefix + "weight")
        if w + BNB_QUANT_STATE_KEY not in state_dict and full is not None and full.is_floating_point():
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
        if w + BNB_QUANT_STATE_KEY not in state_dict:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        try:
            t, dtype = nf4_from_bnb({s: state_dict[w + s] for s in BNB_SUFFIXES if w + s in state_dict},
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
        for key in local - {prefix + "weight", prefix + "bias"} - {w + s for s in BNB_SUFFIXES}:
            unexpected_keys.append(key)


def nf4_from_bnb(parts: dict[str, Tensor], packed: Tensor | None, where: str) -> tuple[NF4Tensors, torch.dtype]:
    """(NF4Tensors, original dtype) from one layer's bitsandbytes 4-bit keys (``absmax``, ``quant_map``,
    ``nested_absmax``, ``nested_quant_map``, ``quant_state.bitsandbytes__nf4``, without the ``weight.``
    prefix) and its packed ``weight``.  Raises QuantizationError naming ``where`` if anything does not fit."""
    if packed is None or BNB_QUANT_STATE_KEY not in parts:
        raise QuantizationError(f"{where}: no bitsandbytes NF4 state (weight and weight.{BNB_QUANT_STATE_KEY} are needed)")
    try:
        meta = json.loads(bytes(parts[BNB_QUANT_STATE_KEY].to("cpu", torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise QuantizationError(f"{where}: weight.{BNB_QUANT_STATE_KEY} is not bitsandbytes' packed JSON ({err})") from None
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
        raise QuantizationError(f"{where}: weight.{BNB_QUANT_STATE_KEY} names dtype {meta.get('dtype')!r}")
    return NF4Tensors(packed.reshape(-1).view(torch.uint8), absmax, nested, offset, (shape[0], shape[1])), dtype


# -- whole models ----------------------------------------------------------------------------------------
