"""Base-model weights W for the adapted modules, read straight from a model directory's safetensors
files (no transformers needed): ``model.safetensors`` or the shards named by
``model.safetensors.index.json``. Only the tensors asked for are read.

Adapter module paths and checkpoint keys differ by a prefix now and then (GPT-2's module
"transformer.h.0.attn.c_attn" is stored as "h.0.attn.c_attn.weight"; a bare-encoder checkpoint
lacks a task model's "bert." prefix), so a module is found by the longest dotted suffix of its path
that names a checkpoint key, or by a unique key ending in the full path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .factors import AnalysisError, LoraFactors


class BaseWeights:
    """Lazy access to a model directory's weights, as (d, k) matrices matching ΔW's layout."""

    def __init__(self, model_dir: str | Path, *, fan_in_fan_out: bool = False) -> None:
        from safetensors import safe_open

        self.path = Path(model_dir)
        self.fan_in_fan_out = fan_in_fan_out
        if not self.path.is_dir():
            raise AnalysisError(f"--base {self.path}: not a directory; pass the base model's directory (with *.safetensors)")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise AnalysisError(f"--base {self.path}: no *.safetensors files; convert the checkpoint to safetensors "
                                "(e.g. model.save_pretrained(dir, safe_serialization=True))")
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self._file_of = {key: f for f, h in self._handles.items() for key in h.keys()}

    def key_for(self, module: str) -> str | None:
        """The checkpoint key of this module's weight, or None."""
        parts = module.split(".")
        for start in range(len(parts)):
            key = ".".join(parts[start:]) + ".weight"
            if key in self._file_of:
                return key
        ending = "." + module + ".weight"
        hits = [k for k in self._file_of if k.endswith(ending)]
        return hits[0] if len(hits) == 1 else None

    def weight(self, factors: LoraFactors) -> torch.Tensor:
        """W of this module as a (d, k) float32 matrix, in the layout of ΔW = s·BA."""
        key = self.key_for(factors.name)
        if key is None:
            raise AnalysisError(f"--base {self.path}: no weight for adapted module {factors.name} "
                                f"(looked for '{factors.name}.weight' and dotted suffixes of it); is this the adapter's base model?")
        W = self._handles[self._file_of[key]].get_tensor(key).to(torch.float32)
        d, k = factors.shape
        if factors.kind == "embedding":
            W = W.T  # stored (num_embeddings, dim); the update is (BA)ᵀ, so compare as (dim, num_embeddings)
        elif W.dim() > 2:
            W = W.reshape(W.shape[0], -1)  # conv: (out, in, kh, kw) → (out, in·kh·kw)
        elif self.fan_in_fan_out or (tuple(W.shape) == (k, d) and d != k):
            W = W.T  # HF Conv1D stores (in, out)
        if tuple(W.shape) != (d, k):
            raise AnalysisError(f"--base {self.path}: {key} has shape {tuple(W.shape)} but the adapter's update for "
                                f"{factors.name} is {d}×{k}; the adapter was trained on a different model")
        return W
