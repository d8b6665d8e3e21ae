"""A cheap fingerprint of the base weights an adapter was trained on.

Stored in the adapter file's metadata so that loading onto a different base model is caught.  It
records each targeted module's name and weight shape, plus a checksum of a strided sample of every
targeted weight.  The sample is rounded to bfloat16 before summing, so the same base loaded in
float32 or bfloat16 — or on another device — gives the same checksum.  A float16 copy is a different
rounding of the weights (float32 → float16 → bfloat16 differs from float32 → bfloat16 for about one
value in sixteen), so it reads as other values; ``load_adapter(..., allow_base_mismatch=True)``
accepts it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

_SAMPLES = 512


def weight_checksum(weight: Tensor) -> str:
    """Checksum of up to 512 evenly spaced elements of ``weight`` (the same for float32 and bfloat16, on any device)."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    sample = flat[::step][:_SAMPLES].to("cpu", torch.bfloat16).to(torch.float64)
    return f"{float(sample.sum()):.6e}/{float(sample.abs().sum()):.6e}"


class WeightSample(NamedTuple):
    """A weight's shape and :func:`weight_checksum`, when the weight itself is not at hand (a 4-bit base
    records the checksum of the full-precision weight it was quantised from)."""

    shape: tuple[int, ...]
    checksum: str


def fingerprint(weights: Mapping[str, Tensor | WeightSample]) -> dict[str, object]:
    """{"modules": {name: shape}, "checksum": hex digest} for the given base weights."""
    names = sorted(weights)
    samples = {n: w if isinstance(w, WeightSample) else WeightSample(tuple(w.shape), weight_checksum(w))
               for n, w in weights.items()}
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{tuple(samples[name].shape)}:{samples[name].checksum};".encode())
    return {"modules": {n: list(samples[n].shape) for n in names}, "checksum": digest.hexdigest()[:16]}


def describe_mismatch(saved: Mapping[str, object], current: Mapping[str, object]) -> str | None:
    """None when the fingerprints agree; otherwise one sentence saying how they differ."""
    saved_modules, current_modules = dict(saved.get("modules", {})), dict(current.get("modules", {}))
    missing = sorted(set(saved_modules) - set(current_modules))
    if missing:
        return f"the base model has no module {missing[0]!r} (and {len(missing) - 1} more) that the adapter was trained on"
    for name, shape in saved_modules.items():
        if list(current_modules[name]) != list(shape):
            return f"module {name!r} has weight shape {tuple(current_modules[name])}, the adapter's base had {tuple(shape)}"
    if saved.get("checksum") != current.get("checksum"):
        return "the targeted weights have the same names and shapes but different values (another checkpoint?)"
    return None


def dumps(fp: Mapping[str, object]) -> str:
    return json.dumps(fp, separators=(",", ":"), sort_keys=True)
