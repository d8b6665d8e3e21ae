"""lorakit models in transformers' ``Trainer``, TRL's ``SFTTrainer`` and Accelerate loops.

    from lorakit import LoraConfig
    from lorakit.integrations.hf import get_lora_model
    model = get_lora_model(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    trainer = Trainer(model=model, args=args, train_dataset=ds)     # or TRL's SFTTrainer(...)
    trainer.train()                                                 # or train(resume_from_checkpoint=...)
    trainer.save_model("out/adapter")                               # PEFT layout: lorakit and PEFT load it

Everything goes through extension points the trainers already call; nothing in transformers, TRL or
Accelerate is patched:

* **saving** — ``Trainer`` saves a ``PreTrainedModel``, at every checkpoint and in ``save_model``, by
  calling ``model.save_pretrained(dir, state_dict=..., is_main_process=...)``.
  :func:`enable_peft_checkpoints` gives the model *instance* its own ``save_pretrained`` (the class is
  untouched), which writes the adapter — ``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's
  layout with ``modules_to_save``, bit-identical tensors and the same config and metadata as
  :func:`lorakit.save_adapter` — instead of the whole model with lorakit's internal keys.  The Trainer
  then adds its own files (optimizer, scheduler, RNG, ``trainer_state.json``, tokenizer) as usual.
* **resuming and the best checkpoint** — for a model that is not a ``peft.PeftModel``,
  ``Trainer.train(resume_from_checkpoint=...)`` (and TRL's trainers, which inherit it) and
  ``load_best_model_at_end`` read a checkpoint's ``model.safetensors`` and call
  ``model.load_state_dict(tensors, strict=False)``.  ``save_pretrained`` therefore gives the adapter file a
  second name, ``model.safetensors`` (a hard link where the file system has them, else a copy: the
  adapter's tensors under their PEFT keys, nothing else), and a ``load_state_dict`` pre-hook on the model
  maps those keys onto the adapter's parameters — every tensor of the adapter must be there with its
  shape, or loading raises :class:`lorakit.AdapterMismatchError` — while a post-hook drops the frozen base
  keys from the missing keys (they keep the values the model was built with, exactly as with PEFT).
  Optimizer, scheduler, RNG and data position are restored by the Trainer itself.  The checkpoint has no
  ``config.json``, so nothing mistakes it for a full model; ``from_pretrained`` on it goes through
  ``adapter_config.json`` (transformers' PEFT integration).
* **Accelerate loops** — :func:`register_accelerate_hooks` uses ``Accelerator.register_save_state_pre_hook``
  / ``register_load_state_pre_hook``: ``accelerator.save_state(dir)`` writes ``dir/lorakit_adapter``
  (PEFT layout) instead of the whole model, and ``accelerator.load_state(dir)`` copies it back.

The speed paths stay on: :func:`get_lora_model` applies :func:`lorakit.share_inputs` and
:func:`lorakit.fuse_mlps` (same values and gradients, less work and memory), and the trainers'
``torch_compile=True`` compiles the model as it is (saving always sees the uncompiled module).

Covered by tests (CPU): one process, gradient checkpointing, ``torch_compile=True``, ``load_best_model_at_end``;
``torchrun`` DDP (2 processes, gloo) was checked by hand.  Not covered: DeepSpeed / FSDP through the
Trainer (their checkpoints go through their own engines; ``save_pretrained`` takes the adapter's values
from a gathered ``state_dict`` when one is passed, but also reads the live, sharded parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..adapters import active_adapters, adapter_names
from ..atomic import fsync
from ..config import LoraConfig
from ..errors import AdapterMismatchError, AdapterNameError, ConfigError, LorakitError
from ..fused_mlp import fuse_mlps
from ..inject import inject
from ..peft_keys import PREFIX
from ..io import CONFIG_NAME, WEIGHTS_NAME, _layer_tensors, _modules_with, layer_params, read_adapter, save_adapter
from ..layers import LoraLayer
from ..mixed_batch import _check_fingerprint
from ..peft_keys import MAGNITUDE, factor_keys
from ..shared_input import share_inputs

#: transformers' SAFE_WEIGHTS_NAME: the file the Trainer resumes (and loads the best checkpoint of) a
#: model that is not a PeftModel from; save_pretrained makes it a second name of the adapter file.
TRAINER_WEIGHTS_NAME = "model.safetensors"
#: The directory :func:`register_accelerate_hooks` writes inside ``accelerator.save_state``'s directory
#: (``lorakit_adapter_<i>`` for the i-th prepared model when i > 0, as Accelerate names ``model_<i>``).
ACCELERATE_DIR = "lorakit_adapter"
_STATE = "_lorakit_hf"  # model.__dict__ entry: the load hooks' handle ids, so enabling twice replaces them
_COMPILED_PREFIX = "_orig_mod."  # torch.compile's OptimizedModule: its state-dict keys' prefix
# Wrapper prefixes that parameter names carry inside FSDP / activation checkpointing / torch.compile
# wrappers but that the gathered state dicts those wrappers return do not.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class TrainerSetupError(LorakitError, RuntimeError):
    """A trainer is set up in a way lorakit's checkpoints cannot follow (the message says what to change)."""


