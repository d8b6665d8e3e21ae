"""Loading local transformers checkpoints — nothing is ever downloaded (``lorakit train`` and ``lorakit merge``
both load their models here).

A name like ``meta-llama/Llama-3.2-1B`` that is not a directory here fails at once with the command
that would fetch it elsewhere, instead of a long transformers traceback about the network.
"""

from __future__ import annotations

import os
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


def load_model(path: str | os.PathLike[str], auto_class: str, *, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """``transformers.<auto_class>.from_pretrained(path, local_files_only=True, **kwargs)`` in the
    checkpoint's own dtype (the trainer decides what to keep it in: lorakit.train.compute), so a
    bfloat16 checkpoint is never held in float32 on its way to the GPU.

    The global torch generator is seeded first, so weights the checkpoint lacks (a fresh
    classification head) are the same in every run with this seed — which exact resume relies on.
    """
    import transformers

    d = model_dir(path)
    torch.manual_seed(seed)
    try:
        return getattr(transformers, auto_class).from_pretrained(str(d), local_files_only=True, dtype="auto", **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"{d}: transformers cannot load it as {auto_class} ({err}); is this the right --task for this model?"
        ) from None
