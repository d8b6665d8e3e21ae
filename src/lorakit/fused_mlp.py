"""Fusing SwiGLU MLPs (Llama, Mistral, Qwen2, …) so LoRA training keeps less: ``fuse_mlps``.

    MLP(x) = down_proj(silu(gate_proj(x)) ⊙ up_proj(x))

When ``down_proj`` is a LoRA layer its input h = silu(gate) ⊙ up must be kept for ∂L/∂A, on top of
what the frozen model's autograd keeps (gate, silu(gate), up).  A fused MLP computes the same
function through :func:`lorakit.ops.swiglu.swiglu_lora_down`, which keeps gate, up and an (N, r)
matrix and recomputes h in backward: two (N, intermediate) tensors fewer per layer
(docs/gpu-notes.md, "Memory: the fused SwiGLU down-projection").

Only the module *instance* changes (its ``forward`` attribute), never its class, and the fused
forward checks the LoRA state on every call: whenever ``down_proj`` is not in the simple state (one
active unmerged adapter, enabled, no forward hooks — a ``batch_adapters`` block adds one —, weight
stored (d, k), in full precision or 4 bits), it runs the original expression.  So merge / unmerge /
disable_adapters / set_adapter / batch_adapters keep working on a fused model.  Over a 4-bit (NF4) base the
fused op dequantises the down-projection where it uses it, so QLoRA keeps the same activations as LoRA.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LoraLinear
from .ops.swiglu import swiglu_lora_down

_PARTS = ("gate_proj", "up_proj", "down_proj")


def _is_silu(act: object, config: object) -> bool:
    if isinstance(act, nn.SiLU) or act is F.silu:
        return True
    cls = type(act)
    if cls.__name__ == "SiLUActivation" and cls.__module__.startswith("transformers"):
        return True
    return getattr(config, "hidden_act", None) in ("silu", "swish")


def _is_liger_swiglu(module: nn.Module) -> bool:
    """liger-kernel's SwiGLU MLP class (a model built after liger patched transformers' classes): the
    expression above with liger's fused silu-times-product and no ``act_fn`` attribute."""
    return any(c.__name__ == "LigerSwiGLUMLP" and c.__module__.startswith("liger_kernel") for c in type(module).__mro__)


def _fusable(module: nn.Module) -> bool:
    """A SwiGLU MLP with a LoRA down-projection and nothing else inside (so that its forward can only
    be the expression above: a module with, say, a dropout child is left alone)."""
    children = dict(module.named_children())
    if not all(name in children for name in _PARTS) or not isinstance(children["down_proj"], LoraLinear):
        return False
    if set(children) - {*_PARTS, "act_fn"}:
        return False
    if _is_liger_swiglu(module):
        return True
    return hasattr(module, "act_fn") and _is_silu(module.act_fn, getattr(module, "config", None))


def _simple_down(down: nn.Module) -> tuple | None:
    """(W, b, A, B, s, p, seed) when ``down`` computes one plain LoRA linear, else None."""
    if not isinstance(down, LoraLinear):
        return None
    if down._forward_hooks or down._forward_pre_hooks:  # e.g. batch_adapters' hook: it must see the call
        return None
    name = down.single_adapter()
    if name is None:
        return None
    return (*down.adapter_params(name), *down._dropout_and_seed(name))


def _fused_forward(self: nn.Module, x: Tensor, previous: object = None) -> Tensor:
    # previous: the instance forward this one replaced (e.g. liger-kernel's), restored by unfuse_mlps
    gate = self.gate_proj(x)
    up = self.up_proj(x)  # gate first, as the original does: layers draw their dropout seeds in call order
    args = _simple_down(self.down_proj)
    if args is None:
        return self.down_proj(getattr(self, "act_fn", F.silu)(gate) * up)  # (liger's SwiGLU class has no act_fn)
    return swiglu_lora_down(gate, up, *args)


def is_fused(module: nn.Module) -> bool:
    """Whether ``module``'s forward is the fused one."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _fused_forward


def fuse_mlps(model: nn.Module) -> int:
    """Give every SwiGLU MLP of ``model`` whose ``down_proj`` is a :class:`lorakit.LoraLinear` the fused forward.

    An MLP qualifies when it has ``gate_proj``, ``up_proj`` and ``down_proj`` children (and at most an
    ``act_fn`` besides), its ``act_fn`` is SiLU (``nn.SiLU``, transformers' ``SiLUActivation``, or a config
    whose ``hidden_act`` is "silu"/"swish") or it is liger-kernel's ``LigerSwiGLUMLP``, and ``down_proj`` is
    a LoRA linear layer — inject first.  An MLP running liger-kernel's SwiGLU forward
    (:func:`lorakit.fused_kernels.apply`) gets the fused forward instead, which does that kernel's job too.
    Same outputs and gradients (same dropout masks for the same seeds); per layer, backward keeps two
    (tokens × intermediate) tensors fewer.  Idempotent; :func:`unfuse_mlps` undoes it.

    Returns:
        the number of MLPs that are fused now (already fused ones included).
    """
    count = 0
    for module in model.modules():
        if is_fused(module):
            count += 1
        elif _fusable(module):
            # a partial, not a bound method: it pickles (torch.save(model)) and deep-copies with the module
            module.forward = functools.partial(_fused_forward, module, previous=module.__dict__.get("forward"))
            count += 1
    return count


def unfuse_mlps(model: nn.Module) -> int:
    """Restore the forward every fused MLP of ``model`` had before (its class's, or liger-kernel's); returns
    how many were fused."""
    count = 0
    for module in model.modules():
        if is_fused(module):
            previous = module.forward.keywords.get("previous")
            del module.forward
            if previous is not None:
                module.forward = previous
            count += 1
    return count


__all__ = ["fuse_mlps", "is_fused", "unfuse_mlps"]
