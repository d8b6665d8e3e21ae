"""LoRA modules: each wraps one frozen base module and holds any number of named adapters.

    h = base(x) + Σ_active s_i · (B_i (A_i drop(x)) + b_i)       A_i: (r_i, k)   B_i: (d, r_i)

(b_i, PEFT's ``lora_bias``, only where the adapter has one.)

A DoRA adapter (``use_dora``) also has a magnitude m_i (d,) and replaces W by m_i ⊙ (W + s_i B_i A_i) / ‖·‖
(row norms); see :mod:`lorakit.ops.dora`.

The arithmetic lives in ``ops`` (the linear forward is :func:`lorakit.ops.lora_linear`) and in
``merge.delta_weight``; these classes only hold parameters and choose what to call.  A layer keeps
its adapters as data (``lora_A[name]``, ``lora_B[name]``, ``scaling[name]``), so other code — mixed
batches, adapter arithmetic, saving — works on every layer type the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AdapterNameError, MergeError, UnsupportedModuleError
from .delta import Layout, add_delta, delta_weight
from .config import MUTATING_INITS, init_kind
from .ops import dora_linear, dora_weight_norm, lora_linear
from .ops.nf4 import NF4Tensors, nf4_lora_linear
from .nf4_linear import NF4Linear


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored as (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def supports(module: nn.Module) -> bool:
    """Whether lorakit can wrap this module."""
    return isinstance(module, (nn.Linear, nn.Embedding, *_CONVS)) or is_hf_conv1d(module) or (
        isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
    )


class LoraLayer(nn.Module):
    """A frozen ``base_layer`` plus named low-rank adapters.

    Attributes:
        base_layer: the original module; its parameters are frozen by ``inject``.
        lora_A / lora_B: ParameterDicts, name → (r, k) / (d, r).
        scaling: name → s.   r: name → rank.   dropout_p: name → dropout probability.
        lora_magnitude: ParameterDict, name → m (d,) for DoRA adapters (absent for plain LoRA).
        lora_bias: ParameterDict, name → b (d,) for adapters with a bias on B (PEFT's ``lora_bias``).
        init_factors: name → (A₀, B₀) for adapters whose init moved s·B₀A₀ out of W (PiSSA, OLoRA), so
            that saving can express the adapter against the original W.
        active_adapters: names whose updates are added in forward (their updates add).
        merged_adapters: names currently folded into the base weight.
        disabled: when True, forward is the base module alone.
    """

    layout: Layout = "linear"
    supports_bias = True  # whether adapters here may have a lora_bias (PEFT refuses it for embeddings)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()
        self.init_factors: dict[str, tuple[Tensor, Tensor]] = {}
        self._merge_norms: dict[str, Tensor] = {}  # DoRA: the row norms a merge divided by, for unmerge
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.dropout_p: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- shape of the seed equation ----------------------------------------------------------
    @property
    def in_features(self) -> int:
        """k: the size of the input the low-rank branch reads."""
        return self.base_weight().shape[1]

    @property
    def out_features(self) -> int:
        """d: the size of the output the update is added to."""
        return self.base_weight().shape[0]

    def base_weight(self) -> Tensor:
        """The frozen weight as stored by the base module; a 4-bit (NF4) base dequantises here, into a new
        tensor of its original dtype (so writing into it does not change the base)."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.dequantize()
        return self.base_layer.weight

    def quantized(self) -> bool:
        """Whether the base weight is stored in 4 bits (NF4)."""
        return isinstance(self.base_layer, NF4Linear)

    def _base_shape(self) -> torch.Size:
        if isinstance(self.base_layer, NF4Linear):
            return torch.Size((self.base_layer.out_features, self.base_layer.in_features))
        return self.base_layer.weight.shape

    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.weight.device, self.base_layer.dtype
        w = self.base_layer.weight
        return w.device, w.dtype

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str = "kaiming",
                    use_dora: bool = False, bias: bool = False) -> None:
        """Create adapter ``name`` (PEFT's ``init_lora_weights`` semantics for each ``init``):

        * "kaiming": A Kaiming-uniform (nn.Linear's default), B = 0, so ΔW = 0 — PEFT's default;
        * "gaussian": A ~ N(0, 1/r²) (std 1/r), B = 0;
        * "nonzero": A and B both random (PEFT's ``init_lora_weights=False``), for tests and debugging;
        * "pissa" / "pissa_niter_K", "olora": A, B from the SVD / QR of W, and W ← W − s·B A (see
          :meth:`LoraLinear.mutating_init`); only linear layers.
        Embedding adapters follow PEFT: A = 0, B ~ N(0, 1) for every init but "nonzero" (both N(0, 1)).
        ``use_dora``: add the DoRA magnitude m = ‖W + s·B A‖ (row norms), so the output is unchanged at init.
        ``bias``: add a bias b (d,) on B (PEFT's ``lora_bias``), zero unless ``init`` is "nonzero".
        """
        if name in self.lora_A:
            raise AdapterNameError(f"adapter {name!r} already exists in this layer; delete it first or pick another name")
        if self.quantized() and (use_dora or init_kind(init) in MUTATING_INITS):
            raise UnsupportedModuleError(
                f"{'DoRA' if use_dora else 'init ' + repr(init)} changes or reads the base weight, which is 4-bit "
                "(NF4) here; use a plain LoRA init (kaiming, gaussian) on a quantized base, or quantize after")
        if bias and (use_dora or not self.supports_bias):
            what = "DoRA" if use_dora else f"a {type(self.base_layer).__name__}"
            raise UnsupportedModuleError(f"lora_bias is not supported with {what} (nor in PEFT); drop lora_bias or this target")
        device, wdtype = self._base_device_dtype()
        dtype = wdtype if wdtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(self.lora_a_shape(r), device=device, dtype=dtype)
        B = torch.zeros(self.lora_b_shape(r), device=device, dtype=dtype)
        self._init_factors(A, B, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        if bias:
            b = torch.zeros(self.out_features, device=device, dtype=dtype)
            if init == "nonzero":  # nn.Linear's default bias init, as PEFT's lora_B has with init_lora_weights=False
                bound = 1 / math.sqrt(B.shape[1])
                nn.init.uniform_(b, -bound, bound)
            self.lora_bias[name] = nn.Parameter(b)
        self.scaling[name], self.r[name], self.dropout_p[name] = float(scale), r, float(dropout)
        if init_kind(init) in MUTATING_INITS:
            try:
                self.mutating_init(name, init)
            except BaseException:
                self.remove_adapter(name)
                raise
        if use_dora:
            self.lora_magnitude[name] = nn.Parameter(self.dora_norm(name).to(dtype))

    def _init_factors(self, A: Tensor, B: Tensor, init: str) -> None:
        """Fill A (r, k) and B (d, r) in place for a non-mutating init (B stays 0 unless "nonzero")."""
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        else:  # nn.Linear's default init, as PEFT uses for lora_A (and for lora_B with init_lora_weights=False)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init == "nonzero":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))

    def lora_a_shape(self, r: int) -> tuple[int, ...]:
        """The shape of A for rank r: (r, k)."""
        return (r, self.in_features)

    def lora_b_shape(self, r: int) -> tuple[int, ...]:
        """The shape of B for rank r: (d, r)."""
        return (self.out_features, r)

    def trainable(self, name: str) -> list[nn.Parameter]:
        """Every parameter of adapter ``name`` in this layer (what training updates)."""
        return [d[name] for d in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_bias) if name in d]

    def bias_term(self, name: str) -> Tensor | None:
        """s·b of adapter ``name`` (None when it has no lora_bias)."""
        return self.lora_bias[name] * self.scaling[name] if name in self.lora_bias else None

    def mutating_init(self, name: str, init: str) -> None:
        """PiSSA / OLoRA: set A, B from W and move s·B A out of W; only layers with a (d, k) weight have it."""
        raise UnsupportedModuleError(
            f"init {init!r} needs a linear layer's weight; {type(self.base_layer).__name__} layers take 'kaiming', "
            "'gaussian' or 'nonzero' — exclude this module or pick another init")

    def as_matrix(self, weight: Tensor) -> Tensor:
        """A weight stored like the base's, as the (d, k) matrix W of the seed equation (a view)."""
        if self.layout in ("transposed", "embedding"):
            return weight.t()
        return weight.reshape(weight.shape[0], -1) if self.layout == "conv" else weight

    def dora_norm(self, name: str) -> Tensor:
        """n = ‖W + s·B A‖ per row of W (d,) for adapter ``name``: DoRA's denominator (no grad)."""
        return dora_weight_norm(self.as_matrix(self.base_weight()), self.lora_A[name], self.lora_B[name],
                                self.scaling[name])

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (unmerging it first if it was merged)."""
        if name in self.merged_adapters:
            self.unmerge([name])
        if name in self.init_factors:  # give W back the part the init moved into the adapter
            A0, B0 = self.init_factors.pop(name)
            add_delta(self.base_weight(), self._delta(A0, B0, self.scaling[name]), +1, what=f"adapter {name!r}")
        del self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        if name in self.lora_bias:
            del self.lora_bias[name]
        for table in (self.scaling, self.r, self.dropout_p):
            del table[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_weight(self, name: str) -> Tensor:
        """s·BA for adapter ``name``, shaped like the base weight (float32)."""
        return self._delta(self.lora_A[name], self.lora_B[name], self.scaling[name])

    def _delta(self, A: Tensor, B: Tensor, scale: float) -> Tensor:
        return delta_weight(A, B, scale, self.layout, self._base_shape())

    def _dora_factor_shape(self) -> tuple[int, ...]:
        """How f = m / n (d,) broadcasts over the stored base weight."""
        w = self.base_weight()
        if self.layout in ("transposed", "embedding"):
            return (1, -1)
        return (-1,) + (1,) * (w.dim() - 1)

    def merge(self, names: list[str] | None = None) -> None:
        """W ← W + s·BA for each named (default: active) adapter not merged yet.

        A DoRA adapter merges as W ← f ⊙ (W + s·BA), f = m / n with n the row norms of the weight
        without the adapters merged so far (as PEFT does); n is kept so that unmerge can divide by it.
        A 4-bit base refuses (MergeError): the update would be rounded to 4 bits.
        """
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters:
                continue
            if self.quantized():
                raise MergeError(
                    "the base weight is 4-bit (NF4): merging into it would round the update to 4 bits; use "
                    "lorakit.merge_and_unload (it dequantises to the original dtype first) or merge onto the "
                    "full-precision base (lorakit merge)")
            delta = self.delta_weight(name)
            if name in self.lora_magnitude:
                weight = self.base_weight()
                acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
                A, B = self.lora_A[name].detach(), self.lora_B[name].detach()
                norm = dora_weight_norm(self.as_matrix(self.unmerged_weight()), A, B, self.scaling[name])
                factor = (self.lora_magnitude[name].detach().to(acc) / norm).reshape(self._dora_factor_shape())
                new = factor * (weight.detach().to(acc) + delta.to(acc))
                if not torch.isfinite(new).all():
                    raise MergeError(f"merging DoRA adapter {name!r} would produce non-finite values; "
                                     "the weight was left unchanged")
                with torch.no_grad():
                    weight.copy_(new)
                self._merge_norms[name] = norm
            else:
                self._add(name, delta, +1)
            self.merged_adapters.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """W ← W − s·BA (DoRA: W ← W / f − s·BA) for each named (default: every merged) adapter, newest first."""
        for name in reversed(list(self.merged_adapters)):
            if names is None or name in names:
                weight = self.base_weight()
                if name in self.lora_magnitude:
                    with torch.no_grad():
                        weight.copy_(self._undo_dora_merge(name, weight))
                    del self._merge_norms[name]
                else:
                    self._add(name, self.delta_weight(name), -1)
                self.merged_adapters.remove(name)

    def _add(self, name: str, delta: Tensor, sign: int) -> None:
        """W ← W ± ΔW and, with a lora_bias, bias ← bias ± s·b; both checked before either changes."""
        bias = self.bias_term(name)
        base_bias = getattr(self.base_layer, "bias", None)
        if bias is not None and base_bias is None:
            raise MergeError(f"adapter {name!r} has a lora_bias but the base layer has no bias to merge it into")
        if bias is not None:
            add_delta(base_bias.detach().clone(), bias.detach(), sign, what=f"adapter {name!r}'s bias")  # a check only
        add_delta(self.base_weight(), delta, sign, what=f"adapter {name!r}")
        if bias is not None:
            add_delta(base_bias, bias.detach(), sign, what=f"adapter {name!r}'s bias")

    def _undo_dora_merge(self, name: str, weight: Tensor) -> Tensor:
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        factor = (self.lora_magnitude[name].detach().to(acc) / self._merge_norms[name]).reshape(self._dora_factor_shape())
        return weight.detach().to(acc) / factor - self.delta_weight(name).to(acc)

    def unmerged_weight(self) -> Tensor:
        """The base weight without the updates currently merged into it (float32 for half weights)."""
        weight = self.base_weight().detach()
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        weight = weight.to(acc)
        for name in reversed(self.merged_adapters):
            if name in self.lora_magnitude:
                weight = self._undo_dora_merge(name, weight)
            else:
                weight = weight - self.delta_weight(name).to(acc)
        return weight

    def original_weight(self) -> Tensor:
        """The base weight as it was before any adapter: unmerged, and with what PiSSA / OLoRA inits took out put back."""
        weight = self.unmerged_weight()
        for name, (A0, B0) in self.init_factors.items():
            weight = weight + self._delta(A0, B0, self.scaling[name]).to(weight.dtype)
        return weight

    def _unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a not in self.merged_adapters]

    def _dropout_and_seed(self, name: str) -> tuple[float, int | Tensor]:
        p = self.dropout_p[name] if self.training else 0.0
        # Seeds come from torch's global CPU generator, so training is reproducible from torch.manual_seed
        # and a checkpoint's RNG state; the mask itself is regenerated from the seed in backward.
        if not p:
            return p, 0
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        # Under torch.compile the seed stays a tensor (the custom ops read it): int() would break the graph.
        return p, seed if torch.compiler.is_compiling() else int(seed)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, s={self.scaling[n]:g}{', DoRA' if n in self.lora_magnitude else ''}"
                         for n in self.lora_A) + (
            ", disabled" if self.disabled else ""
        )


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D`` (whose weight is stored (k, d)).

    ``input_group``: set by :func:`lorakit.share_inputs` when sibling layers read the same input;
    the group may then supply this layer's output (same values, work shared).
    """

    input_group = None  # a lorakit.shared_input.InputGroup, or None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.layout = "transposed" if is_hf_conv1d(base_layer) else "linear"
        self._norm_cache: dict[str, tuple[tuple, Tensor]] = {}  # DoRA's n at inference (_inference_norm)
        self.blocks: dict[str, tuple[int, int]] = {}  # BD-LoRA: name → (blocks of A, blocks of B), when not (1, 1)
        self._pending_blocks = (1, 1)

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str = "kaiming",
                    use_dora: bool = False, bias: bool = False, blocks: tuple[int, int] = (1, 1)) -> None:
        """As :meth:`LoraLayer.add_adapter`; ``blocks`` = (a, b) makes A and/or B block-diagonal (PEFT's BD-LoRA):
        A = blockdiag(A_1 … A_a), each (r/a, k/a), stored (r, k/a); B = blockdiag(B_1 … B_b), each (d/b, r/b),
        stored (d, r/b) — PEFT's ``BlockDiagonalLinear`` layout."""
        blocks = tuple(blocks)
        if blocks != (1, 1):
            a, b = blocks
            if use_dora or init_kind(init) in MUTATING_INITS or self.quantized():
                raise UnsupportedModuleError("BD-LoRA takes plain LoRA inits on a full-precision base, without DoRA")
            if r % a or self.in_features % a or r % b or self.out_features % b:
                raise UnsupportedModuleError(
                    f"BD-LoRA with {a} blocks of A and {b} of B needs r={r}, k={self.in_features} and "
                    f"d={self.out_features} divisible by them; change r or nblocks")
        self._pending_blocks = blocks
        try:
            super().add_adapter(name, r, scale, dropout, init, use_dora, bias)
        finally:
            self._pending_blocks = (1, 1)
        if blocks != (1, 1):
            self.blocks[name] = blocks

    def lora_a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.in_features // self._pending_blocks[0])

    def lora_b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r // self._pending_blocks[1])

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.blocks.pop(name, None)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A (r, k), B (d, r)) of adapter ``name``, block-diagonal ones expanded (differentiably)."""
        A, B = self.lora_A[name], self.lora_B[name]
        a, b = self.blocks.get(name, (1, 1))
        if a > 1:
            A = torch.block_diag(*torch.chunk(A, a, dim=0))
        if b > 1:
            B = torch.block_diag(*torch.chunk(B, b, dim=0))
        return A, B

    def delta_weight(self, name: str) -> Tensor:
        if name not in self.blocks:
            return super().delta_weight(name)
        A, B = self.factors(name)
        return self._delta(A, B, self.scaling[name])

    @property
    def in_features(self) -> int:
        shape = self._base_shape()
        return shape[0] if self.layout == "transposed" else shape[1]

    @property
    def out_features(self) -> int:
        shape = self._base_shape()
        return shape[1] if self.layout == "transposed" else shape[0]

    def single_adapter(self) -> str | None:
        """The adapter when the layer computes its (d, k) base plus exactly one unmerged adapter, else None
        (merged, disabled, several active, DoRA, or a transposed Conv1D weight): the state in which callers that
        compute the layer themselves (``share_inputs``, ``fuse_mlps``) may do so."""
        names = self._unmerged_active()  # [] when disabled
        if len(names) == 1 and (names[0] in self.lora_magnitude or names[0] in self.lora_bias or names[0] in self.blocks):
            return None  # DoRA, a lora_bias or BD-LoRA: not the LoRA product those callers compute
        return names[0] if len(names) == 1 and self.layout == "linear" else None

    def adapter_params(self, name: str) -> tuple[Tensor | NF4Tensors, Tensor | None, Tensor, Tensor, float]:
        """(W, b, A, B, s) of adapter ``name``: what :func:`lorakit.ops.lora_linear` takes — except that a 4-bit
        base gives its packed weight (``NF4Tensors``), which the grouped ops dequantise where they use it."""
        W = self.base_layer.nf4() if self.quantized() else self.base_layer.weight
        return W, self.base_layer.bias, self.lora_A[name], self.lora_B[name], self.scaling[name]

    def forward(self, x: Tensor) -> Tensor:
        if self.input_group is not None and not torch.compiler.is_compiling():
            out = self.input_group.output(self, x)
            if out is not None:
                return out
        names = self._unmerged_active()
        if not names:
            return self.base_layer(x)
        if isinstance(self.base_layer, NF4Linear):  # the 4-bit base is dequantised inside the op, never kept
            return self._forward_nf4(x, names)
        weight = self.base_weight()
        W = weight.t() if self.layout == "transposed" else weight  # (d, k)
        out: Tensor | None = None
        for name in names:
            p, seed = self._dropout_and_seed(name)
            (A, B), s = self.factors(name), self.scaling[name]
            if name in self.lora_magnitude:
                m, n = self.lora_magnitude[name], self._inference_norm(name, W)
                if out is None:
                    out = dora_linear(x, W, self.base_layer.bias, A, B, s, m, n, p, int(seed))
                else:  # a later adapter adds only its change to the base output
                    out = out + (dora_linear(x, W, None, A, B, s, m, n, p, int(seed)) - x @ W.t().to(x.dtype))
            elif out is None:  # the first adapter's update accumulates into the base product
                out = lora_linear(x, W, self.base_layer.bias, A, B, s, p, seed)
            else:
                out = out + lora_linear(x, None, None, A, B, s, p, seed)
            if name in self.lora_bias:
                out = out + self.bias_term(name).to(out.dtype)
        return out

    def _forward_nf4(self, x: Tensor, names: list[str]) -> Tensor:
        base = self.base_layer
        out: Tensor | None = None
        for name in names:
            p, seed = self._dropout_and_seed(name)
            (A, B), s = self.factors(name), self.scaling[name]
            if out is None:
                out = nf4_lora_linear(x, base.nf4(), base.bias, A, B, s, p, seed)
            else:
                out = out + lora_linear(x, None, None, A, B, s, p, seed)
            if name in self.lora_bias:
                out = out + self.bias_term(name).to(out.dtype)
        return out

    def _inference_norm(self, name: str, W: Tensor) -> Tensor | None:
        """DoRA's n for adapter ``name``, kept while W, A, B and s stay the same — only without grad (e.g.
        generation, where recomputing it would cost a pass over W per token); None otherwise (computed
        in the op).  The key is each tensor's storage and version counter, which every in-place change
        (optimizer steps, loading, merging) bumps."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        key = tuple((t.data_ptr(), t._version) for t in (W, self.lora_A[name], self.lora_B[name]))
        key += (self.scaling[name],)
        cached = self._norm_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._norm_cache[name] = (key, self.dora_norm(name))
        return cached[1]

    def mutating_init(self, name: str, init: str) -> None:
        """PiSSA (``init`` "pissa", or "pissa_niter_K" for a K-iteration randomised SVD) and OLoRA ("olora"),
        exactly as PEFT's ``pissa_init`` / ``olora_init``, on W as the (d, k) matrix in float32:

            PiSSA:  W = U S Vᵀ,  A = diag(√(S_r / s)) V_rᵀ,  B = U_r diag(√(S_r / s))
            OLoRA:  W = Q R,     A = R[:r],  B = Q[:, :r]
            then    W ← W − s·B A   (rounded once to W's dtype), so the model's output is unchanged.

        (A, B) are remembered as the init factors (A₀, B₀): W + s·(BA − B₀A₀) is the trained model, so
        saving writes the rank-2r plain LoRA [A; A₀], [B, −B₀] against the original W (PEFT's conversion).
        """
        weight = self.base_weight()
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise UnsupportedModuleError(f"init {init!r} needs a floating-point weight, this layer's is {weight.dtype}")
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        W = self.as_matrix(weight).detach().to(acc)
        r, s = self.r[name], self.scaling[name]
        if r > min(W.shape):
            raise UnsupportedModuleError(
                f"init {init!r} with rank {r} needs r ≤ min(d, k) = {min(W.shape)} for a {tuple(W.shape)} weight; lower r")
        if init == "olora":
            Q, R = torch.linalg.qr(W)
            A0, B0 = R[:r], Q[:, :r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                niter = int(init.rsplit("_", 1)[1])
                U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
                Vh = V.t()
            root = (S / s).sqrt()
            A0, B0 = root[:, None] * Vh, U * root[None, :]
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            A.copy_(A0)
            B.copy_(B0)
            self.as_matrix(weight).copy_(W - s * (B0 @ A0))
        self.init_factors[name] = (A.detach().clone(), B.detach().clone())


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: h = E[ids] + s · (Aᵀ)[ids] Bᵀ, A: (r, num_embeddings), B: (dim, r).

    As in PEFT, the embedding branch has no dropout (an id has no elements to drop).
    """

    layout = "embedding"
    supports_bias = False

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def _init_factors(self, A: Tensor, B: Tensor, init: str) -> None:
        # PEFT's embedding init: A = 0, B ~ N(0, 1), so ΔW = 0 but B is not stuck at zero (a Kaiming A over
        # a large vocabulary would make each id's row of A tiny); init_lora_weights=False: both N(0, 1).
        if init == "nonzero":
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)
        nn.init.normal_(B)

    def mutating_init(self, name: str, init: str) -> None:
        """PEFT gives embeddings its default embedding init for PiSSA / OLoRA too: nothing to move out of E."""

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base_layer(ids)
        base = self.base_layer
        for name in self._unmerged_active():
            low = F.embedding(  # (..., r): the rows of Aᵀ picked by the ids
                ids, self.lora_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
                base.scale_grad_by_freq, base.sparse,
            )
            delta = (low @ self.lora_B[name].t().to(low.dtype)).to(out.dtype) * self.scaling[name]
            if name in self.lora_magnitude:  # DoRA, as PEFT: f ⊙ (everything so far + the update), f per dim
                f = (self.lora_magnitude[name] / self.dora_norm(name)).to(out.dtype)
                out = (out + delta) * f
            else:
                out = out + delta
        return out


class LoraConv(LoraLayer):
    """LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, as PEFT builds it.

    A acts as a convolution with the base's kernel, stride, padding and dilation from all ``in``
    input channels into r channels; B as a 1×…×1 convolution from r to d channels in the base's
    ``groups`` groups:  h = conv(x; W) + s · (conv_g(conv(x; A); B) + b).  A is stored flattened
    (r, in·∏kernel), B as (d, r/groups).  With groups = 1, ΔW = s·BA reshaped to W's shape; with
    groups > 1 the update is a full (ungrouped) convolution that W cannot hold, so such adapters
    cannot be merged (as in PEFT) and r must be a multiple of groups.
    """

    layout = "conv"

    @property
    def in_features(self) -> int:
        base = self.base_layer
        return base.in_channels * math.prod(base.kernel_size)

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def dora_norm(self, name: str) -> Tensor:
        """DoRA's n per output channel.  With groups > 1 this is PEFT's: the norm of W + s·L where L is
        B viewed as (d/groups, r) times A, laid out in W's grouped shape (PEFT's ``get_lora_weight``) —
        not the grouped update the forward applies, but what PEFT divides by, so its adapters load equal."""
        if self.base_layer.groups == 1:
            return super().dora_norm(name)
        W, A, B = self.base_weight().detach(), self.lora_A[name].detach(), self.lora_B[name].detach()
        acc = torch.float64 if torch.float64 in (W.dtype, A.dtype) else torch.float32
        L = (B.to(acc).reshape(-1, A.shape[0]) @ A.to(acc)).reshape(W.shape)
        return (W.to(acc) + self.scaling[name] * L).flatten(1).norm(dim=1)

    def lora_b_shape(self, r: int) -> tuple[int, ...]:
        groups = self.base_layer.groups
        if r % groups:
            raise UnsupportedModuleError(
                f"a {type(self.base_layer).__name__} with groups={groups} needs a rank that is a multiple of {groups} "
                f"(PEFT's rule), got r={r}: change r or rank_pattern for this layer"
            )
        return (self.out_features, r // groups)

    def lora_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(A's kernel shape after r, B's after (d, r/groups)) in PEFT's convolution-weight layout."""
        base = self.base_layer
        return (base.in_channels, *base.kernel_size), (1,) * len(base.kernel_size)

    def delta_weight(self, name: str) -> Tensor:
        groups = self.base_layer.groups
        if groups > 1:
            raise MergeError(
                f"adapter {name!r} adapts a convolution with groups={groups}: its update is an ungrouped convolution "
                "that the grouped weight cannot hold, so it cannot be merged (PEFT cannot either); keep it unmerged"
            )
        return super().delta_weight(name)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        base = self.base_layer
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(base.kernel_size) - 1]
        a_shape, b_shape = self.lora_shapes()
        channel = (1, -1) + b_shape  # a (d,) vector over the output's channels
        for name in self._unmerged_active():
            p = self.dropout_p[name] if self.training else 0.0
            A = self.lora_A[name].reshape(-1, *a_shape).to(x.dtype)  # (r, in, *kernel)
            B = self.lora_B[name].reshape(*self.lora_B[name].shape, *b_shape).to(x.dtype)  # (d, r/groups, 1, ...)
            xd = F.dropout(x, p, True) if p else x
            low = conv(xd, A, None, base.stride, base.padding, base.dilation)
            bias = self.lora_bias[name].to(x.dtype) if name in self.lora_bias else None
            delta = conv(low, B, bias, groups=base.groups) * self.scaling[name]
            if name in self.lora_magnitude:  # DoRA as PEFT: + (f − 1) ⊙ conv(x̃, W) + f ⊙ update, f per channel
                f = (self.lora_magnitude[name] / self.dora_norm(name)).to(x.dtype).view(channel)
                if p:
                    base_out = conv(xd, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation)
                else:  # what the base (and earlier adapters) gave, without the bias
                    base_out = out if base.bias is None else out - base.bias.to(out.dtype).view(channel)
                out = out + (f - 1) * base_out + f * delta
            else:
                out = out + delta
        return out


