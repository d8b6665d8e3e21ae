"""lorakit: LoRA for any PyTorch module.

    h = W x + s · B (A x),   A: (r, k) random,  B: (d, r) zero,  s = α / r
"""

from .config import LoraConfig
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    AdapterNameError,
    ConfigError,
    LorakitError,
    MergeError,
    TargetError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "AdapterNameError",
    "ConfigError",
    "LoraConfig",
    "LorakitError",
    "MergeError",
    "TargetError",
    "UnsupportedModuleError",
    "__version__",
]
