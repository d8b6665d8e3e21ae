"""``lorakit merge BASE ADAPTER OUT``: fold an adapter into its base model and save a plain transformers model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LorakitError

EPILOG = """\
example:
  lorakit merge ./llama-1b runs/chat/adapter ./llama-1b-chat
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('./llama-1b-chat')"

The merged weights are W' = W + s·BA for every adapted module; modules_to_save (e.g. a classifier head)
take the adapter's trained copy.  The tokenizer is copied from BASE when it has one.
An adapter trained with --quantize nf4 (QLoRA) merges onto the full-precision BASE it was quantised from:
its fingerprint is that base's.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="merge an adapter into its base model (a plain transformers model dir)",
        description="Merge a LoRA adapter into a local transformers checkpoint and save the result.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="the base model directory the adapter was trained on")
    p.add_argument("adapter", metavar="ADAPTER",
                   help="adapter directory (adapter_config.json + adapter_model.safetensors), or a lorakit train --out dir")
    p.add_argument("out", metavar="OUT", help="where to write the merged model")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="merge even if BASE differs from the model the adapter was trained on")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(func=run)
    return p


# The adapter's task_type (PEFT's names) says which head it was trained with; it wins over BASE's
# architecture, so a classifier trained on a causal-LM checkpoint merges into a classifier.
_AUTO_FOR_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _model_class(base: Path, adapter: Path) -> tuple[Any, dict[str, Any]]:
    """The transformers class to load BASE with, and kwargs that make its head fit the adapter's."""
    import transformers

    from ..io import read_adapter

    saved = read_adapter(adapter)
    arch = (json.loads((base / "config.json").read_text()).get("architectures") or [None])[0]
    auto = _AUTO_FOR_TASK.get(str(saved.raw_config.get("task_type")))
    cls = getattr(transformers, auto or arch or "AutoModel", None) or transformers.AutoModel
    kwargs: dict[str, Any] = {}
    if auto == "AutoModelForSequenceClassification" or auto is None and str(arch).endswith("ForSequenceClassification"):
        for key, t in saved.tensors.items():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                kwargs.update(num_labels=t.shape[0], ignore_mismatched_sizes=True)
        metrics = adapter.parent / "metrics.json"  # lorakit train writes the label names there
        labels = json.loads(metrics.read_text()).get("labels") if metrics.is_file() else None
        if labels and len(labels) == kwargs.get("num_labels"):
            kwargs["id2label"] = {i: str(label) for i, label in enumerate(labels)}
            kwargs["label2id"] = {str(label): i for i, label in enumerate(labels)}
    return cls, kwargs


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    import lorakit

    from ..integrations.local_models import load_tokenizer, model_dir
    from .inspect import adapter_dir

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # a head missing from BASE is expected: the adapter brings it
    base, adapter, out = model_dir(args.base), adapter_dir(args.adapter), Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another OUT or pass --overwrite")
    cls, kwargs = _model_class(base, adapter)
    model = cls.from_pretrained(str(base), local_files_only=True, dtype=torch.float32, **kwargs)
    saved_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    lorakit.load_adapter(model, adapter, allow_base_mismatch=args.allow_base_mismatch)
    merged = lorakit.merge_and_unload(model)
    if isinstance(saved_dtype, torch.dtype) and saved_dtype != torch.float32:
        merged = merged.to(saved_dtype)  # merged in float32, saved in the base's own precision
    try:
        tokenizer = load_tokenizer(base)
    except LorakitError:
        tokenizer = None
        print(f"note: {base} has no tokenizer to copy", file=sys.stderr)
    if tokenizer is not None and getattr(merged.config, "pad_token_id", 0) is None:
        merged.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last token with it
    merged.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    print(f"merged model written to {out}; load it with transformers.{type(merged).__name__}.from_pretrained({str(out)!r})")
    return 0