def get_lora_model(
    model: nn.Module, config: LoraConfig | Any, adapter_name: str = "default", *, share: bool = True, fuse: bool = True
) -> nn.Module:
    """lorakit's counterpart of ``peft.get_peft_model``, for transformers' Trainer and TRL's trainers.

    Injects adapter ``adapter_name`` (:func:`lorakit.inject`), applies the exact speed rewrites
    (``share``: :func:`lorakit.share_inputs`, ``fuse``: :func:`lorakit.fuse_mlps`) and
    :func:`enable_peft_checkpoints`.  Returns ``model`` (changed in place).

    Args:
        config: a :class:`lorakit.LoraConfig`, or a ``peft.LoraConfig`` (read through its ``to_dict()``
            as lorakit reads an adapter_config.json; options lorakit does not implement raise
            :class:`lorakit.ConfigError`).
    """
    if not isinstance(config, LoraConfig):
        to_dict = getattr(config, "to_dict", None)
        if not callable(to_dict):
            raise ConfigError(f"config must be a lorakit.LoraConfig or a peft.LoraConfig, got {type(config).__name__}")
        config = LoraConfig.from_peft_dict(to_dict(), source=f"the {type(config).__module__}.{type(config).__name__}")
    inject(model, config, adapter_name)
    if share:
        share_inputs(model)
    if fuse:
        fuse_mlps(model)
    return enable_peft_checkpoints(model, adapter_name)


