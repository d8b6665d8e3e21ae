"""The compute: tensor functions with their autograd, no nn.Module, no model knowledge."""

from .dropout import dropped_positions
from .lora_linear import lora_linear

__all__ = ["dropped_positions", "lora_linear"]