LoraConv2d = LoraConv  # the name it had when only nn.Conv2d was supported


class LoraMultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention`` as PEFT applies it: one adapter on the packed input projection
    (``in_proj_weight``, (3E, E): A (r, E), B (3E, r)) and one on ``out_proj`` (``out_A`` (r, E),
    ``out_B`` (E, r)); the attention runs with

        W_in + s·B A   and   W_out + c·s·B_out A_out,   c = ``OUT_PROJ_FACTOR`` = 2.

    c = 2 is what PEFT computes (up to at least 0.21.2 its MultiheadAttention merge adds the out_proj
    update twice, in the unmerged forward too; huggingface/peft PR #3774), so adapters trained there
    load with the function they were trained as, and lorakit's files load in PEFT unchanged.  As in
    PEFT (which merges the weights for each call) there is no lora dropout, DoRA or lora_bias, and
    query, key and value must share the embedding size.
    """

    supports_bias = False
    OUT_PROJ_FACTOR = 2.0

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__(base_layer)
        self.out_A = nn.ParameterDict()
        self.out_B = nn.ParameterDict()

    def base_weight(self) -> Tensor:
        return self.base_layer.in_proj_weight

    def _base_shape(self) -> torch.Size:
        return self.base_layer.in_proj_weight.shape

    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.base_layer.in_proj_weight
        return w.device, w.dtype

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str = "kaiming",
                    use_dora: bool = False, bias: bool = False) -> None:
        if use_dora:
            raise UnsupportedModuleError("nn.MultiheadAttention cannot take DoRA (nor in PEFT): drop use_dora or this target")
        super().add_adapter(name, r, scale, dropout, init, use_dora, bias)
        A, B = torch.empty_like(self.lora_A[name]), torch.zeros_like(self.lora_B[name][: self.base_layer.embed_dim])
        self._init_factors(A, B, init)
        self.out_A[name], self.out_B[name] = nn.Parameter(A), nn.Parameter(B)

    def trainable(self, name: str) -> list[nn.Parameter]:
        return super().trainable(name) + [d[name] for d in (self.out_A, self.out_B) if name in d]

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        del self.out_A[name], self.out_B[name]

    def out_delta(self, name: str) -> Tensor:
        """c·s·B_out A_out (E, E), float32 (float64 stays float64)."""
        return delta_weight(self.out_A[name], self.out_B[name], self.OUT_PROJ_FACTOR * self.scaling[name], "linear",
                            self.base_layer.out_proj.weight.shape)

    def _add(self, name: str, delta: Tensor, sign: int) -> None:
        out_weight = self.base_layer.out_proj.weight
        add_delta(out_weight.detach().clone(), self.out_delta(name), sign, what=f"adapter {name!r}")  # a check only
        super()._add(name, delta, sign)
        add_delta(out_weight, self.out_delta(name), sign, what=f"adapter {name!r}")

    def forward(self, query: Tensor, *args, **kwargs):
        names = self._unmerged_active()
        if not names:
            return self.base_layer(query, *args, **kwargs)
        base = self.base_layer
        W_in, W_out = base.in_proj_weight, base.out_proj.weight
        for name in names:
            s = self.scaling[name]
            W_in = W_in + s * (self.lora_B[name] @ self.lora_A[name]).to(W_in.dtype)
            W_out = W_out + (self.OUT_PROJ_FACTOR * s) * (self.out_B[name] @ self.out_A[name]).to(W_out.dtype)
        return torch.func.functional_call(base, {"in_proj_weight": W_in, "out_proj.weight": W_out}, (query, *args),
                                          kwargs, strict=False)


class LoraParameter(LoraLayer):
    """LoRA on one parameter P of a module (PEFT's ``target_parameters`` / ``ParamWrapper``), e.g. the
    3-D expert weights of MoE layers that no nn.Linear holds; the module's forward runs with P + ΔP.

    P of shape (X, Y): ΔP = s·B A with A (r, Y), B (X, r).  P of shape (E, X, Y) (E experts): A is
    (r·E, k) and B (d, r·E) — PEFT's layout: expert e uses rows e·r … e·r+r−1 of A and columns
    e, e+E, e+2E, … of B (B viewed as (d, r, E)) — and ΔP[e] = s·B_e A_e with k = Y, d = X, or, when
    the module says ``is_transposed`` (experts stored (E, in, out)), ΔP[e] = s·(B_e A_e)ᵀ with k = X,
    d = Y.  As in PEFT there is no dropout (x cannot be factored out of the module's own forward), no
    lora_bias and no DoRA.  Several parameters of one module nest: the wrapper of the first parameter
    (in the module's registration order) is innermost, and is saved under ``<module>.base_layer``.
    """

    supports_bias = False

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.base_weight().shape
        if len(shape) not in (2, 3):
            raise UnsupportedModuleError(
                f"parameter {parameter_name!r} has {len(shape)} dimensions; target_parameters takes 2-D and 3-D ones")
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.transposed = len(shape) == 3 and bool(getattr(self.module(), "is_transposed", False))

    def module(self) -> nn.Module:
        """The module that owns the parameter (inside any nested parameter wrappers)."""
        inner = self.base_layer
        while isinstance(inner, LoraParameter):
            inner = inner.base_layer
        return inner

    def base_weight(self) -> Tensor:
        return getattr(self.module(), self.parameter_name)

    def _base_shape(self) -> torch.Size:
        return self.base_weight().shape

    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.base_weight()
        return w.device, w.dtype

    @property
    def in_features(self) -> int:
        shape = self.base_weight().shape
        return shape[-2] if self.transposed else shape[-1]

    @property
    def out_features(self) -> int:
        shape = self.base_weight().shape
        return shape[-1] if self.transposed else shape[-2]

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str = "kaiming",
                    use_dora: bool = False, bias: bool = False) -> None:
        where = f"parameter {self.parameter_name!r} (target_parameters)"
        if dropout:
            raise UnsupportedModuleError(f"{where} cannot take lora dropout (nor in PEFT): set dropout=0")
        if use_dora:
            raise UnsupportedModuleError(f"{where} cannot take DoRA (nor in PEFT): drop use_dora")
        super().add_adapter(name, r * self.num_experts, scale, dropout, init, use_dora, bias)
        self.r[name] = r

    def _init_factors(self, A: Tensor, B: Tensor, init: str) -> None:
        if init == "gaussian":  # PEFT's std is 1/r, r the rank per expert
            nn.init.normal_(A, std=self.num_experts / A.shape[0])
        else:
            super()._init_factors(A, B, init)

    def delta_weight(self, name: str) -> Tensor:
        """s·ΔP in P's shape, float32 (float64 stays float64)."""
        A, B = self.lora_A[name], self.lora_B[name]
        dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        return self._delta_from(A.to(dtype), B.to(dtype), self.scaling[name])

    def _delta_from(self, A: Tensor, B: Tensor, scale: float) -> Tensor:
        E = self.num_experts
        A_e = A.reshape(E, -1, A.shape[-1])  # (E, r, k)
        B_e = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # (E, d, r)
        delta = torch.bmm(B_e, A_e) * scale  # (E, d, k)
        if self.transposed:
            delta = delta.transpose(1, 2)
        return delta.reshape(self.base_weight().shape)

    def forward(self, *args, **kwargs):
        names = self._unmerged_active()
        if not names:
            return self.base_layer(*args, **kwargs)
        P = self.base_weight()
        for name in names:
            P = P + self._delta_from(self.lora_A[name].to(P.dtype), self.lora_B[name].to(P.dtype), self.scaling[name])
        depth, inner = 0, self.base_layer
        while isinstance(inner, LoraParameter):
            depth, inner = depth + 1, inner.base_layer
        path = "base_layer." * depth + self.parameter_name
        return torch.func.functional_call(self.base_layer, {path: P}, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, " + super().extra_repr()



#: The module types lorakit adapts, as error messages name them.
ADAPTABLE = ("nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d (grouped too), nn.MultiheadAttention "
             "(same q/k/v size)")


def wrap(module: nn.Module, qualified_name: str) -> LoraLayer:
    """The LoRA layer class for ``module``, wrapping it."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, _CONVS):
        return LoraConv(module)
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
        return LoraMultiheadAttention(module)
    raise UnsupportedModuleError(
        f"module {qualified_name!r} is a {type(module).__name__}; lorakit adapts {ADAPTABLE}. Remove it from target_modules."
    )
