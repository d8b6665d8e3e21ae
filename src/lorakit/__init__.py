"""lorakit: LoRA for any PyTorch module.

    h = W x + s · B (A x),   A: (r, k) random,  B: (d, r) zero,  s = α / r   (rsLoRA: α / √r)

Quick start::

    import lorakit
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    model = lorakit.inject(model, cfg)
    print(lorakit.trainable_parameters(model))
    ...train...
    lorakit.save_adapter(model, "out/adapter")     # PEFT / vLLM layout
"""

from . import fused_kernels
from .adapters import (
    ParameterCount,
    active_adapters,
    adapter_names,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unmerge,
)
from .combine import CombineReport, combine
from .layer_checkpointing import checkpointing
from .config import LoraConfig
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    AdapterNameError,
    ConfigError,
    LorakitError,
    LorakitWarning,
    MergeError,
    PlainLoraVariantWarning,
    TargetError,
    UnsupportedFeatureError,
    UnsupportedModuleError,
)
from .fused_mlp import fuse_mlps, unfuse_mlps
from .inject import inject, resolve_targets
from .io import load_adapter, read_adapter, save_adapter
from .layers import (
    LoraConv,
    LoraConv2d,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    LoraMultiheadAttention,
    LoraParameter,
)
from .mixed_batch import batch_adapters, hot_swap
from .modules_to_save import ModulesToSave, TrainableTokens
from .optim import lora_plus_param_groups
from .nf4_linear import NF4Linear
from .quant import QuantizationError, empty_weights, quantize_base, quantize_checkpoint
from .shared_input import share_inputs, unshare_inputs
from .version import __version__


def __getattr__(name: str):
    # ``lorakit.analysis`` is application code (spectra, plots, sweeps): loaded on first use, so that
    # ``import lorakit`` stays the library core.
    if name == "analysis":
        import importlib

        return importlib.import_module(".analysis", __name__)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "AdapterNameError",
    "CombineReport",
    "ConfigError",
    "LoraConfig",
    "LoraConv",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraParameter",
    "LorakitError",
    "LorakitWarning",
    "MergeError",
    "ModulesToSave",
    "TrainableTokens",
    "NF4Linear",
    "QuantizationError",
    "ParameterCount",
    "PlainLoraVariantWarning",
    "TargetError",
    "UnsupportedFeatureError",
    "UnsupportedModuleError",
    "__version__",
    "active_adapters",
    "adapter_names",
    "analysis",
    "batch_adapters",
    "checkpointing",
    "combine",
    "delete_adapter",
    "disable_adapters",
    "fuse_mlps",
    "fused_kernels",
    "hot_swap",
    "inject",
    "load_adapter",
    "lora_plus_param_groups",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "empty_weights",
    "quantize_base",
    "quantize_checkpoint",
    "read_adapter",
    "resolve_targets",
    "save_adapter",
    "set_adapter",
    "share_inputs",
    "trainable_parameters",
    "unfuse_mlps",
    "unmerge",
    "unshare_inputs",
]
