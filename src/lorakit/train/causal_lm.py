"""``--task causal-lm``: next-token prediction on the user's JSONL, with loss only where it belongs.

Each line is one of
    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion tokens only
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}
                                                      rendered with the tokenizer's chat template (a plain
                                                      "role: content" layout when it has none); loss on
                                                      the last (assistant) message only
Labels of tokens without loss are -100, which transformers' loss ignores.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ..integrations.local_models import QuantizedLoad, load_model, load_quantized, load_tokenizer
from .data import BadLine, file_fingerprint, load_train_eval, require
from .task import TaskDefaults

IGNORE = -100
EXAMPLE = '{"prompt": "Translate to French: cat", "completion": " chat"}'
DEFAULTS = TaskDefaults(r=8, alpha=16.0, dropout=0.05, lr=2e-4, batch_size=8, max_length=512, epochs=1, warmup=0.05,
                        schedule="cosine", targets="all-linear")


class CausalLMTask:
    """Fine-tune a causal language model (``AutoModelForCausalLM``) on JSONL text."""

    name = "causal-lm"
    default_targets: tuple[str, ...] | str = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    #: what ``lorakit train --task causal-lm`` uses for the options not given
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
        eval_batch_size: int = 16,
        quantize: QuantizedLoad | None = None,
    ) -> None:
        """``quantize``: build the model with its linears already quantised on the training device,
        streamed from the checkpoint (:func:`~lorakit.integrations.local_models.load_quantized`)."""
        self.tokenizer = load_tokenizer(model)
        self.max_length, self.eval_batch_size = max_length, eval_batch_size
        self.data_paths = (data, eval_data)
        split = load_train_eval(data, eval_data, self._example, example_hint=EXAMPLE, skip_bad_lines=skip_bad_lines,
                                seed=seed, eval_fraction=eval_fraction)
        self.skipped, self.train_examples, self.eval_examples = split.skipped, split.train, split.eval
        # after the data: bad data fails fast
        if quantize is None:
            self.model = load_model(model, "AutoModelForCausalLM", seed=seed)
        else:
            self.model, self.load_note = load_quantized(model, "AutoModelForCausalLM", quantize, seed=seed)

    # -- data ----------------------------------------------------------------------------------
    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _render_chat(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """(prefix up to the last assistant message, whole conversation) as text."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            prefix = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages, tokenize=False)
            if full.startswith(prefix):
                return prefix, full
        plain = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
        return plain, plain + messages[-1]["content"]

    def _example(self, obj: dict[str, Any]) -> dict[str, list[int]]:
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if "messages" in obj:
            messages = require(obj, "messages", list)
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise BadLine("each message must be an object with string 'role' and 'content'",
                                  'write messages like {"role": "user", "content": "hi"}')
            if messages[-1]["role"] != "assistant":
                raise BadLine("the last message is not from the assistant, so there is nothing to learn",
                              "end each conversation with an {\"role\": \"assistant\", ...} message")
            prefix, full = self._render_chat(messages)
            # the chat template already holds the special tokens
            prompt_ids, ids = self._ids(prefix, False), self._ids(full, False) + eos
            n_prompt = len(prompt_ids)
        elif "prompt" in obj or "completion" in obj:
            prompt_ids = self._ids(require(obj, "prompt"), True)
            ids = prompt_ids + self._ids(require(obj, "completion"), False) + eos
            n_prompt = len(prompt_ids)
        elif "text" in obj:
            ids, n_prompt = self._ids(require(obj, "text"), True) + eos, 0
        else:
            raise BadLine(f"no 'text', 'prompt'/'completion' or 'messages' field (fields: {', '.join(sorted(obj)) or 'none'})",
                          f"write e.g. {EXAMPLE} or {{\"text\": \"...\"}}")
        ids = ids[: self.max_length]
        labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if sum(1 for x in labels[1:] if x != IGNORE) == 0:
            raise BadLine(f"no tokens to learn from after truncation to --max-length {self.max_length}",
                          "shorten the prompt or raise --max-length")
        return {"input_ids": ids, "labels": labels}

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example: input_ids, attention_mask, labels: (B, T)."""
        width = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # -- loss and evaluation ---------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the label tokens of the batch."""
        return model(**batch).loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out token-weighted loss and perplexity = exp(loss)."""
        if not self.eval_examples:
            return {}
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(self.eval_examples), self.eval_batch_size):
            batch = {k: v.to(device) for k, v in self.collate(self.eval_examples[i : i + self.eval_batch_size]).items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # transformers shifts labels by one
            total += float(model(**batch).loss) * n
            count += n
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def fingerprint(self) -> str:
        return f"{file_fingerprint(*self.data_paths)}/len{self.max_length}"
