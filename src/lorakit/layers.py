"""LoRA modules: each wraps one frozen base module and holds any number of named adapters.

    h = base(x) + Σ_active s_i · B_i (A_i drop(x))       A_i: (r_i, k)   B_i: (d, r_i)

The arithmetic lives in ``ops`` (the linear forward is :func:`lorakit.ops.lora_linear`) and in
``merge.delta_weight``; these classes only hold parameters and choose what to call.  A layer keeps
its adapters as data (``lora_A[name]``, ``lora_B[name]``, ``scaling[name]``), so other code — mixed
batches, adapter arithmetic, saving — works on every layer type the same way.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AdapterNameError, UnsupportedModuleError
from .merge import Layout, add_delta, delta_weight
from .ops import lora_linear


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored as (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def supports(module: nn.Module) -> bool:
    """Whether lorakit can wrap this module."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_hf_conv1d(module) or (
        isinstance(module, nn.Conv2d) and module.groups == 1
    )


class LoraLayer(nn.Module):
    """A frozen ``base_layer`` plus named low-rank adapters.

    Attributes:
        base_layer: the original module; its parameters are frozen by ``inject``.
        lora_A / lora_B: ParameterDicts, name → (r, k) / (d, r).
        scaling: name → s.   r: name → rank.   dropout_p: name → dropout probability.
        active_adapters: names whose updates are added in forward (their updates add).
        merged_adapters: names currently folded into the base weight.
        disabled: when True, forward is the base module alone.
    """

    layout: Layout = "linear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
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
        """The frozen weight as stored by the base module (4-bit bases dequantise here)."""
        return self.base_layer.weight

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str = "kaiming") -> None:
        """Create adapter ``name``: A random (Kaiming-uniform or Gaussian), B zero, so ΔW = 0."""
        if name in self.lora_A:
            raise AdapterNameError(f"adapter {name!r} already exists in this layer; delete it first or pick another name")
        weight = self.base_weight()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(r, self.in_features, device=weight.device, dtype=dtype)
        B = torch.zeros(self.out_features, r, device=weight.device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:  # nn.Linear's default init, as PEFT uses for lora_A
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scaling[name], self.r[name], self.dropout_p[name] = float(scale), r, float(dropout)

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (unmerging it first if it was merged)."""
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.lora_A[name], self.lora_B[name]
        for table in (self.scaling, self.r, self.dropout_p):
            del table[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_weight(self, name: str) -> Tensor:
        """s·BA for adapter ``name``, shaped like the base weight (float32)."""
        weight = self.base_weight()
        return delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name], self.layout, weight.shape)

    def merge(self, names: list[str] | None = None) -> None:
        """W ← W + s·BA for each named (default: active) adapter not merged yet."""
        for name in names if names is not None else self.active_adapters:
            if name not in self.merged_adapters:
                add_delta(self.base_weight(), self.delta_weight(name), +1, what=f"adapter {name!r}")
                self.merged_adapters.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """W ← W − s·BA for each named (default: every merged) adapter, newest first."""
        for name in reversed(list(self.merged_adapters)):
            if names is None or name in names:
                add_delta(self.base_weight(), self.delta_weight(name), -1, what=f"adapter {name!r}")
                self.merged_adapters.remove(name)

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
        return ", ".join(f"{n}: r={self.r[n]}, s={self.scaling[n]:g}" for n in self.lora_A) + (
            ", disabled" if self.disabled else ""
        )


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D`` (whose weight is stored (k, d)).

    ``input_group``: set by :func:`lorakit.share_inputs` when sibling layers read the same input;
    the group may then supply this layer's output (same values, work shared).
    """

    input_group = None  # a lorakit.share.InputGroup, or None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.layout = "transposed" if is_hf_conv1d(base_layer) else "linear"

    @property
    def in_features(self) -> int:
        w = self.base_weight()
        return w.shape[0] if self.layout == "transposed" else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.base_weight()
        return w.shape[1] if self.layout == "transposed" else w.shape[0]

    def single_adapter(self) -> str | None:
        """The adapter when the layer computes its (d, k) base plus exactly one unmerged adapter, else None
        (merged, disabled, several active, or a transposed Conv1D weight): the state in which callers
        that compute the layer themselves (``share_inputs``, ``fuse_mlps``) may do so."""
        names = self._unmerged_active()  # [] when disabled
        return names[0] if len(names) == 1 and self.layout == "linear" else None

    def adapter_params(self, name: str) -> tuple[Tensor, Tensor | None, Tensor, Tensor, float]:
        """(W, b, A, B, s) of adapter ``name``: what :func:`lorakit.ops.lora_linear` takes."""
        return self.base_weight(), self.base_layer.bias, self.lora_A[name], self.lora_B[name], self.scaling[name]

    def forward(self, x: Tensor) -> Tensor:
        if self.input_group is not None and not torch.compiler.is_compiling():
            out = self.input_group.output(self, x)
            if out is not None:
                return out
        names = self._unmerged_active()
        if not names:
            return self.base_layer(x)
        weight = self.base_weight()
        W = weight.t() if self.layout == "transposed" else weight  # (d, k)
        out: Tensor | None = None
        for name in names:
            p, seed = self._dropout_and_seed(name)
            A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
            if out is None:  # the first adapter's update accumulates into the base product
                out = lora_linear(x, W, self.base_layer.bias, A, B, s, p, seed)
            else:
                out = out + lora_linear(x, None, None, A, B, s, p, seed)
        return out


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: h = E[ids] + s · (Aᵀ)[ids] Bᵀ, A: (r, num_embeddings), B: (dim, r).

    As in PEFT, the embedding branch has no dropout (an id has no elements to drop).
    """

    layout = "embedding"

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base_layer(ids)
        base = self.base_layer
        for name in self._unmerged_active():
            low = F.embedding(  # (..., r): the rows of Aᵀ picked by the ids
                ids, self.lora_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
                base.scale_grad_by_freq, base.sparse,
            )
            out = out + (low @ self.lora_B[name].t().to(low.dtype)).to(out.dtype) * self.scaling[name]
        return out


class LoraConv2d(LoraLayer):
    """LoRA around ``nn.Conv2d`` (groups = 1): A acts as a conv with the base's kernel, stride and
    padding into r channels, B as a 1×1 conv back to d channels; A is stored flattened (r, in·kh·kw)."""

    layout = "conv"

    @property
    def in_features(self) -> int:
        w = self.base_weight()
        return w.shape[1] * w.shape[2] * w.shape[3]

    @property
    def out_features(self) -> int:
        return self.base_weight().shape[0]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        base = self.base_layer
        for name in self._unmerged_active():
            p = self.dropout_p[name] if self.training else 0.0
            A = self.lora_A[name].reshape(-1, *base.weight.shape[1:]).to(x.dtype)  # (r, in, kh, kw)
            B = self.lora_B[name][:, :, None, None].to(x.dtype)  # (d, r, 1, 1)
            low = F.conv2d(F.dropout(x, p, True) if p else x, A, None, base.stride, base.padding, base.dilation)
            out = out + F.conv2d(low, B) * self.scaling[name]
        return out


def wrap(module: nn.Module, qualified_name: str) -> LoraLayer:
    """The LoRA layer class for ``module``, wrapping it."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return LoraConv2d(module)
    raise UnsupportedModuleError(
        f"module {qualified_name!r} is a {type(module).__name__}; lorakit adapts nn.Linear, transformers Conv1D, "
        "nn.Embedding and nn.Conv2d (groups=1). Remove it from target_modules."
    )


class ModulesToSave(nn.Module):
    """A module trained and saved whole (e.g. a classifier head), one copy per adapter.

    The original stays untouched, so disabling or deleting the adapter restores the base model.
    Saved keys are the module's own parameter names (PEFT's layout): ``<path>.<param>``.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        if name in self.copies:
            raise AdapterNameError(f"adapter {name!r} already has a copy of this module")
        self.copies[name] = copy.deepcopy(self.original_module)

    def current(self) -> nn.Module:
        """The module forward uses: the first active adapter's copy, else the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # models sometimes read attributes of their heads (out_features, ...)
            return getattr(super().__getattr__("original_module"), name)
