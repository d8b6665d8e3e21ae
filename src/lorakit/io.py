"""Adapter files: the contract with the ecosystem.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` in HF PEFT's
layout, so PEFT and vLLM load lorakit's adapters and lorakit loads theirs:

    base_model.model.<module path>.lora_A.weight        (r, k)       linear, Conv1D
    base_model.model.<module path>.lora_B.weight        (d, r)
    base_model.model.<module path>.lora_embedding_A     (r, num_embeddings)
    base_model.model.<module path>.lora_embedding_B     (dim, r)
    base_model.model.<module path>.lora_A.weight        (r, in, kh, kw)   Conv2d; B: (d, r, 1, 1)
    base_model.model.<module path>.lora_magnitude_vector  (d,)  DoRA's m ((1, d, 1, 1) for Conv2d)
    base_model.model.<module path>.<param>              modules_to_save

lorakit's extra facts (its version, the base-model fingerprint) go into the safetensors metadata,
which PEFT ignores.  This is the only module that reads or writes files.  It never unpickles.
Saving is atomic (a crash never damages an existing adapter); loading is validated completely
before the model is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapters import active_adapters, adapter_names, delete_adapter
from .config import MUTATING_INITS, LoraConfig, init_kind
from .errors import AdapterFileError, AdapterMismatchError, AdapterNameError, ConfigError, LorakitError
from .fingerprint import describe_mismatch, dumps, fingerprint
from .inject import unmerged_base_weight, inject, name_matches, resolve_modules_to_save, resolve_targets, state_of
from .layers import LoraEmbedding, LoraLayer, ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# PEFT's LoRA keys; in-memory PEFT state dicts also carry the adapter name ("...lora_A.default.weight").
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))?$"
)


def split_lora_key(key: str) -> tuple[str, str, str | None] | None:
    """(module path, kind, adapter name or None) of a PEFT LoRA tensor key, where kind is "lora_A",
    "lora_B", "lora_embedding_A", "lora_embedding_B" or "lora_magnitude_vector" (DoRA); None for any
    other key (modules_to_save)."""
    match = _LORA_KEY.match(key.removesuffix(".weight"))
    return (match["module"], match["kind"], match["adapter"]) if match else None


@dataclasses.dataclass
class AdapterFile:
    """An adapter directory's contents: config, tensors in PEFT keys, safetensors metadata."""

    path: Path
    config: LoraConfig
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    raw_config: dict

    @property
    def fingerprint(self) -> dict | None:
        text = self.metadata.get("lorakit_base_fingerprint")
        return json.loads(text) if text else None


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter directory without touching any model.

    Raises:
        AdapterFileError: missing directory or file, a pickle-only adapter, invalid JSON, or a
            corrupt / truncated safetensors file.
        ConfigError: the config is valid JSON but not a LoRA config lorakit can apply.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path} is not a directory; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path} is missing; is {path} an adapter directory (saved by lorakit or PEFT)?")
    if not weights_path.is_file():
        pickled = [n for n in _PICKLE_NAMES if (path / n).exists()]
        if pickled:
            raise AdapterFileError(
                f"{path / pickled[0]} is a pickle file, which lorakit never loads (it can run code); "
                f"convert it to {WEIGHTS_NAME} with PEFT (save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterFileError(f"{weights_path} is missing")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object, not {type(raw).__name__}")
    config = LoraConfig.from_peft_dict(raw, source=str(config_path))
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{weights_path} is corrupt or truncated: {err}") from None
    return AdapterFile(path, config, tensors, metadata, raw)


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors under their PEFT keys (detached, contiguous, CPU)."""
    out: dict[str, Tensor] = {}
    for name, module in _modules_with(model, adapter_name):
        for key, tensor in _layer_tensors(module, adapter_name).items():
            out[PREFIX + name + "." + key] = tensor.detach().to("cpu").contiguous()
    return out


def _modules_with(model: nn.Module, adapter_name: str):
    from .inject import lora_modules

    for name, module in lora_modules(model):
        if (isinstance(module, LoraLayer) and adapter_name in module.lora_A) or (
            isinstance(module, ModulesToSave) and adapter_name in module.copies
        ):
            yield name, module


def _layer_tensors(module: LoraLayer | ModulesToSave, adapter_name: str) -> dict[str, Tensor]:
    """Relative key → tensor in PEFT's shapes, for one layer."""
    if isinstance(module, ModulesToSave):
        return dict(module.copies[adapter_name].state_dict())
    A, B = module.lora_A[adapter_name], module.lora_B[adapter_name]
    if adapter_name in module.init_factors:  # PiSSA / OLoRA: ΔW = s·(BA − B₀A₀) against the original W
        A0, B0 = module.init_factors[adapter_name]
        A, B = torch.cat([A.detach(), A0.to(A.dtype)], 0), torch.cat([B.detach(), -B0.to(B.dtype)], 1)
    out = {k: t.reshape(shape) for k, (t, shape) in zip(_keys(module), zip((A, B), _factor_shapes(module, A.shape[0])))}
    if adapter_name in module.lora_magnitude:
        out["lora_magnitude_vector"] = module.lora_magnitude[adapter_name].reshape(_magnitude_shape(module))
    return out


