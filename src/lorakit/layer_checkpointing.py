"""Activation checkpointing of a model's decoder layers: ``lorakit.checkpointing(model, "on" | "offload" | "off")``.

Backward needs what forward saved; for a transformer that is, per layer, the inputs and outputs of
its norms, projections, attention and MLP — most of a training step's memory at long sequences.

* ``"on"``: each decoder layer runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``:
  forward keeps only the layer's inputs, backward runs the layer's forward again to rebuild the rest.
  torch's checkpoint restores the random generators for the rerun, so dropout masks (torch's and the
  LoRA layers', whose seeds come from the global generator) are the same, and the gradients are
  the ones without checkpointing.
* ``"offload"``: as ``"on"``, and the layer inputs the checkpoint keeps are moved to pinned CPU
  memory (:class:`OffloadHooks`): the copy out runs on a side stream while the next layers compute,
  and in backward the copy back of the layer before the one being recomputed is started one layer
  ahead, so the copies overlap compute.  GPU memory for saved activations is then about one layer's
  recomputation instead of one hidden-state tensor per layer.  To compile such a layer, compile it inside
  the checkpoint (:func:`compile_inside`).
* ``"off"``: the layers' own forward again.

The layer's instance ``forward`` is replaced (never its class), so the module hooks around it — FSDP2's
gathers, DDP's — stay outside the checkpoint and run once, as transformers does it.  Caches are
turned off inside a checkpointed call (a KV cache updated again by the rerun would grow).  The
decision to checkpoint is taken per call: only in training mode with gradients enabled.

Under ``torch.compile``, "on" is traced into the compiled layer (Dynamo's checkpoint operator), which
refuses side effects in the checkpointed code: one, anywhere in the layer, and Dynamo gives up on the
whole checkpoint, which then runs eagerly without a warning.  transformers ≥ 5.25 has one in every
attention forward (its ``kernels`` dependency sets and resets a context variable around it).  A set and
reset leave nothing for the recomputation to replay, nor does a shared-input group's hand-over of outputs,
so :func:`checkpointing` tells Dynamo not to replay forward side effects in the recomputation
(``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``, where this torch has it).
"offload" runs its checkpoint outside compiled code (:func:`compile_inside`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

MODES = ("off", "on", "offload")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep saved tensors in (pinned) CPU memory, copying on a side stream.

    The design of torchtune's ``OffloadActivations``.  pack (forward): a CUDA tensor of at least
    ``min_bytes`` is copied into a pinned CPU buffer on a side stream that first waits for the compute
    stream; compute goes on without waiting.  The device tensor is kept referenced until its copy is
    done (or, once more than ``max_in_flight`` copies are pending, until the compute stream has been
    made to wait for the oldest): only then is the reference dropped, so its memory returns to the
    compute stream's pool at once and stream order makes the reuse safe — ``record_stream`` would
    instead hold it until the host sees the copy finished, and the host runs ahead of the GPU.
    unpack (backward): the tensor is copied back on the side stream into memory of the compute
    stream's pool, and the compute stream waits for that copy only; the tensor packed just before it
    (the previous layer's input, needed next) is fetched at the same time, so its copy overlaps this
    layer's recomputation.  Tensors smaller than ``min_bytes`` and parameters stay where they are.
    On the CPU "offloading" is a plain copy (the same bookkeeping, no memory saved), which is what
    lets the CPU tests check the code path.

    ``stats``: tensors and bytes packed so far.
    """

    def __init__(self, min_bytes: int = 1 << 16, max_in_flight: int = 2) -> None:
        self.min_bytes, self.max_in_flight = min_bytes, max_in_flight
        self.stats = {"tensors": 0, "bytes": 0}
        self._streams: dict[torch.device, Any] = {}
        self._order: list[weakref.ref] = []  # handles in pack order, for prefetching in backward
        self._pending: collections.deque = collections.deque()  # (copy-done event, device tensor) of copies out
        self._in_backward = False
        super().__init__(self._pack, self._unpack)

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: Tensor) -> Any:
        if isinstance(t, nn.Parameter) or t.numel() * t.element_size() < self.min_bytes or t.is_sparse:
            return t
        if self._in_backward:  # a new forward after a backward: the old order is done with
            self._order.clear()
            self._in_backward = False
        if t.device.type == "cuda":
            stream, compute = self._stream(t.device), torch.cuda.current_stream(t.device)
            stream.wait_stream(compute)  # t is complete
            with torch.cuda.stream(stream):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                self._pending.append((stream.record_event(), t))
            self._release(compute, self.max_in_flight)
        else:
            host = t.detach().clone()
        handle = _Offloaded(t.device, host, t.requires_grad)
        handle.index = len(self._order)
        self._order.append(weakref.ref(handle))
        self.stats["tensors"] += 1
        self.stats["bytes"] += t.numel() * t.element_size()
        return handle

    def _release(self, compute: Any, keep: int) -> None:
        """Drop the device tensors whose copy out is done, and beyond the newest ``keep`` the rest too, after
        making ``compute`` wait for their copies (so their memory can be reused on it in stream order)."""
        while self._pending and (len(self._pending) > keep or self._pending[0][0].query()):
            event, _ = self._pending.popleft()
            compute.wait_event(event)

    def _fetch(self, h: _Offloaded) -> None:
        """Start copying ``h`` back to its device (once)."""
        if h.device_copy is not None:
            return
        if h.device.type == "cuda":
            stream, compute = self._stream(h.device), torch.cuda.current_stream(h.device)
            buffer = torch.empty(h.host.shape, dtype=h.host.dtype, device=h.device)  # the compute stream's memory
            stream.wait_stream(compute)  # which is free once the compute work issued so far has run
            with torch.cuda.stream(stream):
                buffer.copy_(h.host, non_blocking=True)
                h.ready = stream.record_event()
            h.device_copy = buffer
        else:
            h.device_copy = h.host.clone()

    def _unpack(self, h: Any) -> Tensor:
        if not isinstance(h, _Offloaded):
            return h
        if h.device.type == "cuda" and self._pending:  # forward is over: no copy out is waited on any more
            self._release(torch.cuda.current_stream(h.device), 0)
        self._in_backward = True
        self._fetch(h)
        if 0 < h.index <= len(self._order):  # prefetch the tensor packed before this one: backward needs it next
            previous = self._order[h.index - 1]()
            if previous is not None:
                self._fetch(previous)
        t = h.device_copy
        h.device_copy = None  # unpacked again (retain_graph) → copied again; memory freed with the user's ref
        if h.device.type == "cuda":
            torch.cuda.current_stream(h.device).wait_event(h.ready)
        return t


