"""``--task classification``: text → label with a sequence-classification head.

Each line is ``{"text": "...", "label": "spam"}`` (labels may be strings or integers).  The label set
is what the training data contains; the head (``classifier`` / ``score``) is trained and saved whole
through ``modules_to_save`` while the encoder gets LoRA.  The held-out split keeps at least one
example of every label in training, and an --eval-data label never seen in training is an error
naming its line.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..integrations.local_models import ModelError, QuantizedLoad, load_model, load_quantized, load_tokenizer
from .data import DataError, Loaded, file_fingerprint, load_train_eval, require
from .task import TaskDefaults

EXAMPLE = '{"text": "free money, click now", "label": "spam"}'
DEFAULTS = TaskDefaults(r=8, alpha=16.0, dropout=0.1, lr=5e-4, batch_size=16, max_length=256, epochs=3, warmup=0.05,
                        schedule="cosine", targets="all-linear")
_HEADS = ("classifier", "score", "classification_head", "head")


def _example(obj: dict[str, Any]) -> tuple[str, str | int]:
    return require(obj, "text"), require(obj, "label", (str, int), fix='give a "label" (a string or an integer)')


class ClassificationTask:
    """Fine-tune ``AutoModelForSequenceClassification`` on JSONL text + label."""

    name = "classification"
    default_targets: tuple[str, ...] | str = "all-linear"
    #: what ``lorakit train --task classification`` uses for the options not given
    defaults = DEFAULTS

    def __init__(
        self,
        model: str | os.PathLike[str],
        data: str | os.PathLike[str],
        *,
        eval_data: str | os.PathLike[str] | None = None,
        max_length: int = DEFAULTS.max_length,
        skip_bad_lines: bool = False,
        seed: int = 0,
        eval_fraction: float = 0.1,
        eval_batch_size: int = 32,
        quantize: QuantizedLoad | None = None,
    ) -> None:
        """``quantize``: build the model with its linears (the head excepted) already quantised on the
        training device, streamed from the checkpoint (:func:`~lorakit.integrations.local_models.load_quantized`)."""
        self.max_length, self.eval_batch_size = max_length, eval_batch_size
        self.data_paths = (data, eval_data)
        split = load_train_eval(data, eval_data, _example, example_hint=EXAMPLE, skip_bad_lines=skip_bad_lines,
                                seed=seed, eval_fraction=eval_fraction, check_train=self._set_labels,
                                check_eval=self._check_eval_labels, group=lambda e: e[1])
        self.skipped = split.skipped
        index = {label: i for i, label in enumerate(self.labels)}
        self.train_examples = [(text, index[label]) for text, label in split.train]
        self.eval_examples = [(text, index[label]) for text, label in split.eval]
        self.tokenizer = load_tokenizer(model)
        id2label = {i: str(label) for i, label in enumerate(self.labels)}
        options = dict(num_labels=len(self.labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                       problem_type="single_label_classification", ignore_mismatched_sizes=True)
        if quantize is None:
            self.model = load_model(model, "AutoModelForSequenceClassification", seed=seed, **options)
        else:  # the head is trained whole (modules_to_save): it stays full precision
            self.model, self.load_note = load_quantized(model, "AutoModelForSequenceClassification", quantize,
                                                        seed=seed, keep=_HEADS, **options)
        if self.model.config.pad_token_id is None:  # decoder models find the last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        head = next((h for h in _HEADS if isinstance(getattr(self.model, h, None), nn.Module)), None)
        if head is None:
            raise ModelError(f"{type(self.model).__name__} has no classification head named one of {_HEADS}")
        self.modules_to_save: tuple[str, ...] = (head,)

    def _set_labels(self, loaded: Loaded) -> None:
        """The label set is what the training data holds; one label alone is an error."""
        self.labels = sorted({label for _, label in loaded.examples}, key=lambda x: (isinstance(x, str), str(x)))
        if len(self.labels) < 2:
            raise DataError(
                f"{loaded.path}: every example has label {self.labels[0]!r}; classification needs at least two labels"
            )

    def _check_eval_labels(self, loaded: Loaded, held: Loaded) -> None:
        for (_, label), line in zip(held.examples, held.lines):
            if label not in self.labels:
                raise DataError(
                    f"{held.path}:{line}: label {label!r} does not appear in the training data "
                    f"({loaded.path}; labels: {', '.join(map(str, self.labels))}); fix the label or add "
                    "training examples with it"
                )

    def info(self) -> dict[str, Any]:
        """Written into metrics.json: the label of each output index."""
        return {"labels": self.labels}

    def collate(self, examples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask: (B, T); labels: (B,)."""
        enc = self.tokenizer([t for t, _ in examples], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in examples], dtype=torch.long)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the head's logits."""
        return model(**batch).loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out accuracy and mean cross-entropy."""
        if not self.eval_examples:
            return {}
        device = next(model.parameters()).device
        correct, loss_sum = 0, 0.0
        for i in range(0, len(self.eval_examples), self.eval_batch_size):
            chunk = self.eval_examples[i : i + self.eval_batch_size]
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(out.loss) * len(chunk)
        n = len(self.eval_examples)
        return {"accuracy": correct / n, "loss": loss_sum / n}

    def fingerprint(self) -> str:
        return f"{file_fingerprint(*self.data_paths)}/len{self.max_length}"
