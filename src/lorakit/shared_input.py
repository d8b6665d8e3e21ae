"""Sibling LoRA layers that read the same input (q, k, v; gate, up) computed together.

    lorakit.share_inputs(model)      # groups q_proj/k_proj/v_proj, gate_proj/up_proj, … per parent
    lorakit.unshare_inputs(model)

A transformer block calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` one after the other with the
same tensor.  Once a group has seen that happen, the first member's call computes every member's
output through :func:`lorakit.ops.lora_group.lora_linear_group` — one pass over x for all the
low-rank products, one for all ∂A, and the input gradient accumulated in place — and the other
members pick up their outputs when they are called with that same tensor.  The model's own forward
is not changed.

Safety rules, so a group can only ever save work, never change a result:

* a member hands out a precomputed output only for the very tensor it was computed from (same
  object, same version counter); for anything else the member's call starts a new group
  computation for its own input — results stay exact, only work is wasted, so groups are formed
  only for projections of one input: cross-attention modules (``encoder_attn``, ``crossattention``,
  …), whose k and v read the encoder's states, are left alone;
* tensors made under ``torch.inference_mode`` carry no version counter, so they are never grouped;
* the group computes only when every member is in the plain state: one active adapter, not merged,
  not disabled, dropout off (or eval mode), and not under ``torch.compile`` tracing or a mixed batch
  (``batch_adapters`` disables the layers' own branch);
* the decision depends on nothing but those states and the call sequence, so activation
  checkpointing's recomputation repeats exactly the forward's work.
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from .layers import LoraLinear
from .ops.lora_group import lora_linear_group
from .ops.nf4 import NF4Tensors

# Child names that transformers models give to projections of one input, per parent module.
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT, …
    ("gate_proj", "up_proj"),  # SwiGLU MLPs
    ("query", "key", "value"),  # BERT
    ("w1", "w3"),  # Mixtral experts
)
# Parent names whose q/k/v read different inputs (k and v: the encoder's states): never grouped.
_CROSS_ATTENTION = ("encoder_attn", "crossattention", "cross_attn", "encdecattention")


class InputGroup:
    """LoRA linears known to be called with one shared input; see the module docstring."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self._pending: dict[int, Tensor] = {}  # member index → its precomputed output
        self._source: tuple[weakref.ref, int] | None = None  # the input the pending outputs came from

    def output(self, layer: LoraLinear, x: Tensor) -> Tensor | None:
        """``layer``'s output for ``x`` if the group provides it, else None (compute it alone)."""
        if x.is_inference():  # no version counter to prove x unchanged between the members' calls
            return None
        i = self.members.index(layer)
        if self._pending:
            if i in self._pending and self._is_source(x):
                return self._pending.pop(i)
            self._pending.clear()  # a new input arrived before every member took its output
        params = [_plain_params(m) for m in self.members]
        if any(p is None or p[2].device != x.device for p in params) or any(
                m.in_features != x.shape[-1] for m in self.members):
            return None  # (members split across devices compute alone; p[2] is A, a tensor on any base)
        Ws, bs, As, Bs, ss = zip(*params)  # type: ignore[misc]
        outs = lora_linear_group(x, Ws, bs, As, Bs, ss)
        self._pending = {j: h for j, h in enumerate(outs) if j != i}
        self._source = (weakref.ref(x), x._version)
        return outs[i]

    def __getstate__(self) -> dict:
        # A copy or a pickled model (torch.save(model)) starts with nothing pending: the weak reference
        # cannot be pickled, and outputs computed for a tensor of this process mean nothing elsewhere.
        return {**self.__dict__, "_pending": {}, "_source": None}

    def _is_source(self, x: Tensor) -> bool:
        ref, version = self._source  # type: ignore[misc]
        return ref() is x and x._version == version


def _plain_params(layer: LoraLinear) -> tuple[Tensor | NF4Tensors, Tensor | None, Tensor, Tensor, float] | None:
    """(W, b, A, B, s) when the layer computes base + one unmerged adapter without dropout, else None; W is the
    packed weight for a 4-bit base."""
    name = layer.single_adapter()
    if name is None or layer.training and layer.dropout_p[name]:
        return None
    return layer.adapter_params(name)


def share_inputs(model: nn.Module) -> int:
    """Group sibling LoRA linears that read one input (``SIBLINGS``) so they are computed together.

    Returns the number of groups formed. Results are unchanged (same values and gradients as
    separate layers); only the work is shared. Undo with :func:`unshare_inputs`.
    """
    groups = 0
    for parent_name, parent in model.named_modules():
        if any(word in parent_name.rsplit(".", 1)[-1].lower() for word in _CROSS_ATTENTION):
            continue
        children = dict(parent.named_children())
        for names in SIBLINGS:
            members = [children.get(n) for n in names]
            members = [m for m in members if isinstance(m, LoraLinear) and m.layout == "linear"]
            if len(members) < 2 or len({m.in_features for m in members}) != 1:
                continue
            group = InputGroup(members)
            for m in members:
                m.input_group = group
            groups += 1
    return groups


def unshare_inputs(model: nn.Module) -> int:
    """Undo :func:`share_inputs`; returns how many layers were members of a group."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and module.input_group is not None:
            module.input_group = None
            count += 1
    return count


__all__ = ["InputGroup", "SIBLINGS", "share_inputs", "unshare_inputs"]
