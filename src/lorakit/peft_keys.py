"""PEFT's tensor keys and shapes: the one table that saving, loading and the shape checks all use.

An adapter file keys each tensor by its module's path in the model, under PEFT's prefix:

    base_model.model.<module path>.lora_A.weight        (r, k)       linear, Conv1D
    base_model.model.<module path>.lora_B.weight        (d, r)
    base_model.model.<module path>.lora_embedding_A     (r, num_embeddings)
    base_model.model.<module path>.lora_embedding_B     (dim, r)
    base_model.model.<module path>.lora_A.weight        (r, in, *kernel)  Conv1d/2d/3d; B: (d, r/groups, 1, ...)
    base_model.model.<module path>.lora_B.bias          (d,)         lora_bias
    base_model.model.<module path>.lora_magnitude_vector  (d,)  DoRA's m ((1, d, 1, ...) for convolutions)
    base_model.model.<module path>.base_layer.out_proj.lora_A.weight / lora_B.weight  MultiheadAttention's out_proj
    base_model.model.<module path>.token_adapter.trainable_tokens_delta  (n, dim)  trainable tokens
    base_model.model.<module path>.<param>              modules_to_save
    base_model.model.<module path>.lora_velora_embed    (⌈k / num_groups⌉,)  VeLoRA's projection (training only)
    base_model.model.<module path>.lora_monteclora_sampler.<name>  MonteCLoRA's sampler state (training only)
"""

from __future__ import annotations

import re

from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraMultiheadAttention

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m
BIAS = "lora_B.bias"  # lora_bias
TOKENS = "token_adapter.trainable_tokens_delta"  # PEFT's trainable tokens: (n, dim), the rows' new values
# PEFT wraps nn.MultiheadAttention's out_proj inside the attention's base layer.
MHA_OUT = ("base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight")

# PEFT's LoRA keys; in-memory PEFT state dicts also carry the adapter name ("...lora_A.default.weight").
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))?$"
)


def split_lora_key(key: str) -> tuple[str, str, str | None] | None:
    """(module path, kind, adapter name or None) of a PEFT LoRA tensor key, where kind is "lora_A",
    "lora_B", "lora_embedding_A", "lora_embedding_B" or "lora_magnitude_vector" (DoRA); None for any
    other key (modules_to_save, a lora_B bias)."""
    if key.endswith(".bias"):
        return None
    match = _LORA_KEY.match(key.removesuffix(".weight"))
    return (match["module"], match["kind"], match["adapter"]) if match else None


def factor_keys(module: LoraLayer) -> tuple[str, str]:
    """The keys of A and B, relative to the module's path."""
    return ("lora_embedding_A", "lora_embedding_B") if isinstance(module, LoraEmbedding) else ("lora_A.weight", "lora_B.weight")


def factor_shapes(module: LoraLayer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT's shapes of A and B at rank r for this layer."""
    k, d = module.in_features, module.out_features
    if isinstance(module, LoraConv):
        a_kernel, b_kernel = module.lora_shapes()
        return (r, *a_kernel), (d, r // module.base_layer.groups, *b_kernel)
    return (r, k), (d, r)


def magnitude_shape(module: LoraLayer) -> tuple[int, ...]:
    """PEFT's shape of DoRA's magnitude vector: (d,), or (1, d, 1, ...) for a convolution."""
    if isinstance(module, LoraConv):
        return (1, module.out_features, *module.lora_shapes()[1])
    return (module.out_features,)


def training_variant_shapes(variant: str, size: int, module: LoraLayer, r: int) -> dict[str, tuple[int, ...]]:
    """The tensors PEFT saves beside A and B for a training-only variant (see ``config.TRAINING_ONLY_VARIANTS``),
    key relative to the module's path → shape, on a linear layer (the only kind PEFT gives these variants) of rank r.

    ``variant`` "velora_config" (``size`` = num_groups): the projection VeLoRA compresses A's saved input with,
    one vector of ⌈k / num_groups⌉ entries that every group of input features is projected onto.  "monteclora_config" (``size`` = num_samples): the
    MontecloraSampler's parameters and buffers, over the r rows of A and the num_samples samples.
    """
    if variant == "velora_config":
        return {"lora_velora_embed": (-(-module.in_features // size),)}
    if variant == "monteclora_config":
        sampler = "lora_monteclora_sampler."
        return {sampler + "std_prior": (r,), sampler + "gaussian_var_prior": (r, r),
                sampler + "expert_weights_prior": (size,), sampler + "expert_weights": (size,)}
    raise ValueError(f"no training-only LoRA variant {variant!r}")


def layer_keys(module: LoraLayer, *, dora: bool, bias: bool) -> dict[str, str]:
    """Key relative to the module's path → the part of the layer's adapter it holds: "A", "B", "magnitude"
    (DoRA), "bias" (lora_bias), "out_A", "out_B" (MultiheadAttention's out_proj)."""
    a, b = factor_keys(module)
    keys = {a: "A", b: "B"}
    if dora:
        keys[MAGNITUDE] = "magnitude"
    if bias:
        keys[BIAS] = "bias"
    if isinstance(module, LoraMultiheadAttention):
        keys[MHA_OUT[0]], keys[MHA_OUT[1]] = "out_A", "out_B"
    return keys


__all__ = ["BIAS", "MAGNITUDE", "MHA_OUT", "PREFIX", "TOKENS", "factor_keys", "factor_shapes", "layer_keys",
           "magnitude_shape", "split_lora_key", "training_variant_shapes"]
