"""The compute: tensor functions with their autograd, no nn.Module, no model knowledge."""

from .dora import dora_linear, dora_weight_norm
from .dropout import dropped_positions
from .lora_linear import lora_linear
from .segment_plan import SegmentPlan, plan_segments
from .segmented import segmented_lora, segmented_lora_embedding

__all__ = ["SegmentPlan", "dora_linear", "dora_weight_norm", "dropped_positions", "lora_linear", "plan_segments", "segmented_lora", "segmented_lora_embedding"]
