"""GPU smoke run of `lorakit train`: a tiny random Llama, causal-lm, --bf16, on CUDA.

    PYTHONPATH=src python3 benchmarks/gpu_smoke_train.py

Proves the training CLI's GPU path (bf16 autocast, CUDA RNG state in checkpoints, the tokens/s and
peak-memory summary line, resume) on a machine with a GPU; CI has none.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lorakit.cli import main as lorakit_main

    root = Path(tempfile.mkdtemp(prefix="lorakit-gpu-smoke-"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}, " ": 29}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": "abc " * (i % 5 + 1), "completion": "xyz"}) + "\n")
    common = ["train", "--task", "causal-lm", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
              "--batch-size", "8", "--bf16", "--save-every", "3"]
    rc = lorakit_main([*common, "--max-steps", "3", "--out", str(root / "out")])
    rc = rc or lorakit_main([*common, "--max-steps", "6", "--resume", "--out", str(root / "out")])
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    print("steps", metrics["steps"], "tokens/s", metrics.get("tokens_per_s"), "device", torch.cuda.get_device_name())
    out = os.environ.get("OUT")
    if out:
        (Path(out) / "gpu_smoke_metrics.json").write_text(json.dumps(metrics, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
