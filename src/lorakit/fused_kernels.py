"""liger-kernel's fused kernels on one loaded model instance: ``lorakit.fused_kernels.apply(model)``.

Most of a LoRA training step is the frozen model around the LoRA layers: the loss over the
vocabulary (transformers builds float32 logits of tokens × vocabulary for it), the norms, the
rotary embeddings and the MLP's activation.  liger-kernel (a maintained library of Triton kernels)
has fused versions of these; :func:`apply` puts them on *one model instance*, for every
architecture liger-kernel supports:

* the causal LM's loss becomes liger's fused linear cross-entropy,

      loss = (1/N) Σ_{t: y_{t+1} ≠ −100} −log softmax(W h_t)[y_{t+1}],   h: (B, T, d) last hidden states,
                                                                        W: (V, d) output embedding,

  computed over chunks of rows (its gradient with respect to h in the same pass), so no (B·T, V)
  logits tensor is ever built — in training and in evaluation (a call with ``labels`` returns
  ``logits=None`` unless it passes ``skip_logits=False``; a call without labels, e.g. generation,
  gets its logits as before);
* RMSNorm / LayerNorm, RoPE and SwiGLU / GeGLU MLPs become liger's modules' forwards.

Why not ``liger_kernel.transformers.apply_liger_kernel_to_<model>()``: besides patching the instance,
it rebinds names in transformers' modeling modules (``modeling_llama.LlamaRMSNorm``,
``modeling_llama.apply_rotary_pos_emb``, ``LlamaForCausalLM.forward`` …), which changes every model
built or run afterwards in the process.  Here liger's own per-model function runs (so the kernel
choice per architecture stays liger's), then every name it rebound in transformers is put back, and
what only such a rebinding could reach — RoPE, a module-level function the attention's forward
calls — is given to this model's modules alone: their forward is rebuilt over a copy of the
modeling module's globals in which the function is liger's.

The loss is checked on every call: when the output embedding is not a plain ``nn.Linear`` (a LoRA
layer, a ``modules_to_save`` copy, a quantized linear), the fused loss would read a weight that is
not the one the model computes with, so the class's own forward runs instead.

lorakit's fused MLP (:func:`lorakit.fuse_mlps`) does the SwiGLU kernel's job and also keeps less for
backward; an MLP already fused keeps lorakit's forward, and fusing after :func:`apply` replaces
liger's.  Compose in the order inject → apply → share_inputs → fuse_mlps.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
import types
from collections import Counter
from typing import Any

import torch
from torch import nn

from .fused_mlp import is_fused


@dataclasses.dataclass
class KernelReport:
    """What :func:`apply` did to a model."""

    #: whether any kernel was put on the model
    applied: bool
    #: the model's ``config.model_type`` (None when it has none)
    model_type: str | None = None
    #: kernel → number of modules now running it (e.g. {"LigerRMSNorm": 5, "RoPE": 2})
    replaced: dict[str, int] = dataclasses.field(default_factory=dict)
    #: why nothing (or not everything) was applied; empty when all went on
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        if not self.applied:
            return "fused kernels: none applied (" + "; ".join(self.notes) + ")"
        parts = ", ".join(f"{kind} ×{n}" for kind, n in self.replaced.items())
        return f"fused kernels (liger-kernel) on {self.model_type}: {parts}" + (
            "; " + "; ".join(self.notes) if self.notes else "")


_APPLIED = "_lorakit_kernel_report"  # attribute on the model: apply() is idempotent
_LOSS = "fused linear cross-entropy"
_LM_CLASSES = ("ForCausalLM", "ForConditionalGeneration")  # the classes liger's loss forwards are written for


def apply(model: nn.Module, *, device: torch.device | str | None = None, rope: bool = True, norms: bool = True,
          mlp: bool = True, loss: bool = True) -> KernelReport:
    """Put liger-kernel's fused kernels on ``model`` (this instance only) and say what was replaced.

    Args:
        model: a loaded transformers model whose ``config.model_type`` liger-kernel supports
            (llama, mistral, qwen2/3, gemma 1-4, phi3, …; see ``MODEL_TYPE_TO_APPLY_LIGER_FN``).
            LoRA may be injected before or after.
        device: where the model will run (default: where its parameters are).  Kernels are applied
            only for CUDA: liger's Triton kernels do not run on the CPU.
        rope, norms, mlp, loss: which kernels to apply (RoPE; RMSNorm/LayerNorm; SwiGLU/GeGLU;
            the fused linear cross-entropy).  Liger's plain cross-entropy, which it installs by
            rebinding ``torch.nn.functional.cross_entropy`` for the whole process, is never used.
            For decoder layers you will ``torch.compile``, pass ``rope=False, norms=False, mlp=False``:
            liger's autograd functions fail in Dynamo inside a compiled layer (torch 2.11), and
            Inductor fuses those ops itself; ``lorakit train --compile`` does this.

    Returns:
        a :class:`KernelReport`; ``str(report)`` is one line for a log.  Nothing is changed (and the
        report says why) on a non-CUDA device, without liger-kernel, or for an architecture it does
        not support.  Applying twice returns the first report.
    """
    done = getattr(model, _APPLIED, None)
    if isinstance(done, KernelReport):
        return done
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    where = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    if where.type != "cuda":
        return KernelReport(False, model_type, notes=[
            f"the model runs on {where.type}; liger-kernel's Triton kernels need a CUDA GPU"])
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as err:
        return KernelReport(False, model_type,
                            notes=[f"liger-kernel is not importable ({err}); pip install 'lorakit[kernels]'"])
    apply_fn = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type) if model_type else None
    if apply_fn is None:
        return KernelReport(False, model_type, notes=[
            f"liger-kernel has no kernels for model type {model_type!r}"
            + (" (the model has no config.model_type)" if model_type is None else "")])
    notes = []
    if loss and not type(model).__name__.endswith(_LM_CLASSES):
        # liger's apply functions give the instance the causal LM's forward whatever its class: a model
        # without a language-modelling head (a sequence classifier, a bare decoder) keeps its own
        notes.append(f"{_LOSS}: {type(model).__name__} is not a causal language model")
        loss = False
    report = _apply(model, apply_fn, model_type, dict(rope=rope, rms_norm=norms, layer_norm=norms, swiglu=mlp,
                                                       geglu=mlp, fused_linear_cross_entropy=loss))
    report.notes[:0] = notes
    if report.applied:
        object.__setattr__(model, _APPLIED, report)  # not a submodule; plain attribute
    return report


def _apply(model: nn.Module, apply_fn: Any, model_type: str, wanted: dict[str, bool]) -> KernelReport:
    params = inspect.signature(apply_fn).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    if "cross_entropy" in params:
        kwargs["cross_entropy"] = False
    notes: list[str] = []
    before = {id(m): m.__dict__.get("forward") for m in model.modules()}
    fused = {id(m) for m in model.modules() if is_fused(m)}
    modules, classes = _snapshot()
    try:
        try:
            apply_fn(model=model, **kwargs)
        except NotImplementedError as err:  # liger lacks the fused loss for some architectures (e.g. granite):
            # undo what it did, keep the other kernels and say so in the report
            if not kwargs.get("fused_linear_cross_entropy"):
                raise
            _restore(modules, classes)
            _put_back_forwards(model, before)
            notes.append(f"{_LOSS} not available for {model_type} ({err})")
            kwargs["fused_linear_cross_entropy"] = False
            apply_fn(model=model, **kwargs)
    finally:
        rebound = _restore(modules, classes)
    replaced: Counter[str] = Counter()
    for module in model.modules():
        old, new = before.get(id(module)), module.__dict__.get("forward")
        if new is old or new is None:
            continue
        if id(module) in fused:  # lorakit's fused MLP already does the SwiGLU kernel's job
            module.__dict__["forward"] = old
            for attr in ("_get_name", "extra_repr"):
                module.__dict__.pop(attr, None)
            replaced["lorakit fused MLP kept"] += 1
        elif module is model and _from_liger(getattr(new, "__func__", None)):
            module.__dict__["forward"] = functools.partial(_fused_loss_forward, module, new.__func__)
            replaced[_LOSS] += 1
        else:
            replaced[_kernel_name(new)] += 1
    for (owner, name), value in rebound.items():
        if isinstance(owner, types.ModuleType) and _plain_callable(vars(owner).get(name)) and _plain_callable(value):
            n = _rebind_in_model(model, owner, name, value)
            label = "RoPE" if "rotary" in name else name
            if n:
                replaced[label] += n
            else:
                notes.append(f"{label}: no forward of this model calls {owner.__name__}.{name} itself; left as it was")
        elif isinstance(owner, type) and callable(value) and not isinstance(value, type):
            n = 0
            for module in model.modules():
                if isinstance(module, owner) and name not in module.__dict__:
                    module.__dict__[name] = value.__get__(module) if inspect.isfunction(value) else value
                    n += 1
            if n:
                replaced[f"{owner.__name__}.{name}"] += n
    if wanted["fused_linear_cross_entropy"] and _LOSS not in replaced and not any(_LOSS in n for n in notes):
        notes.append(f"{_LOSS}: liger-kernel replaces no loss of {type(model).__name__}")
    if wanted["rope"] and "RoPE" not in replaced and not any(n.startswith("RoPE") for n in notes):
        # e.g. a transformers release that wraps the RoPE function in a way the rebinding above does not know
        notes.append(f"RoPE: no rotary-embedding kernel could be put on this {type(model).__name__} alone; left as it was")
    return KernelReport(bool(replaced), model_type, dict(replaced), notes)


# -- undoing liger's global rebinding ------------------------------------------------------------------------
def _from_liger(value: Any) -> bool:
    if isinstance(value, functools.partial):
        value = value.func
    return str(getattr(value, "__module__", "") or "").startswith("liger_kernel")


def _watched() -> dict[str, types.ModuleType]:
    """Modules liger's apply functions rebind names in: transformers' and torch.nn.functional."""
    mods = {name: m for name, m in list(sys.modules.items())
            if isinstance(m, types.ModuleType) and (name == "transformers" or name.startswith("transformers."))}
    mods["torch.nn.functional"] = torch.nn.functional
    return mods


def _snapshot() -> tuple[dict[str, dict[str, Any]], dict[type, dict[str, Any]]]:
    modules = {name: dict(vars(m)) for name, m in _watched().items()}
    classes = {}
    for name, m in _watched().items():
        if name.startswith("transformers.models."):
            for v in list(vars(m).values()):
                if isinstance(v, type) and v.__module__ == name:
                    classes[v] = dict(vars(v))
    return modules, classes


def _restore(modules: dict[str, dict[str, Any]], classes: dict[type, dict[str, Any]]) -> dict[tuple[Any, str], Any]:
    """Put back every name liger rebound since the snapshot; returns {(module or class, name): liger's value}."""
    rebound: dict[tuple[Any, str], Any] = {}
    for name, m in _watched().items():
        old = modules.get(name)
        if old is None:  # imported by the apply function itself: no snapshot, so re-run it if liger touched it
            if any(_from_liger(v) for k, v in vars(m).items() if not k.startswith("__")) and name.startswith(
                    "transformers.models."):
                patched = {k: v for k, v in vars(m).items() if _from_liger(v)}
                importlib.reload(m)
                rebound.update({(m, k): v for k, v in patched.items() if vars(m).get(k) is not v})
            continue
        for key, value in list(vars(m).items()):
            if key in old and old[key] is not value and _from_liger(value):
                setattr(m, key, old[key])
                rebound[(m, key)] = value
        for cls in [v for v in vars(m).values() if isinstance(v, type) and v in classes]:
            saved = classes[cls]
            for key, value in list(vars(cls).items()):
                if saved.get(key) is not value and _from_liger(value):
                    if key in saved:
                        setattr(cls, key, saved[key])
                    else:
                        delattr(cls, key)
                    rebound[(cls, key)] = value
    return rebound


def _put_back_forwards(model: nn.Module, before: dict[int, Any]) -> None:
    for module in model.modules():
        old = before.get(id(module))
        if old is None:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = old


# -- RoPE on this model only -----------------------------------------------------------------------------------
def _plain_callable(value: Any) -> bool:
    """A function-like global (not a class): a plain function, or, with the ``kernels`` package installed,
    transformers' wrapper module around one (transformers ≥ 5.25 makes ``apply_rotary_pos_emb`` such a ``Func``)."""
    return callable(value) and not isinstance(value, type)


def _rebind_in_model(model: nn.Module, owner: types.ModuleType, name: str, value: Any) -> int:
    """Give every module of ``model`` whose class forward (defined in ``owner``) calls ``owner.name`` a forward
    that calls ``value`` instead; returns how many modules got one."""
    rebuilt: dict[type, Any] = {}
    count = 0
    for module in model.modules():
        cls = type(module)
        if "forward" in module.__dict__:
            continue
        if cls not in rebuilt:
            forward = inspect.getattr_static(cls, "forward", None)
            inner = inspect.unwrap(forward) if inspect.isfunction(forward) else None
            uses = inner is not None and inner.__globals__ is vars(owner) and name in inner.__code__.co_names
            rebuilt[cls] = _with_globals(forward, vars(owner), {**vars(owner), name: value}) if uses else None
            # (None also when a decorator's wrapper could not be rebuilt: that class keeps its forward)
        if rebuilt[cls] is not None:
            module.__dict__["forward"] = types.MethodType(rebuilt[cls], module)
            count += 1
    return count


def _with_globals(fn: Any, old: dict[str, Any], new: dict[str, Any]) -> Any:
    """A copy of ``fn`` whose innermost wrapped function (the one whose globals are ``old``) reads ``new``;
    decorators' wrappers (functools.wraps, whose closure holds the wrapped function) are copied around it."""
    if not inspect.isfunction(fn):
        return None
    if fn.__globals__ is old:
        copy = types.FunctionType(fn.__code__, new, fn.__name__, fn.__defaults__, fn.__closure__)
        inner = None
    else:
        inner = getattr(fn, "__wrapped__", None)
        new_inner = _with_globals(inner, old, new)
        cells = []
        for cell in fn.__closure__ or ():
            try:
                held = cell.cell_contents
            except ValueError:  # an empty cell
                held = None
            cells.append(types.CellType(new_inner) if held is inner else cell)
        if new_inner is None or not any(_filled(c) and c.cell_contents is new_inner for c in cells):
            return None  # a wrapper that does not hold the wrapped function in its closure: not rebuilt
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if inner is not None:
        copy.__wrapped__ = new_inner
    return copy


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


# -- the loss --------------------------------------------------------------------------------------------------
def _fused_loss_forward(model: nn.Module, lce_forward: Any, *args: Any, **kwargs: Any) -> Any:
    """liger's forward (loss without logits) while the output embedding is a plain linear; else the class's."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if type(head) is not nn.Linear:  # LoRA / modules_to_save / quantized head: liger would read the wrong weight
        return type(model).forward(model, *args, **kwargs)
    if kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None:
        kwargs.setdefault("skip_logits", True)  # evaluation too: the loss without the logits
    return lce_forward(model, *args, **kwargs)


def _kernel_name(forward: Any) -> str:
    func = getattr(forward, "__func__", forward)
    qualname = getattr(func, "__qualname__", type(func).__name__)
    return qualname.split(".")[0] if _from_liger(func) else qualname


def applied(model: nn.Module) -> KernelReport | None:
    """The report of the :func:`apply` that put kernels on ``model``, or None."""
    report = getattr(model, _APPLIED, None)
    return report if isinstance(report, KernelReport) else None


__all__ = ["KernelReport", "applied", "apply"]