class _Offloaded:
    __slots__ = ("__weakref__", "device", "device_copy", "host", "index", "ready", "requires_grad")

    def __init__(self, device: torch.device, host: Tensor, requires_grad: bool) -> None:
        self.device, self.host, self.requires_grad = device, host, requires_grad
        self.device_copy: Tensor | None = None
        self.ready: Any = None
        self.index = 0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: modules whose class is named in a ``_no_split_modules`` of the
    model (transformers' decoder / encoder layers), else transformers' ``GradientCheckpointingLayer``
    subclasses; outermost only."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if m is not model and (
        type(m).__name__ in names or any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__[1:]))]
    inner = {id(c) for m in found for c in m.modules() if c is not m}
    return [m for m in found if id(m) not in inner]


def checkpointing(model: nn.Module, mode: str = "on", *, layers: Iterable[nn.Module] | None = None,
                  min_offload_bytes: int = 1 << 16) -> int:
    """Checkpoint (``"on"``), checkpoint and offload (``"offload"``), or stop checkpointing (``"off"``)
    each decoder layer of ``model``; see the module docstring.

    Args:
        model: the model (LoRA, shared inputs and fused MLPs may be applied before or after).
        mode: "off", "on" or "offload".
        layers: the modules to checkpoint (default: :func:`decoder_layers`).
        min_offload_bytes: smaller saved tensors stay on the device ("offload").

    Returns:
        the number of layers checkpointed now (0 for "off").

    Raises:
        ConfigError: an unknown mode, or "on"/"offload" on a model in which no decoder layer is found
            (pass ``layers=``).
    """
    if mode not in MODES:
        raise ConfigError(f"checkpointing mode must be one of {MODES}, got {mode!r}")
    chosen = list(layers) if layers is not None else decoder_layers(model)
    for module in model.modules():  # undo first: switching modes, or "off"
        wrapper = _wrapper(module)
        if wrapper is not None:
            previous = wrapper.keywords["previous"]
            if previous is None:
                del module.forward
            else:
                module.forward = previous
    if mode == "off":
        return 0
    if not chosen:
        raise ConfigError(
            f"checkpointing: found no decoder layers in {type(model).__name__} (no module class named in its "
            "_no_split_modules, no GradientCheckpointingLayer); pass layers=[...] with the blocks to checkpoint")
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # see the module docstring
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    hooks = OffloadHooks(min_offload_bytes) if mode == "offload" else None
    for module in chosen:
        module.forward = functools.partial(_checkpointed_forward, module, hooks=hooks,
                                           previous=module.__dict__.get("forward"))
    return len(chosen)