def enable_peft_checkpoints(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Make ``model.save_pretrained`` write adapter ``adapter_name`` (default: the active one) in PEFT's
    layout, and ``model.load_state_dict`` accept that file's keys — what transformers' Trainer calls to
    save checkpoints, ``save_model`` and to resume (see the module docstring).  Idempotent; returns
    ``model``.  :func:`disable_peft_checkpoints` undoes it.

    Raises:
        AdapterNameError: the model has no lorakit adapter (inject one first) or no ``adapter_name``.
    """
    names = adapter_names(model)
    if not names:
        raise AdapterNameError("the model has no lorakit adapter; inject one first (lorakit.inject or get_lora_model)")
    if adapter_name is not None and adapter_name not in names:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; the model has {names}")
    disable_peft_checkpoints(model)
    # A partial, not a closure: the model still pickles and deep-copies with its hook.
    model.save_pretrained = functools.partial(save_pretrained, model, adapter_name=adapter_name)
    loader = PeftKeyLoader(adapter_name)
    register = getattr(model, "register_load_state_dict_pre_hook", None)  # public from torch 2.5
    pre = register(loader) if register is not None else model._register_load_state_dict_pre_hook(loader, with_module=True)
    post = model.register_load_state_dict_post_hook(loader.after)
    model.__dict__[_STATE] = (pre.id, post.id)
    return model


def disable_peft_checkpoints(model: nn.Module) -> bool:
    """Undo :func:`enable_peft_checkpoints`; returns whether it was enabled."""
    ids = model.__dict__.pop(_STATE, None)
    if ids is None:
        return False
    model.__dict__.pop("save_pretrained", None)
    model._load_state_dict_pre_hooks.pop(ids[0], None)
    model._load_state_dict_post_hooks.pop(ids[1], None)
    return True


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
    is_main_process: bool = True,
    **kwargs: Any,
) -> Path:
    """Write the adapter into ``save_directory`` as ``lorakit.save_adapter`` does, and the same tensors
    as ``model.safetensors`` for the Trainer (see the module docstring).

    ``save_directory`` may hold other files (a Trainer's output directory): only
    ``adapter_config.json``, ``adapter_model.safetensors`` and ``model.safetensors`` are replaced, each
    with one rename.  ``state_dict`` (what the Trainer passes under FSDP / DeepSpeed:
    the gathered full state dict) supplies the adapter's values when given.  Options of
    ``PreTrainedModel.save_pretrained`` that do not apply to an adapter (``safe_serialization``,
    ``max_shard_size``, ...) are accepted and ignored: lorakit always writes one safetensors file.
    A state dict with torch.compile's ``_orig_mod.`` keys (a Trainer given a compiled model) raises
    :class:`TrainerSetupError`: resuming from it could not restore the adapter.
    A model without lorakit adapters (after :func:`lorakit.merge_and_unload`) is saved whole by its
    class's own ``save_pretrained``.
    """
    directory = Path(save_directory)
    if not adapter_names(model):  # merge_and_unload left plain modules: save them as the class would
        type(model).save_pretrained(model, directory, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
        return directory
    if state_dict is not None and any(k.startswith(_COMPILED_PREFIX) for k in state_dict):
        # The Trainer hands over its model's state dict when that model is a wrapper; a torch.compile
        # wrapper would later load the checkpoint under "_orig_mod." keys, which the adapter file does
        # not have, and a resume would silently start from scratch.
        raise TrainerSetupError(
            "the Trainer was given a torch.compile'd model, whose checkpoints cannot be resumed; pass the "
            "model itself and set TrainingArguments(torch_compile=True) to compile it"
        )
    if not is_main_process:
        return directory
    name = _adapter_to_use(model, adapter_name)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lorakit-save-", dir=directory))
    try:
        saved = save_adapter(model, tmp / "adapter", name)
        if state_dict is not None:
            _rewrite_from_state_dict(model, name, saved / WEIGHTS_NAME, state_dict)
        try:  # the Trainer's name for the same file: a hard link costs no space
            os.link(saved / WEIGHTS_NAME, tmp / TRAINER_WEIGHTS_NAME)
        except OSError:
            shutil.copyfile(saved / WEIGHTS_NAME, tmp / TRAINER_WEIGHTS_NAME)
            fsync(tmp / TRAINER_WEIGHTS_NAME)
        for src in (saved / WEIGHTS_NAME, tmp / TRAINER_WEIGHTS_NAME, saved / CONFIG_NAME):
            os.replace(src, directory / src.name)
        fsync(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_adapter_weights(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *, strict: bool = True
) -> None:
    """Copy the adapter saved at ``path`` (lorakit or PEFT layout) into adapter ``adapter_name``
    (default: the active one) of ``model``, in place, bit for bit: to resume, or to go back to a
    Trainer's best checkpoint.  Unlike :func:`lorakit.load_adapter` nothing is injected.

    Raises:
        AdapterFileError: the directory or its files are missing or corrupt.
        AdapterMismatchError: a key missing or extra, a shape that differs, or (with ``strict``) an
            adapter trained on another base model.  Nothing is changed then.
    """
    adapter = read_adapter(path)
    name = _adapter_to_use(model, adapter_name)
    if strict:
        _check_fingerprint(model, name, adapter)
    found = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterMismatchError(f"{adapter.path / WEIGHTS_NAME}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        found[key[len(PREFIX):]] = tensor
    values = _match(model, name, found, str(adapter.path / WEIGHTS_NAME))
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for internal, value in values.items():
            params[internal].copy_(value)


class PeftKeyLoader:
    """``load_state_dict`` hooks for PEFT-layout adapter keys (see the module docstring).

    The pre-hook (``__call__``) maps the keys onto the adapter's parameters; ``after``, the post-hook,
    drops the model's other keys from the missing keys of that load (an adapter file holds no base
    weights).  A state dict without PEFT keys passes through both untouched.
    """

    def __init__(self, adapter_name: str | None) -> None:
        self.adapter_name = adapter_name
        self._loaded_under: str | None = None  # the prefix of the load in progress that held PEFT keys

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        self._loaded_under = None  # (a load that raised after the last pre-hook never reached ``after``)
        head = prefix + PREFIX
        keys = [k for k in state_dict if k.startswith(head)]
        if not keys:
            return
        found = {k[len(head):]: state_dict[k] for k in keys}
        values = _match(module, _adapter_to_use(module, self.adapter_name), found, "the state dict being loaded")
        for k in keys:
            del state_dict[k]
        for internal, value in values.items():
            state_dict[prefix + internal] = value
        self._loaded_under = prefix

    def after(self, module: nn.Module, incompatible_keys: Any) -> None:
        prefix, self._loaded_under = self._loaded_under, None
        if prefix is not None:
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded_under": None}


def register_accelerate_hooks(accelerator: Any, adapter_name: str | None = None) -> tuple[Any, Any]:
    """Make ``accelerator.save_state(dir)`` save each prepared lorakit model as an adapter directory
    ``dir/lorakit_adapter`` (``lorakit_adapter_<i>`` for the i-th model, i > 0; PEFT layout, only the
    main process writes) instead of a whole-model weights file, and ``accelerator.load_state(dir)`` copy
    it back into the model (:func:`load_adapter_weights`).  Optimizers, schedulers, RNG and dataloaders
    are saved and restored by Accelerate as usual.  Models without a lorakit adapter are left to
    Accelerate.  Returns the two hooks' removable handles.
    """

    def lorakit_models(models: list) -> list[tuple[int, nn.Module]]:
        unwrapped = [(i, accelerator.unwrap_model(m)) for i, m in enumerate(models)]
        return [(i, m) for i, m in unwrapped if adapter_names(m)]

    def on_save(models: list, weights: list, output_dir: str) -> None:
        for i, model in reversed(lorakit_models(models)):
            if accelerator.is_main_process:
                save_adapter(model, Path(output_dir) / _accelerate_dir(i), _adapter_to_use(model, adapter_name))
            if i < len(weights):  # empty under FSDP / DeepSpeed, which save through their own engines
                weights.pop(i)

    def on_load(models: list, input_dir: str) -> None:
        for i, model in reversed(lorakit_models(models)):
            load_adapter_weights(model, Path(input_dir) / _accelerate_dir(i), adapter_name)
            models.pop(i)

    return accelerator.register_save_state_pre_hook(on_save), accelerator.register_load_state_pre_hook(on_load)


def _accelerate_dir(i: int) -> str:
    return ACCELERATE_DIR if i == 0 else f"{ACCELERATE_DIR}_{i}"


def _adapter_to_use(model: nn.Module, adapter_name: str | None) -> str:
    names = adapter_names(model)
    if adapter_name is None:
        active = active_adapters(model)
        adapter_name = active[0] if len(active) == 1 else "default"
    if adapter_name not in names:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; the model has {names or 'no lorakit adapters'}")
    return adapter_name


@dataclasses.dataclass
class _Slot:
    """Where one tensor of the adapter file goes: the live tensor's name in ``model.state_dict()``, the
    shapes in the file and in the model, and, for PiSSA / OLoRA factors, which the file stores as
    [trained; initial] (A: rows, ``dim`` 0; B: columns, ``dim`` 1; see lorakit.io), the fixed part."""

    internal: str
    saved_shape: tuple[int, ...]
    live_shape: tuple[int, ...]
    dim: int | None = None
    fixed: Tensor | None = None

    def from_file(self, value: Tensor, key: str, where: str) -> Tensor:
        """The live tensor's value from the file's ``value`` (shape already checked)."""
        if self.dim is None:
            return value.reshape(self.live_shape)
        r = value.shape[self.dim] - self.fixed.shape[self.dim]
        if not torch.equal(value.narrow(self.dim, r, self.fixed.shape[self.dim]), self.fixed):
            raise AdapterMismatchError(
                f"{where}: {PREFIX + key} holds another initial factor than this model's PiSSA/OLoRA init; "
                "prepare the model from the same base with the same init before resuming"
            )
        return value.narrow(self.dim, 0, r).reshape(self.live_shape)

    def to_file(self, value: Tensor) -> Tensor:
        """The file's tensor for the live value ``value`` (the inverse of :meth:`from_file`)."""
        if self.dim is None:
            return value.reshape(self.saved_shape)
        head = list(self.saved_shape)
        head[self.dim] -= self.fixed.shape[self.dim]
        return torch.cat([value.reshape(head).to(self.fixed.dtype), self.fixed], self.dim)


def _plan(model: nn.Module, adapter_name: str) -> dict[str, _Slot]:
    """Relative PEFT key → its :class:`_Slot`, for every tensor lorakit.save_adapter writes for the adapter."""
    names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    names |= {id(t): n for n, t in model.named_buffers(remove_duplicate=False)}
    plan = {}
    for qualified, module in _modules_with(model, adapter_name):
        live = layer_params(module, adapter_name)
        converted = isinstance(module, LoraLayer) and adapter_name in module.init_factors
        for key, tensor in _layer_tensors(module, adapter_name).items():
            slot = _Slot(names[id(live[key])], tuple(tensor.shape), tuple(live[key].shape))
            if converted and key != MAGNITUDE:
                slot.dim = 0 if key == factor_keys(module)[0] else 1
                r = live[key].shape[slot.dim]
                slot.fixed = tensor.narrow(slot.dim, r, tensor.shape[slot.dim] - r).detach().cpu().clone()
            plan[f"{qualified}.{key}"] = slot
    return plan


def _match(model: nn.Module, adapter_name: str, found: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """Internal state-dict name → value, for every tensor of the adapter; all of them must be in
    ``found`` (relative PEFT keys) with their saved shape, and nothing else."""
    plan = _plan(model, adapter_name)
    missing, unexpected = sorted(set(plan) - set(found)), sorted(set(found) - set(plan))
    if missing:
        raise AdapterMismatchError(
            f"{where}: missing key {PREFIX + missing[0]!r} ({len(missing)} in all) of adapter {adapter_name!r}; "
            "was it saved from a model prepared with the same LoraConfig?"
        )
    if unexpected:
        raise AdapterMismatchError(
            f"{where}: unexpected key {PREFIX + unexpected[0]!r} ({len(unexpected)} in all): adapter {adapter_name!r} "
            "has no such tensor; was it saved from a model prepared with the same LoraConfig?"
        )
    out = {}
    for key, slot in plan.items():
        value = found[key]
        if tuple(value.shape) != slot.saved_shape:
            raise AdapterMismatchError(
                f"{where}: {PREFIX + key} has shape {tuple(value.shape)}, adapter {adapter_name!r} needs {slot.saved_shape}")
        out[slot.internal] = slot.from_file(value.cpu(), key, where)
    return out


def _rewrite_from_state_dict(model: nn.Module, adapter_name: str, path: Path, state_dict: Mapping[str, Tensor]) -> None:
    """Replace the tensors of the adapter file at ``path`` by their values in ``state_dict``."""
    plain = {_strip_wrappers(k): v for k, v in state_dict.items()}
    tensors = {}
    for key, slot in _plan(model, adapter_name).items():
        value = plain.get(_strip_wrappers(slot.internal))
        if value is None:
            raise AdapterMismatchError(
                f"the state dict handed to save_pretrained has no {slot.internal!r} (adapter {adapter_name!r})")
        tensors[PREFIX + key] = slot.to_file(value.detach().to("cpu")).contiguous()
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    save_file(tensors, str(path), metadata=metadata)


def _strip_wrappers(name: str) -> str:
    for wrapper in _WRAPPER_PREFIXES:
        name = name.replace(wrapper, "")
    return name


__all__ = [
    "ACCELERATE_DIR",
    "TRAINER_WEIGHTS_NAME",
    "PeftKeyLoader",
    "TrainerSetupError",
    "disable_peft_checkpoints",
    "enable_peft_checkpoints",
    "get_lora_model",
    "load_adapter_weights",
    "register_accelerate_hooks",
    "save_pretrained",
]
