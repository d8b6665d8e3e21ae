"""What one decoder layer of the 1.14B Llama keeps for backward, per token, on a bf16 and on an NF4 base, counted on
the CPU: the bytes of every tensor autograd saves that is not one of the model's own parameters or buffers.

    python benchmarks/cpu_activation_bytes.py [--tokens 256]

One decoder layer of the GPU benchmarks' model (hidden 2048, MLP 8192, 16/8 heads), bf16, LoRA r = 16 on all 7
projections, forward with autograd recording; per token the count does not depend on the token count except
through attention (the CPU's math attention saves its (heads × tokens × tokens) probabilities, the same for
every variant).  Variants: each base with the layers one by one, and with ``share_inputs`` + ``fuse_mlps``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit


def saved_bytes_per_token(quantize: bool, fuse: bool, tokens: int) -> float:
    config = LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=8192, num_hidden_layers=1,
                         num_attention_heads=16, num_key_value_heads=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if quantize:
        lorakit.quantize_base(model, "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, target_modules="all-linear"))
    if fuse:
        lorakit.share_inputs(model)
        lorakit.fuse_mlps(model)
    own = {id(t) for t in [*model.parameters(), *model.buffers()]}
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(0 if id(t) in own else t.numel() * t.element_size())
        return t

    hidden = torch.randn(1, tokens, 2048, dtype=torch.bfloat16, requires_grad=True)
    position = model.model.rotary_emb(hidden, torch.arange(tokens)[None])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](hidden, position_embeddings=position, attention_mask=None)
    return sum(kept) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    for quantize in (False, True):
        for fuse in (False, True):
            kb = saved_bytes_per_token(quantize, fuse, args.tokens) / 1e3
            print(f"{'NF4' if quantize else 'bf16'} base, {'share_inputs + fuse_mlps' if fuse else 'layers one by one'}:"
                  f" {kb:.1f} KB saved per token and decoder layer")


if __name__ == "__main__":
    main()