def offload_stats(model: nn.Module) -> dict[str, int] | None:
    """Tensors and bytes the "offload" mode has moved to the CPU so far (None if not offloading)."""
    for module in model.modules():
        wrapper = _wrapper(module)
        if wrapper is not None:
            hooks = wrapper.keywords["hooks"]
            return dict(hooks.stats) if hooks is not None else None
    return None


def checkpointing_mode(model: nn.Module) -> str:
    """"off", "on" or "offload": what :func:`checkpointing` last set on ``model``."""
    for module in model.modules():
        wrapper = _wrapper(module)
        if wrapper is not None:
            return "offload" if wrapper.keywords["hooks"] is not None else "on"
    return "off"


def compile_inside(module: nn.Module, compile: Callable[[Callable[..., Any]], Callable[..., Any]] | None) -> bool:
    """Compile a layer checkpointed with ``"offload"`` inside its checkpoint: ``compile(forward)`` (e.g.
    ``lambda f: torch.compile(f, dynamic=True)``) then runs in place of the layer's forward, within the
    checkpoint and the offloading hooks; ``None`` runs the layer's own forward again.  Returns False, and does
    nothing, for a module not checkpointed with "offload" (compile such a module itself).

    Why: torch.compile cannot trace saved-tensor hooks whose pack and unpack are Python functions.  A
    compiled region that contains them — ``layer.compile()`` of an offloaded layer, or ``torch.compile`` of
    the whole model — is skipped and runs eagerly, without an error or a warning.  Compiled inside them, the
    checkpoint and the hooks stay in Python around the compiled code: what the checkpoint keeps (the layer's
    inputs) is offloaded as in eager mode, and the recomputation in backward runs the compiled forward again.
    ("on" needs none of this: torch.compile traces a checkpoint without hooks, and compiling the whole layer
    lets it plan the recomputation.)
    """
    wrapper = _wrapper(module)
    if wrapper is None or wrapper.keywords["hooks"] is None:
        return False
    previous = wrapper.keywords["previous"]
    compiled = compile(_own_forward(module, previous)) if compile is not None else None
    module.forward = functools.partial(_checkpointed_forward, module, hooks=wrapper.keywords["hooks"],
                                       previous=previous, compiled=compiled)
    return True


def _wrapper(module: nn.Module) -> functools.partial | None:
    """The checkpointing forward :func:`checkpointing` set on ``module``, if any."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, functools.partial) and forward.func is _checkpointed_forward else None


def _own_forward(module: nn.Module, previous: Any) -> Any:
    """The forward the layer had before :func:`checkpointing`: an instance forward set earlier, else its class's."""
    return previous if previous is not None else type(module).forward.__get__(module)


def _checkpointed_forward(self: nn.Module, *args: Any, hooks: OffloadHooks | None, previous: Any,
                          compiled: Any = None, **kwargs: Any) -> Any:
    forward = compiled if compiled is not None else _own_forward(self, previous)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    for key in _CACHE_KWARGS:  # a cache written again by the recomputation would grow
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    with hooks if hooks is not None else contextlib.nullcontext():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


__all__ = ["MODES", "OffloadHooks", "checkpointing", "checkpointing_mode", "compile_inside", "decoder_layers",
           "offload_stats"]
