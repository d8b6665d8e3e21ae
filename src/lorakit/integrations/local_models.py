"""Loading local transformers checkpoints — nothing is ever downloaded (``lorakit train`` and ``lorakit merge``
both load their models here).

A name like ``meta-llama/Llama-3.2-1B`` that is not a directory here fails at once with the command
that would fetch it elsewhere, instead of a long transformers traceback about the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError


class ModelError(LorakitError, OSError):
    """A --model path is not a loadable local transformers checkpoint."""


def model_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a checkpoint directory (it must hold config.json); raises ModelError with a hint otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"{p} has no config.json, so it is not a transformers checkpoint; pass the directory that "
                "model.save_pretrained() / huggingface-cli download wrote"
            )
        return p
    if p.exists():
        raise ModelError(f"{p} is a file; --model takes a checkpoint directory (with config.json)")
    looks_hub = "/" in str(path) and not str(path).startswith((".", "/", "~")) and str(path).count("/") == 1
    hint = (
        f"; it looks like a Hugging Face Hub name, and lorakit never downloads: fetch it where there is network "
        f"with `huggingface-cli download {path} --local-dir ./{Path(str(path)).name}` and pass --model ./{Path(str(path)).name}"
        if looks_hub
        else "; check the path"
    )
    raise ModelError(f"model directory {path!s} does not exist{hint}")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The checkpoint's tokenizer, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    d = model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"{d}: cannot load a tokenizer ({err}); save one beside the model with tokenizer.save_pretrained()"
        ) from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ModelError(f"{d}: the tokenizer has neither a pad nor an eos token; add a pad token to it")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | os.PathLike[str], auto_class: str, *, seed: int = 0, dtype: str | None = "auto",
               **kwargs: Any) -> torch.nn.Module:
    """``transformers.<auto_class>.from_pretrained(path, local_files_only=True, dtype=dtype, **kwargs)``;
    ``dtype`` "auto" is the checkpoint's own (the trainer decides what to keep it in:
    lorakit.train.compute), so a bfloat16 checkpoint is never held in float32 on its way to the GPU.

    The global torch generator is seeded first, so weights the checkpoint lacks (a fresh
    classification head) are the same in every run with this seed — which exact resume relies on.
    """
    import transformers

    d = model_dir(path)
    torch.manual_seed(seed)
    try:
        return getattr(transformers, auto_class).from_pretrained(str(d), local_files_only=True, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"{d}: transformers cannot load it as {auto_class} ({err}); is this the right --task for this model?"
        ) from None


@dataclass(frozen=True)
class QuantizedLoad:
    """Where and how ``lorakit train --quantize`` wants its base: the quantisation, the training device,
    and whether ``--bf16`` asks for a bfloat16 base (lorakit.train.compute.base_dtype decides with it)."""

    quant_type: str
    device: torch.device
    bf16: bool = False


#: from_pretrained's options that are about loading, not the config
_LOAD_ONLY = ("ignore_mismatched_sizes",)


def load_quantized(path: str | os.PathLike[str], auto_class: str, target: QuantizedLoad, *, seed: int = 0,
                   dtype: str | None = "auto", keep: tuple[str, ...] = (), **kwargs: Any) -> tuple[torch.nn.Module, str]:
    """The model of :func:`load_model` (``dtype`` "auto": the checkpoint's; None: torch's default), its
    linears already quantised on ``target.device``, and a note saying how it was loaded.

    A checkpoint of safetensors shards is streamed: the model is built on the meta device, and
    :func:`lorakit.quantize_checkpoint` reads it tensor by tensor, quantising each linear on the device,
    so the full-precision model is never whole in memory (host or device).  The frozen base takes the
    dtype lorakit.train.compute.base_dtype gives it, as a loaded model would.  Top-level modules named in
    ``keep`` (a classification head) stay full precision; those the checkpoint lacks, or has in another
    shape, are initialised as transformers does (seeded).  Anything else — no safetensors file, a
    parameter under another name than the model's — is loaded whole with :func:`load_model` and left
    for the caller to quantise, and the note says why.
    """
    import transformers
    from safetensors import safe_open

    from ..quant import (
        QUANT_TYPES,
        QuantizationError,
        empty_weights,
        quantize_checkpoint,
        safetensors_files,
        tied_parameters,
    )
    from ..train.compute import base_dtype, cast_base

    if target.quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type {target.quant_type!r} is not supported; use one of {QUANT_TYPES}")
    d = model_dir(path)
    try:
        files = safetensors_files(d)
    except QuantizationError:
        files = []

    def whole(why: str) -> tuple[torch.nn.Module, str]:
        model = load_model(d, auto_class, seed=seed, dtype=dtype, **kwargs)
        return model, f"loaded whole, then quantised ({why})"

    if not files:
        return whole("no .safetensors files to stream")
    shapes: dict[str, tuple[list[int], str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = (list(sl.get_shape()), sl.get_dtype())
    config_kwargs = {k: v for k, v in kwargs.items() if k not in _LOAD_ONLY}
    try:
        config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True, **config_kwargs)
        chosen: Any = torch.get_default_dtype()  # what from_pretrained(dtype=None) gives; from_config would take config's
        if dtype == "auto":
            chosen = getattr(config, "dtype", None) or next(
                (getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[t])
                 for _, t in shapes.values() if t in ("BF16", "F16", "F32", "F64")), chosen)
        torch.manual_seed(seed)
        with empty_weights():
            model = getattr(transformers, auto_class).from_config(config, dtype=chosen)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"{d}: transformers cannot build it as {auto_class} ({err}); is this the right --task for this model?"
        ) from None
    prefix = getattr(model, "base_model_prefix", "")
    wanted = dict(model.named_parameters())

    def key_map(key: str) -> str | None:
        """Checkpoint key → model name: a headed checkpoint feeds a bare model and the other way round."""
        if key.startswith(prefix + ".") and not hasattr(model, prefix):
            return key[len(prefix) + 1:]
        if prefix and hasattr(model, prefix) and not key.startswith(prefix + ".") and prefix + "." + key in wanted:
            return prefix + "." + key
        return key

    found = {key_map(k): (k, s) for k, (s, _) in shapes.items()}
    tied = tied_parameters(model)
    heads = tuple(h for h in keep if isinstance(getattr(model, h, None), torch.nn.Module))
    fresh, mismatched = set(), set()
    for name, p in wanted.items():
        if name in found and list(p.shape) == found[name][1]:
            continue
        if name.split(".")[0] not in heads:
            if name in tied:
                continue
            return whole(f"{name} is not in the checkpoint under that name or shape")
        fresh.add(name.split(".")[0])
        if name in found:
            mismatched.add(found[name][0])
    kept_dtype = base_dtype(model, target.device, target.bf16)
    cast_base(model, kept_dtype)
    torch.manual_seed(seed)
    for head in sorted(fresh):  # a head the checkpoint lacks: made on the device and initialised as transformers does
        module = model.get_submodule(head).to_empty(device=target.device)
        for m in module.modules():
            model._init_weights(m)
    quantize_checkpoint(model, files, device=target.device, dtype="model", keep=heads,
                        key_map=lambda k: None if k in mismatched else key_map(k))
    what = f"streamed from {len(files)} safetensors file(s), one tensor at a time"
    return model, what + (f"; {', '.join(sorted(fresh))} freshly initialised" if fresh else "")

