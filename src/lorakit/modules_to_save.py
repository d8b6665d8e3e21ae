"""Whole modules trained per adapter, beside LoRA's low-rank ones (PEFT's ``modules_to_save`` and trainable tokens).

A classifier head trained from scratch, or an embedding's new token rows, cannot be a low-rank update of what the
base has: these modules keep the original untouched and train a copy (:class:`ModulesToSave`) or chosen rows
(:class:`TrainableTokens`) per adapter, so disabling or deleting the adapter gives the base model back.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AdapterNameError, UnsupportedModuleError


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


class TrainableTokens(ModulesToSave):
    """PEFT's trainable tokens (``trainable_token_indices``): chosen rows of an ``nn.Embedding`` trained
    outright, one set per adapter.

    ``copies[name]`` (n, dim) holds the new values of rows ``token_indices[name]`` (initialised to the
    current rows, so the output is unchanged); forward embeds with E' = E whose rows are replaced by
    each active adapter's values, in order.  Saved as PEFT's ``<path>.token_adapter.trainable_tokens_delta``.
    """

    def __init__(self, original_module: nn.Embedding) -> None:
        nn.Module.__init__(self)
        if not isinstance(original_module, nn.Embedding):
            raise UnsupportedModuleError(
                f"trainable tokens need an nn.Embedding, got a {type(original_module).__name__}")
        self.original_module = original_module
        self.copies = nn.ParameterDict()
        self.token_indices: dict[str, tuple[int, ...]] = {}
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, token_indices: tuple[int, ...] = ()) -> None:
        if name in self.copies:
            raise AdapterNameError(f"adapter {name!r} already has trainable tokens here")
        weight = self.original_module.weight
        bad = [i for i in token_indices if not 0 <= i < weight.shape[0]]
        if bad or not token_indices:
            raise UnsupportedModuleError(
                f"trainable token ids {bad or list(token_indices)} are not rows of this embedding "
                f"({weight.shape[0]} rows)")
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        rows = weight.detach()[torch.tensor(token_indices, device=weight.device)].to(dtype)
        self.copies[name] = nn.Parameter(rows.clone())
        self.token_indices[name] = tuple(token_indices)

    def weight_with_tokens(self) -> Tensor:
        """E with the active adapters' rows written in (differentiable in those rows)."""
        weight = self.original_module.weight
        if self.disabled:
            return weight
        for name in self.active_adapters:
            if name in self.copies:
                index = torch.tensor(self.token_indices[name], device=weight.device)
                weight = weight.index_copy(0, index, self.copies[name].to(weight.dtype))
        return weight

    def forward(self, ids: Tensor) -> Tensor:
        base = self.original_module
        return F.embedding(ids, self.weight_with_tokens(), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def merged_module(self) -> nn.Embedding:
        """The embedding with the active adapters' rows written into its weight (for merge_and_unload)."""
        with torch.no_grad():
            self.original_module.weight.copy_(self.weight_with_tokens())
        return self.original_module
