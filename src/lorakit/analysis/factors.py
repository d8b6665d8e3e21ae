"""The LoRA factors of an adapter, one (A, B, s) triple per adapted module, as (d, k) matrices.

Everything in :mod:`lorakit.analysis` works on these triples, never on files: an adapter directory
is read by :func:`lorakit.io.read_adapter` and its PEFT-keyed tensors are paired
here. Every layer kind becomes the same matrix picture ``ΔW = s · B A`` with

    A: (r, k)   B: (d, r)   ΔW: (d, k)

- Linear / HF Conv1D: A and B as stored (HF Conv1D keeps W as (k, d), but ΔW's spectrum and norm
  do not depend on the layout).
- Embedding: ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r); the layer adds
  (BA)ᵀ, with the same singular values.
- Conv: A (r, in, kh, kw) → (r, in·kh·kw) and B (out, r, 1, 1) → (out, r), the usual im2col view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import LoraConfig
from ..errors import LorakitError
from ..io import read_adapter
from ..peft_keys import split_lora_key


Kind = Literal["linear", "embedding", "conv"]


class AnalysisError(LorakitError, ValueError):
    """The analysis cannot proceed: adapters that do not fit together, no LoRA tensors, a base
    model that lacks the adapted weights, or a sweep whose runs did not produce metrics."""


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One adapted module's update ``ΔW = scale · B @ A`` in (d, k) matrix form (the file's dtype).

    Attributes:
        name: the module's dotted path in the model ("model.layers.0.self_attn.q_proj").
        kind: "linear" (also HF Conv1D), "embedding" or "conv".
        A: (r, k).  B: (d, r).  scale: s = α / r (α / √r with rsLoRA).
        alpha: α for this module (None when the tensors came without a config).
    """

    name: str
    kind: Kind
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d, k) of ΔW."""
        return self.B.shape[0], self.A.shape[1]

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of this module: r (d + k)."""
        return self.A.numel() + self.B.numel()


@dataclasses.dataclass(frozen=True)
class AdapterFactors:
    """All modules of one adapter, ordered by path (numbers as numbers), with the config they were read with."""

    modules: tuple[LoraFactors, ...]
    config: LoraConfig | None
    source: str
    raw_config: Mapping[str, Any]
    notes: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[LoraFactors]:
        return iter(self.modules)

    def by_name(self) -> dict[str, LoraFactors]:
        return {m.name: m for m in self.modules}


def load_factors(
    source: str | Path | Mapping[str, torch.Tensor] | AdapterFactors, *, config: LoraConfig | None = None
) -> AdapterFactors:
    """Read an adapter directory (or take PEFT-keyed tensors) and pair its factors per module.

    Args:
        source: an adapter directory (adapter_config.json + adapter_model.safetensors), or a
            mapping of PEFT keys to tensors (then ``config`` gives the scales; without it s = 1).
        config: overrides the directory's config / gives the scale for bare tensors.

    Raises:
        AdapterFileError: the directory is not an adapter directory (from :func:`lorakit.io.read_adapter`).
        AnalysisError: no LoRA tensors, an A without its B, or factor shapes that disagree.
    """
    if isinstance(source, AdapterFactors):
        return source
    raw: Mapping[str, Any] = {}
    if isinstance(source, Mapping):
        tensors, label = dict(source), "<tensors>"
    else:
        adapter = read_adapter(source)
        label, tensors, raw = str(source), adapter.tensors, adapter.raw_config
        config = config or adapter.config
    return _pair(tensors, config, label, raw)


def _pair(tensors: Mapping[str, torch.Tensor], config: LoraConfig | None, label: str, raw: Mapping[str, Any]) -> AdapterFactors:
    found: dict[str, dict[str, torch.Tensor]] = {}
    adapters: set[str] = set()
    ignored = 0
    for key, tensor in tensors.items():
        parts = split_lora_key(key)
        if parts is None:
            ignored += 1  # modules_to_save copies, heads: not low-rank updates
            continue
        module, kind, adapter = parts
        if adapter:
            adapters.add(adapter)
        found.setdefault(module, {})[kind] = tensor
    if len(adapters) > 1:
        raise AnalysisError(f"{label}: tensors of several adapters ({', '.join(sorted(adapters))}); pass one adapter's tensors")
    if not found:
        raise AnalysisError(f"{label}: no LoRA tensors (keys ending in lora_A / lora_B / lora_embedding_A / lora_embedding_B)")
    # Files keep keys sorted as strings; order by path with numbers as numbers (layers 2 < 10).
    order = sorted(found, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split(".")])
    modules = [_module(name, found[name], config, label) for name in order]
    notes = []
    if ignored:
        notes.append(f"{ignored} non-LoRA tensor(s) (e.g. modules_to_save) are not part of the analysis")
    if config is None:
        notes.append("no adapter config: scales taken as s = 1")
    else:
        off = [m.name for m in modules if config.rank_for(m.name) != m.r]
        if off:
            notes.append(f"{len(off)} module(s) have a rank different from the config's (e.g. {off[0]}); the config's scale is used")
    return AdapterFactors(tuple(modules), config, label, dict(raw), tuple(notes))


def _module(name: str, parts: dict[str, torch.Tensor], config: LoraConfig | None, label: str) -> LoraFactors:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_key not in parts or b_key not in parts:
        missing = b_key if a_key in parts else a_key
        raise AnalysisError(f"{label}: module {name} has no {missing} tensor; the adapter file is incomplete")
    # Kept in the file's dtype (a 7B adapter in float64 would double its memory); the spectrum
    # converts one module at a time to float64.
    A, B = parts[a_key].detach().cpu(), parts[b_key].detach().cpu()
    kind: Kind = "embedding" if embedding else ("conv" if A.dim() > 2 else "linear")
    if kind == "conv":
        if B.dim() < 2 or any(s != 1 for s in B.shape[2:]):
            raise AnalysisError(f"{label}: module {name}: conv lora_B must be (out, r, 1, ...), got {tuple(B.shape)}")
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise AnalysisError(f"{label}: module {name}: {a_key} {tuple(A.shape)} and {b_key} {tuple(B.shape)} "
                            "do not form a product B @ A (need A: (r, k), B: (d, r))")
    scale = config.scale_for(name) if config is not None else 1.0
    alpha = config.alpha_for(name) if config is not None else None
    return LoraFactors(name, kind, A.contiguous(), B.contiguous(), float(scale), alpha)
