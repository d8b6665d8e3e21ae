"""Adapter arithmetic: a weighted combination of adapters, as a new ordinary adapter.

For adapters i with weights w_i, scales s_i and factors A_i (r_i, k), B_i (d, r_i), the target of
every method is the weighted sum of their updates, per layer:

    ΔW = Σ_i w_i s_i B_i A_i                                     (d, k)

and the result is stored as a new adapter with scale 1 (α = r), so ΔW_new = B_new A_new:

* ``linear`` — PEFT's weighted-adapter rule: A = Σ c_i A_i, B = Σ ±c_i B_i with c_i = √|w_i s_i|
  (rank unchanged; every adapter must have the same rank in a layer). It is *not* ΔW: the cross
  terms c_i c_j B_i A_j stay. Useful for adapters trained from one initialisation.
* ``cat`` — A = [c_1 A_1; …], B = [±c_1 B_1, …]: rank Σ r_i, exactly ΔW.
* ``svd`` — ΔW truncated to rank ``rank`` (default: the largest r_i) by an SVD computed through the
  factors (QR of the stacked factors, then an SVD of a (Σr × Σr) core: never a dense d×k matrix);
  the report gives the discarded energy Σ_{j>rank} σ_j² / Σ_j σ_j² of each layer.
* ``ties`` — TIES-merging (Yadav et al. 2023) of the dense task vectors τ_i = s_i B_i A_i: keep each
  τ_i's ``density`` fraction of largest-magnitude entries, elect each entry's sign from Σ_i w_i τ_i,
  average the weighted entries that agree with it; then an SVD to ``rank`` (energy reported).
* ``dare`` — DARE (Yu et al. 2024): each τ_i keeps an entry with probability ``density`` and is
  rescaled by 1/density, then Σ_i w_i τ_i; then an SVD to ``rank`` (energy reported).

The new adapter saves and loads like any other (``lorakit.save_adapter`` / ``load_adapter``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from .adapters import adapter_names, lora_layers
from .config import LoraConfig
from .errors import AdapterNameError, ConfigError
from .inject import inject, state_of
from .layers import LoraMultiheadAttention, LoraParameter

Method = Literal["linear", "cat", "svd", "ties", "dare"]
METHODS = ("linear", "cat", "svd", "ties", "dare")


@dataclasses.dataclass(frozen=True)
class CombineReport:
    """What :func:`combine` built.

    Attributes:
        name / method: the new adapter and how it was made.
        ranks: qualified layer name → rank of the new adapter there.
        discarded_energy: layer → Σ_{j>rank} σ_j² / Σ σ_j² of the combined ΔW (svd, ties, dare;
            0 when nothing was cut); empty for linear and cat.
    """

    name: str
    method: str
    ranks: dict[str, int]
    discarded_energy: dict[str, float]

    @property
    def max_discarded_energy(self) -> float:
        """The worst layer's discarded fraction of ‖ΔW‖²_F (0.0 for linear / cat)."""
        return max(self.discarded_energy.values(), default=0.0)


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    method: Method = "linear",
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
) -> CombineReport:
    """Add adapter ``name`` = a weighted combination of existing adapters (see the module doc).

    Args:
        weights: adapter name → weight w_i (any sign).
        method: "linear", "cat", "svd", "ties" or "dare".
        rank: the new rank for svd / ties / dare (default: the largest input rank in each layer).
        density: fraction of entries kept by ties / dare, in (0, 1].
        seed: the random drop of dare.

    Returns:
        A :class:`CombineReport` (ranks per layer, discarded energy). The new adapter is added
        inactive, like any further adapter; select it with ``lorakit.set_adapter``.

    Raises:
        AdapterNameError: an unknown input or a taken ``name``.
        ConfigError: a bad method / density / rank, linear over different ranks, or inputs with
            modules_to_save (a whole module has no low-rank combination).
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if not weights:
        raise ConfigError("weights is empty; give at least one adapter, e.g. {'a': 0.7, 'b': 0.3}")
    known = adapter_names(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise AdapterNameError(f"no adapter named {unknown[0]!r} to combine; the model has {known}")
    if name in known:
        raise AdapterNameError(f"the model already has an adapter named {name!r}; pick another name")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be an integer ≥ 1, got {rank!r}")
    configs = state_of(model).configs
    with_dora = [n for n in weights if configs[n].use_dora]
    if with_dora:
        raise ConfigError(f"adapter {with_dora[0]!r} is a DoRA adapter; combine works on plain LoRA adapters only "
                          "(a DoRA update is not the low-rank product s·BA)")
    with_saved = [n for n in weights if configs[n].modules_to_save]
    if with_saved:
        raise ConfigError(f"adapter {with_saved[0]!r} has modules_to_save; combine works on LoRA layers only")
    with_bias = [n for n in weights if configs[n].lora_bias or configs[n].use_bdlora]
    if with_bias:
        raise ConfigError(f"adapter {with_bias[0]!r} has a lora_bias or block-diagonal factors (BD-LoRA); combine works on plain low-rank factors only")

    gen = torch.Generator().manual_seed(seed)
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    energy: dict[str, float] = {}
    for qualified, layer in lora_layers(model):
        if any(n in layer.lora_A for n in weights) and isinstance(layer, (LoraMultiheadAttention, LoraParameter)):
            raise ConfigError(f"layer {qualified!r} is a {type(layer).__name__}; combine works on plain B·A updates only")
        if any(n in layer.lora_A and layer.lora_B[n].shape[1] != layer.lora_A[n].shape[0] for n in weights):
            raise ConfigError(f"layer {qualified!r} is a grouped convolution; combine works on plain B·A updates only")
        inputs = [(layer.lora_A[n].detach(), layer.lora_B[n].detach(), float(w) * layer.scaling[n])
                  for n, w in weights.items() if n in layer.lora_A]
        if not inputs:
            continue
        if method == "linear":
            ranks = {A.shape[0] for A, _, _ in inputs}
            if len(ranks) > 1:
                raise ConfigError(
                    f"method 'linear' needs equal ranks, but layer {qualified!r} has ranks {sorted(ranks)}; use 'cat' "
                    "(exact) or 'svd'"
                )
            A_new = sum(math.sqrt(abs(c)) * A.float() for A, _, c in inputs)
            B_new = sum(math.copysign(math.sqrt(abs(c)), c) * B.float() for _, B, c in inputs)
        elif method == "cat":
            A_new = torch.cat([math.sqrt(abs(c)) * A.float() for A, _, c in inputs])
            B_new = torch.cat([math.copysign(math.sqrt(abs(c)), c) * B.float() for _, B, c in inputs], dim=1)
        else:
            target = rank or max(A.shape[0] for A, _, _ in inputs)
            if method == "svd":
                U, S, Vh = _svd_of_factors(inputs)
            else:
                dense = _ties(inputs, density) if method == "ties" else _dare(inputs, density, gen)
                U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            B_new, A_new, energy[qualified] = _truncate(U, S, Vh, target)
        factors[qualified] = (A_new, B_new)

    layer_ranks = {q: A.shape[0] for q, (A, _) in factors.items()}
    first = next(iter(weights))
    common = max(set(layer_ranks.values()), key=list(layer_ranks.values()).count)
    exact = {re.escape(q): r for q, r in layer_ranks.items() if r != common}
    config = LoraConfig(
        r=common, alpha=float(common), dropout=configs[first].dropout, target_modules=tuple(layer_ranks),
        init=configs[first].init, rank_pattern=exact, alpha_pattern={k: float(r) for k, r in exact.items()},
        base_model_name_or_path=configs[first].base_model_name_or_path, task_type=configs[first].task_type,
    )  # scale α / r = 1 in every layer
    inject(model, config, name)
    with torch.no_grad():
        for qualified, layer in lora_layers(model):
            if qualified in factors:
                A_new, B_new = factors[qualified]
                layer.lora_A[name].copy_(A_new)
                layer.lora_B[name].copy_(B_new)
    return CombineReport(name=name, method=method, ranks=layer_ranks, discarded_energy=energy)


def _svd_of_factors(inputs: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of Σ c_i B_i A_i = B_cat A_cat from the factors: B_cat = Q_b R_b, A_catᵀ = Q_a R_a, so
    ΔW = Q_b (R_b R_aᵀ) Q_aᵀ and only the small core needs an SVD."""
    dtype = torch.float64
    A_cat = torch.cat([A.to(dtype) for A, _, _ in inputs])  # (Σr, k)
    B_cat = torch.cat([c * B.to(dtype) for _, B, c in inputs], dim=1)  # (d, Σr)
    Qb, Rb = torch.linalg.qr(B_cat)
    Qa, Ra = torch.linalg.qr(A_cat.t())
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.t())
    return Qb @ Uc, S, Vch @ Qa.t()