def _keys(module: LoraLayer) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if isinstance(module, LoraEmbedding) else ("lora_A.weight", "lora_B.weight")


def _factor_shapes(module: LoraLayer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT's shapes of A and B at rank r for this layer."""
    k, d = module.in_features, module.out_features
    if module.layout == "conv":
        return (r, *module.base_weight().shape[1:]), (d, r, 1, 1)
    return (r, k), (d, r)


def _magnitude_shape(module: LoraLayer) -> tuple[int, ...]:
    return (1, module.out_features, 1, 1) if module.layout == "conv" else (module.out_features,)


def _saved_targets(model: nn.Module, adapter_name: str) -> list[str]:
    """The shortest target_modules list that selects exactly the adapted modules: leaf names when
    they suffice (what vLLM expects), else full names."""
    from .inject import candidates

    adapted = {name for name, m in _modules_with(model, adapter_name) if isinstance(m, LoraLayer)}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = {name for name, _, _ in candidates(model) if any(name_matches(leaf, name) for leaf in leaves)}
    return leaves if selected == adapted else sorted(adapted)


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a PEFT-layout directory, atomically.

    The files are written into a temporary directory beside ``path`` and swapped in with one
    rename, so an existing adapter at ``path`` is replaced whole or not at all.
    """
    if adapter_name is None:
        active = active_adapters(model)
        adapter_name = active[0] if len(active) == 1 else "default"
    if adapter_name not in adapter_names(model):
        raise AdapterNameError(f"no adapter named {adapter_name!r} to save; the model has {adapter_names(model)}")
    state = state_of(model)
    config = state.configs[adapter_name]
    tensors = adapter_state(model, adapter_name)
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterMismatchError(f"adapter {adapter_name!r} has non-finite values in {bad[0]}; refusing to save it")
    name_or_path = base_model_name_or_path or config.base_model_name_or_path
    if name_or_path is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    fan_in_fan_out = any(getattr(m, "layout", "") == "transposed" for _, m in _modules_with(model, adapter_name))
    saved = config.replace(target_modules=_saved_targets(model, adapter_name), exclude_modules=None)
    if any(isinstance(m, LoraLayer) and adapter_name in m.init_factors for _, m in _modules_with(model, adapter_name)):
        saved = _converted_config(saved)
    peft_config = saved.to_peft_dict(fan_in_fan_out=fan_in_fan_out)
    peft_config["base_model_name_or_path"] = name_or_path
    from . import __version__

    metadata = {
        "format": "pt",
        "lorakit_version": __version__,
        "lorakit_base_fingerprint": dumps(state.fingerprints[adapter_name]),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for child in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME, tmp):
            fsync(child)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _converted_config(config: LoraConfig) -> LoraConfig:
    """The config of a PiSSA / OLoRA adapter saved as a plain LoRA: rank 2r ([A; A₀], [B, −B₀]) at the same
    scale s — α doubled (rsLoRA: × √2) — and a plain init, as PEFT's ``path_initial_model_for_weight_conversion``."""
    grow = 2**0.5 if config.use_rslora else 2.0
    return config.replace(
        r=2 * config.r, alpha=grow * config.alpha, init="kaiming",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
    )


def fsync(path: str | os.PathLike) -> None:
    """Flush a file or directory to disk (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target`` atomically; the old ``target`` ends up at ``new``.

    Uses renameat2(RENAME_EXCHANGE) where the OS has it; elsewhere two renames (a crash between
    them leaves the old directory at ``new``'s name, never a half-written one at ``target``).
    """
    if not target.exists():
        os.rename(new, target)
    else:
        libc_name = ctypes.util.find_library("c")
        renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
        at_fdcwd = -100
        if renameat2 is None or renameat2(at_fdcwd, bytes(new), at_fdcwd, bytes(target), _RENAME_EXCHANGE) != 0:
            old = new.with_name(new.name + ".old")
            os.rename(target, old)
            os.rename(new, target)
            os.rename(old, new)
    fsync(target.parent)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    trainable: bool = False,
    allow_base_mismatch: bool = False,
) -> nn.Module:
    """Inject the adapter saved at ``path`` (by lorakit or PEFT) into ``model`` and load its weights.

    Everything is checked before the model is changed: the files, every key (missing or
    unexpected keys are errors), every shape, and — when the file records one — the fingerprint of
    the base weights it was trained on (a different base is an error unless
    ``allow_base_mismatch``).  On any error the model is left exactly as it was.

    Args:
        trainable: leave the loaded adapter's parameters trainable (to continue training).
    """
    adapter = read_adapter(path)
    config = adapter.config
    where = adapter.path / WEIGHTS_NAME
    try:
        targets = resolve_targets(model, config)
        to_save = resolve_modules_to_save(model, config)
    except LorakitError as err:
        raise AdapterMismatchError(f"{adapter.path / CONFIG_NAME} does not fit this model: {err}") from None
    expected = _expected_shapes(model, config, targets, to_save)
    found = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterMismatchError(f"{where}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        found[key[len(PREFIX):]] = tensor
    # PEFT saves a targeted embedding's full base weight too (save_embedding_layers, for resized
    # vocabularies) as <module>.base_layer.<param>; like PEFT, those values replace the base's.
    base_params = _saved_base_params(model, targets, found)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(base_params))
    if missing:
        raise AdapterMismatchError(f"{where}: missing key {PREFIX + missing[0]!r} ({len(missing)} missing in all) for this model")
    if unexpected:
        raise AdapterMismatchError(
            f"{where}: unexpected key {PREFIX + unexpected[0]!r} ({len(unexpected)} in all): no such adapted module in this model"
        )
    for key, shape in expected.items() | {k: p.shape for k, p in base_params.items()}.items():
        if tuple(found[key].shape) != tuple(shape):
            raise AdapterMismatchError(f"{where}: {PREFIX + key} has shape {tuple(found[key].shape)}, this model needs {tuple(shape)}")
    saved_fp = adapter.fingerprint
    if saved_fp is not None and not allow_base_mismatch:
        from .inject import candidates

        in_tree = {name: module for name, module, _ in candidates(model)}
        current = fingerprint(
            {n: unmerged_base_weight(in_tree[n]) if isinstance(in_tree[n], LoraLayer) else in_tree[n].weight for n in targets}
        )
        problem = describe_mismatch(saved_fp, current)
        if problem:
            raise AdapterMismatchError(
                f"{adapter.path} was trained on another base model: {problem}. "
                "Pass allow_base_mismatch=True (CLI: --allow-base-mismatch) to load it anyway"
            )
    if adapter_name in adapter_names(model):
        raise AdapterNameError(f"the model already has an adapter named {adapter_name!r}; load under another name")
    if init_kind(config.init) in MUTATING_INITS:
        # A PiSSA / OLoRA file saved without conversion holds factors for the residual base it was trained
        # on: loading applies them to the model as given and never re-runs the init on its weights.
        config = config.replace(init="kaiming")
    inject(model, config, adapter_name)
    try:
        with torch.no_grad():
            for name, module in _modules_with(model, adapter_name):
                for key, param in layer_params(module, adapter_name).items():
                    param.copy_(found[name + "." + key].reshape(param.shape))
                if not trainable:
                    for p in layer_params(module, adapter_name).values():
                        p.requires_grad_(False)
            for key, param in base_params.items():
                param.copy_(found[key])
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    return model


