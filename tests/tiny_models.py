"""Tiny randomly initialised transformers checkpoints (hidden 32, 2 layers) with a character tokenizer.

Shared by the training tests: everything is built offline in a temp dir in well under a second.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(kind: str):
    """A character-level fast tokenizer; ``kind`` "llama" adds <s>, "bert" wraps in [CLS] … [SEP]."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>",
                                       unk_token="<unk>")
    return fast


def make_llama(path: Path, *, chat_template: bool = False, max_shard_size: str | None = None) -> Path:
    """A 2-layer Llama causal LM (hidden 32) + tokenizer saved at ``path`` (in safetensors shards of at
    most ``max_shard_size``, e.g. "40KB" gives 3, when given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer("llama")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(path)
    return path


def with_renamed_weight(src: Path, dst: Path, old: str, new: str) -> Path:
    """``src``'s checkpoint (config, tokenizer, weights in one safetensors file) at ``dst`` with weight
    ``old`` stored under the name ``new``: one a loader cannot match by name."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    tensors = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    tensors[new] = tensors.pop(old)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def make_bert(path: Path, *, num_labels: int = 2) -> Path:
    """A 2-layer BERT sequence classifier (hidden 32) + tokenizer saved at ``path``."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = char_tokenizer("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, num_labels=num_labels,
                     pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class ToyTask:
    """A pure-torch regression task (no transformers): fast enough to train many times per test.

    y = sin(x·w) for 40 random x ∈ R^8; the model is Linear(8,16) → Tanh → Linear(16,1) with LoRA on both
    linears.  ``poison`` names example indices whose loss is NaN (to exercise non-finite skipping).
    """

    name = "toy"
    default_targets = ("0", "2")
    modules_to_save: tuple[str, ...] = ()
    tokenizer = None

    def __init__(self, n: int = 40, poison: frozenset[int] = frozenset(), poison_grad: bool = False) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.sin(self.x @ torch.randn(8, 1, generator=g))
        self.poison, self.poison_grad = poison, poison_grad
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.train_examples = list(range(n))

    def collate(self, examples: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(examples)
        bad = torch.tensor([float("nan") if i in self.poison else 0.0 for i in examples])
        return {"x": self.x[idx], "y": self.y[idx], "bad": bad}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(batch["x"])
        loss = ((out - batch["y"]) ** 2).mean() + batch["bad"].sum()
        if self.poison_grad:  # √(0·Σout): the value stays finite (0), its gradient is NaN
            loss = loss + (out.sum() * 0).sqrt()
        return loss

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {"mse": float(((model(self.x) - self.y) ** 2).mean())}

    def fingerprint(self) -> str:
        return f"toy{len(self.train_examples)}"


def train_toy(out: str, max_steps: int, *, resume: bool = False, **config):
    """Train ToyTask into ``out`` (used in-process and by the SIGKILL test's subprocess)."""
    import io

    import lorakit
    from lorakit.train.checkpoint import load_checkpoint
    from lorakit.train.config import TrainConfig
    from lorakit.train.trainer import Trainer

    task = ToyTask()
    lora = lorakit.LoraConfig(r=4, alpha=8, dropout=config.pop("dropout", 0.1), target_modules=task.default_targets)
    config = {"lr": 1e-2, "batch_size": 4, **config}
    trainer = Trainer(task, lora, TrainConfig(max_steps=max_steps, **config), out, log=io.StringIO(), device="cpu")
    return trainer.fit(load_checkpoint(out) if resume else None)


if __name__ == "__main__":  # the SIGKILL tests run: python tiny_models.py OUT STEPS SAVE_EVERY [resume]
    import sys

    train_toy(sys.argv[1], int(sys.argv[2]), save_every=int(sys.argv[3]), keep=2, resume=sys.argv[4:] == ["resume"])