def _task_vectors(inputs: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """B_i A_i stacked (n, d, k) and c_i = w_i s_i as (n, 1, 1)."""
    # B_i A_i and c_i = w_i s_i: trimming is per task vector, so its scale does not matter there,
    # and c_i · B_i A_i = w_i τ_i is what the sign election and the sums see
    taus = torch.stack([B.double() @ A.double() for A, B, _ in inputs])
    return taus, torch.tensor([c for _, _, c in inputs], dtype=torch.float64, device=taus.device).view(-1, 1, 1)


def _ties(inputs: list[tuple[Tensor, Tensor, float]], density: float) -> Tensor:
    taus, c = _task_vectors(inputs)  # Σ c_i (B_i A_i) = Σ w_i τ_i
    n, d, k = taus.shape
    keep = max(1, int(round(density * d * k)))
    flat = taus.reshape(n, -1).abs()
    threshold = flat.kthvalue(d * k - keep + 1, dim=1).values.view(n, 1, 1)  # the keep-th largest |τ_i|
    trimmed = torch.where(taus.abs() >= threshold, taus, torch.zeros_like(taus)) * c  # w_i · trim(τ_i)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    count = agree.sum(0).clamp_min(1)
    return total / count


def _dare(inputs: list[tuple[Tensor, Tensor, float]], density: float, gen: torch.Generator) -> Tensor:
    taus, c = _task_vectors(inputs)
    kept = (torch.rand(taus.shape, generator=gen, dtype=torch.float64) < density).to(taus.device)
    return (taus * kept / density * c).sum(0)


def _truncate(U: Tensor, S: Tensor, Vh: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """B = U_r √S_r, A = √S_r V_rᵀ and the discarded fraction of Σσ²."""
    total = float((S**2).sum())
    r = min(rank, S.numel())
    discarded = float((S[r:] ** 2).sum()) / total if total > 0 else 0.0
    root = S[:r].sqrt()
    B = (U[:, :r] * root).float()
    A = (root[:, None] * Vh[:r]).float()
    if r < rank:  # fewer singular values than the rank asked for: pad with zeros to keep the rank
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])])
    return B, A, discarded


__all__ = ["CombineReport", "combine"]