def _saved_base_params(model: nn.Module, targets: list[str], found: dict[str, Tensor]) -> dict[str, Tensor]:
    """Relative key → base parameter, for the ``<target>.base_layer.<param>`` keys present in ``found``."""
    from .inject import candidates

    bases = {name: base for name, _, base in candidates(model) if name in set(targets)}
    return {
        f"{name}.base_layer.{pname}": param
        for name, base in bases.items()
        for pname, param in base.named_parameters()
        if f"{name}.base_layer.{pname}" in found
    }


def layer_params(module: LoraLayer | ModulesToSave, adapter_name: str) -> dict[str, Tensor]:
    """Relative PEFT key → the live parameter it loads into."""
    if isinstance(module, ModulesToSave):
        copy = module.copies[adapter_name]
        return dict(copy.named_parameters()) | dict(copy.named_buffers())
    keys = _keys(module)
    params = {keys[0]: module.lora_A[adapter_name], keys[1]: module.lora_B[adapter_name]}
    if adapter_name in module.lora_magnitude:
        params["lora_magnitude_vector"] = module.lora_magnitude[adapter_name]
    return params


def _expected_shapes(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str]) -> dict[str, tuple]:
    from .inject import candidates
    from .layers import wrap

    bases = {name: base for name, _, base in candidates(model)}
    shapes: dict[str, tuple] = {}
    for name in targets:
        probe = wrap(bases[name], name)  # a throw-away wrapper: just to read k, d and the layout
        r = config.rank_for(name)
        for key, shape in zip(_keys(probe), _factor_shapes(probe, r)):
            shapes[f"{name}.{key}"] = shape
        if config.use_dora:
            shapes[f"{name}.lora_magnitude_vector"] = _magnitude_shape(probe)
    for name in to_save:
        for key, tensor in bases[name].state_dict().items():
            shapes[f"{name}.{key}"] = tuple(tensor.shape)
    return shapes


__all__ = ["AdapterFile", "ConfigError", "load_adapter", "read_adapter", "save_adapter", "adapter_state"]
