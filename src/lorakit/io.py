"""Adapter files: the contract with the ecosystem.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` in HF PEFT's
layout (tensor keys and shapes: :mod:`lorakit.peft_keys`), so PEFT and vLLM load lorakit's adapters and
lorakit loads theirs.

lorakit's extra facts (its version, the base-model fingerprint) go into the safetensors metadata,
which PEFT ignores.  This is the only module that reads or writes files.  It never unpickles.
Saving is atomic (a crash never damages an existing adapter); loading is validated completely
before the model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapters import active_adapters, adapter_names, delete_adapter
from .atomic import write_dir
from .config import MUTATING_INITS, LoraConfig, init_kind, training_only_variant
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    AdapterNameError,
    ConfigError,
    LorakitError,
    UnsupportedFeatureError,
    UnsupportedModuleError,
)
from .fingerprint import describe_mismatch, dumps, fingerprint
from .inject import candidates as candidates_of
from .inject import resolve_parameters, resolve_tokens, unmerged_base_weight, inject, name_matches, resolve_modules_to_save, resolve_targets, state_of
from .layers import LoraLayer, LoraLinear, LoraMultiheadAttention, LoraParameter
from .modules_to_save import ModulesToSave, TrainableTokens
from .jsonfile import dumps as strict_dumps
from .peft_keys import (
    MAGNITUDE,
    PREFIX,
    TOKENS,
    factor_keys,
    factor_shapes,
    layer_keys,
    magnitude_shape,
    split_lora_key,
    training_variant_shapes,
)
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
#: safetensors dtypes an adapter's tensors may have: floating point for LoRA factors; the integer and
#: bool types only for modules_to_save buffers of exactly that dtype (e.g. BatchNorm's counter)
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
INT_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
              "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
FINGERPRINT_KEY = "lorakit_base_fingerprint"


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
        """The base-model fingerprint lorakit recorded, or None (checked: AdapterFileError if corrupt)."""
        return parse_fingerprint(self.metadata.get(FINGERPRINT_KEY), self.path / WEIGHTS_NAME)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a JSON object naming a key twice is ambiguous (parsers keep different ones)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return out


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str | bytes, where: Path, what: str = "") -> object:
    """Parse ``text`` as strict JSON: no NaN/Infinity, no duplicate keys, bounded nesting and integers.

    Raises:
        AdapterFileError: naming ``where`` and what is wrong.
    """
    what = what or str(where)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey as err:
        raise AdapterFileError(f"{what}: key {str(err)[:80]!r} appears twice; the file is corrupt or hand-edited (keep one)") from None
    except RecursionError:
        raise AdapterFileError(f"{what} is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, over-long integers
        raise AdapterFileError(f"{what} is not valid JSON: {str(err)[:200]}") from None


def parse_fingerprint(text: str | None, where: Path) -> dict | None:
    """The ``lorakit_base_fingerprint`` metadata entry as a dict {"modules": {name: shape}, "checksum": str}."""
    if text is None:
        return None
    fix = "the file is damaged; re-save the adapter with lorakit (or use the copy you trained)"
    fp = strict_json(text, where, f"{where}: metadata {FINGERPRINT_KEY}")
    modules = fp.get("modules") if isinstance(fp, dict) else None
    if (
        not isinstance(fp, dict)
        or not isinstance(modules, dict)
        or not isinstance(fp.get("checksum"), str)
        or not all(isinstance(s, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in s)
                   for s in modules.values())
    ):
        raise AdapterFileError(
            f"{where}: metadata {FINGERPRINT_KEY} is not a fingerprint (an object with 'modules' {{name: shape}} and "
            f"a 'checksum' string); {fix}"
        )
    return fp


def _read_header(weights_path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The safetensors header (tensor key → {dtype, shape, data_offsets}) and metadata, parsed strictly:
    a key given twice is refused (the safetensors library would silently keep the last)."""
    corrupt = f"{weights_path} is corrupt or truncated"
    try:
        with open(weights_path, "rb") as f:
            prefix = f.read(8)
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise AdapterFileError(f"{corrupt}: its header length field is invalid; re-save or re-download it")
            raw = f.read(n)
    except OSError as err:
        raise AdapterFileError(f"{weights_path} cannot be read: {err}") from None
    header = strict_json(raw, weights_path, f"{corrupt}: header")
    if not isinstance(header, dict):
        raise AdapterFileError(f"{corrupt}: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{corrupt}: __metadata__ must map strings to strings")
    for key, info in header.items():
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
        )
        if not ok:
            raise AdapterFileError(f"{corrupt}: the header entry of {key[:200]!r} is malformed")
        dtype, parts = info["dtype"], split_lora_key(key)
        if parts is not None and parts[1] != MAGNITUDE and (len(info["shape"]) < 2 or 0 in info["shape"]):
            raise AdapterFileError(
                f"{weights_path}: tensor {key[:200]!r} has shape {tuple(info['shape'])[:8]}; LoRA factors are non-empty "
                "matrices (r ≥ 1) — the file is damaged or not a LoRA adapter"
            )
        if dtype not in FLOAT_DTYPES and (dtype not in INT_DTYPES or parts is not None):
            allowed = ", ".join(FLOAT_DTYPES)
            raise AdapterFileError(
                f"{weights_path}: tensor {key[:200]!r} is stored as {dtype[:20]}; LoRA tensors must be floating point "
                f"({allowed}) — convert it (e.g. tensor.float()) and save again"
            )
    return header, metadata


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter directory without touching any model.

    Every tensor must be finite and of a floating-point dtype (F16, BF16, F32, F64; integer/bool
    tensors only outside the LoRA factors, for modules_to_save buffers), the safetensors header and
    adapter_config.json must be strict JSON without duplicate keys, and lorakit's fingerprint metadata
    (when present) must be well formed.

    Raises:
        AdapterFileError: missing directory or file, a pickle-only adapter, invalid JSON, a corrupt /
            truncated safetensors file, a non-float or non-finite tensor, corrupt metadata.
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
        text = config_path.read_bytes().decode("utf-8")
    except OSError as err:
        raise AdapterFileError(f"{config_path} cannot be read: {err}") from None
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{config_path} is not valid JSON: {err}") from None
    raw = strict_json(text, config_path)
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object, not {type(raw).__name__}")
    config = LoraConfig.from_peft_dict(raw, source=str(config_path))
    header, _ = _read_header(weights_path)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            if sorted(keys) != sorted(header):
                raise AdapterFileError(f"{weights_path} is corrupt: its header does not list its tensors consistently")
            tensors = {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{weights_path} is corrupt or truncated: {str(err)[:200]}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(
                f"{weights_path}: tensor {key!r} holds NaN or infinite values; the adapter is broken (training "
                "diverged or the file is damaged) — use an earlier checkpoint"
            )
    parse_fingerprint(metadata.get(FINGERPRINT_KEY), weights_path)
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
    if isinstance(module, TrainableTokens):
        return {TOKENS: module.copies[adapter_name]}
    if isinstance(module, ModulesToSave):
        return dict(module.copies[adapter_name].state_dict())
    parts = _parts(module, adapter_name)
    A, B = parts["A"], parts["B"]
    if adapter_name in module.init_factors:  # PiSSA / OLoRA: ΔW = s·(BA − B₀A₀) against the original W
        A0, B0 = module.init_factors[adapter_name]
        A, B = torch.cat([A.detach(), A0.to(A.dtype)], 0), torch.cat([B.detach(), -B0.to(B.dtype)], 1)
    if adapter_name in getattr(module, "blocks", {}):  # BD-LoRA: the blocks as stored
        parts["A"], parts["B"] = A, B
    else:
        a_shape, b_shape = factor_shapes(module, A.shape[0])
        parts["A"], parts["B"] = A.reshape(a_shape), B.reshape(b_shape)
    if "magnitude" in parts:
        parts["magnitude"] = parts["magnitude"].reshape(magnitude_shape(module))
    return {key: parts[part] for key, part in _layer_keys(module, adapter_name).items()}


def _parts(module: LoraLayer, adapter_name: str) -> dict[str, Tensor]:
    """The live parameters of one layer's adapter, by the part names of :func:`peft_keys.layer_keys`."""
    parts = {"A": module.lora_A[adapter_name], "B": module.lora_B[adapter_name]}
    if adapter_name in module.lora_magnitude:
        parts["magnitude"] = module.lora_magnitude[adapter_name]
    if adapter_name in module.lora_bias:
        parts["bias"] = module.lora_bias[adapter_name]
    if isinstance(module, LoraMultiheadAttention):
        parts["out_A"], parts["out_B"] = module.out_A[adapter_name], module.out_B[adapter_name]
    return parts


def _layer_keys(module: LoraLayer, adapter_name: str) -> dict[str, str]:
    return layer_keys(module, dora=adapter_name in module.lora_magnitude, bias=adapter_name in module.lora_bias)


def _saved_targets(model: nn.Module, adapter_name: str) -> list[str]:
    """The shortest target_modules list that selects exactly the adapted modules: leaf names when
    they suffice (what vLLM expects), else full names."""
    from .inject import candidates

    adapted = {name for name, m in _modules_with(model, adapter_name)
               if isinstance(m, LoraLayer) and not isinstance(m, LoraParameter)}
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
    parameters = sorted({f"{name.removesuffix('.base_layer' * name.count('.base_layer'))}.{m.parameter_name}"
                         for name, m in _modules_with(model, adapter_name) if isinstance(m, LoraParameter)})
    saved = config.replace(target_modules=_saved_targets(model, adapter_name) if config.target_modules else None,
                           exclude_modules=None, target_parameters=parameters or None)
    if any(isinstance(m, LoraLayer) and adapter_name in m.init_factors for _, m in _modules_with(model, adapter_name)):
        saved = _converted_config(saved)
    peft_config = saved.to_peft_dict(fan_in_fan_out=fan_in_fan_out)
    peft_config["base_model_name_or_path"] = name_or_path
    metadata = {
        "format": "pt",
        "lorakit_version": __version__,
        "lorakit_base_fingerprint": dumps(state.fingerprints[adapter_name]),
    }
    quantized = sorted({"nf4" for _, m in _modules_with(model, adapter_name) if isinstance(m, LoraLayer) and m.quantized()})
    if quantized:  # trained over a 4-bit base; the adapter itself applies to the full-precision base as well
        metadata["lorakit_base_quantization"] = quantized[0]

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(strict_dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return write_dir(path, fill)


def _converted_config(config: LoraConfig) -> LoraConfig:
    """The config of a PiSSA / OLoRA adapter saved as a plain LoRA: rank 2r ([A; A₀], [B, −B₀]) at the same
    scale s — α doubled (rsLoRA: × √2) — and a plain init, as PEFT's ``path_initial_model_for_weight_conversion``."""
    grow = 2**0.5 if config.use_rslora else 2.0
    return config.replace(
        r=2 * config.r, alpha=grow * config.alpha, init="kaiming",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
    )


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
        parameters = resolve_parameters(model, config)
        tokens = resolve_tokens(model, config)
    except (UnsupportedFeatureError, UnsupportedModuleError):
        raise
    except LorakitError as err:
        raise AdapterMismatchError(f"{adapter.path / CONFIG_NAME} does not fit this model: {err}") from None
    expected = _expected_shapes(model, config, targets, to_save) | _parameter_shapes(model, config, parameters)
    bases = {name: base for name, _, base in candidates_of(model)}
    expected |= {f"{name}.{TOKENS}": (len(ids), bases[name].embedding_dim) for name, ids in tokens.items()}
    found = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterMismatchError(f"{where}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        found[key[len(PREFIX):]] = tensor
    # PEFT saves a targeted embedding's full base weight too (save_embedding_layers, for resized
    # vocabularies) as <module>.base_layer.<param>; like PEFT, those values replace the base's.
    base_params = _saved_base_params(model, targets, found)
    skipped = training_variant_state(model, adapter, found, targets)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(base_params) - skipped)
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
            {n: unmerged_base_weight(in_tree[n]) for n in targets}
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
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    inject(model, config, adapter_name)
    try:
        destinations = {name + "." + key: param for name, module in _modules_with(model, adapter_name)
                        for key, param in layer_params(module, adapter_name).items()} | base_params
        values = {key: _converted(found[key], param, where, PREFIX + key) for key, param in destinations.items()}
        with torch.no_grad():
            for key, param in destinations.items():
                param.copy_(values[key])
        if not trainable:
            for name, module in _modules_with(model, adapter_name):
                for p in layer_params(module, adapter_name).values():
                    p.requires_grad_(False)
    except BaseException:
        delete_adapter(model, adapter_name)
        for p, flag in grad_flags:  # inject re-derived every flag from the active adapters
            p.requires_grad_(flag)
        raise
    return model


def _converted(value: Tensor, param: Tensor, where: Path, key: str) -> Tensor:
    """``value`` in ``param``'s shape, dtype and device, or an error if it does not fit exactly that well:
    a float parameter takes a float tensor that stays finite in its dtype; an integer or bool buffer
    takes a tensor of its own dtype."""
    if param.dtype.is_floating_point != value.dtype.is_floating_point or (
        not param.dtype.is_floating_point and value.dtype != param.dtype
    ):
        raise AdapterMismatchError(
            f"{where}: {key} is stored as {value.dtype}, the model's tensor is {param.dtype}; save the adapter from a "
            "model with the same dtypes"
        )
    out = value.reshape(param.shape).to(device=param.device, dtype=param.dtype)
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise AdapterMismatchError(
            f"{where}: {key} has values too large for {param.dtype} (they become infinite); load the base model "
            f"in a wider dtype (e.g. torch_dtype=torch.float32)"
        )
    return out


def training_variant_state(model: nn.Module, adapter: AdapterFile, found: dict[str, Tensor], targets: list[str]) -> set[str]:
    """The keys of ``found`` (relative to PEFT's prefix) that hold a training-only variant's state (VeLoRA's projection,
    MonteCLoRA's sampler) on one of the linear layers ``targets``, where PEFT saves it: not needed to compute the
    adapter's outputs (see ``config.TRAINING_ONLY_VARIANTS``), so callers skip them.  Empty for any other adapter;
    a key not in PEFT's place stays the caller's unexpected key.

    Raises:
        AdapterMismatchError: such a tensor has another shape than PEFT gives it on this model.
    """
    from .inject import candidates
    from .layers import wrap

    variant = training_only_variant(adapter.raw_config)
    if variant is None:
        return set()
    bases = {name: base for name, _, base in candidates(model)}
    skipped = set()
    for name in targets:
        probe = wrap(bases[name], name)  # a throw-away wrapper: just to read k and the layer kind
        if not isinstance(probe, LoraLinear):
            continue
        for key, shape in training_variant_shapes(*variant, probe, adapter.config.rank_for(name)).items():
            key = f"{name}.{key}"
            if key in found and tuple(found[key].shape) != shape:
                raise AdapterMismatchError(f"{adapter.path / WEIGHTS_NAME}: {PREFIX + key} has shape "
                                           f"{tuple(found[key].shape)}, this model needs {shape}")
            if key in found:
                skipped.add(key)
    return skipped


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
    if isinstance(module, TrainableTokens):
        return {TOKENS: module.copies[adapter_name]}
    if isinstance(module, ModulesToSave):
        copy = module.copies[adapter_name]
        return dict(copy.named_parameters()) | dict(copy.named_buffers())
    parts = _parts(module, adapter_name)
    return {key: parts[part] for key, part in _layer_keys(module, adapter_name).items()}


def _parameter_shapes(model: nn.Module, config: LoraConfig, parameters: list[tuple[str, list[str]]]) -> dict[str, tuple]:
    """PEFT keys → shapes for the target_parameters adapters: A (r·E, k), B (d, r·E) per wrapped parameter, the
    wrapper of the i-th of n parameters of a module (innermost first) at ``<module>`` + ``.base_layer`` × (n−1−i)."""
    from .inject import candidates

    modules = {name: module for name, module, _ in candidates(model)}
    shapes: dict[str, tuple] = {}
    for name, pnames in parameters:
        owner = modules[name].module() if isinstance(modules[name], LoraParameter) else modules[name]
        for i, pname in enumerate(pnames):
            key = f"{name}.{pname}"
            if not any(name_matches(e, key) for e in config.target_parameters or ()):
                continue
            probe = LoraParameter(owner, pname)  # reads the shape only; the module is not changed
            rE = config.rank_for(key) * probe.num_experts
            prefix = name + ".base_layer" * (len(pnames) - 1 - i)
            a_key, b_key = factor_keys(probe)
            shapes[f"{prefix}.{a_key}"] = (rE, probe.in_features)
            shapes[f"{prefix}.{b_key}"] = (probe.out_features, rE)
    return shapes


def _expected_shapes(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str]) -> dict[str, tuple]:
    from .inject import candidates
    from .layers import wrap

    bases = {name: base for name, _, base in candidates(model)}
    shapes: dict[str, tuple] = {}
    for name in targets:
        probe = wrap(bases[name], name)  # a throw-away wrapper: just to read k, d and the layout
        r = config.rank_for(name)
        a, b = config.bd_blocks(name)
        if (a, b) != (1, 1):  # BD-LoRA: A stored (r, k/a), B (d, r/b)
            a_shape, b_shape = (r, probe.in_features // a), (probe.out_features, r // b)
        else:
            a_shape, b_shape = factor_shapes(probe, r)
        part_shapes = {"A": a_shape, "B": b_shape, "bias": (probe.out_features,)}
        if config.use_dora:
            part_shapes["magnitude"] = magnitude_shape(probe)
        if isinstance(probe, LoraMultiheadAttention):
            e = probe.base_layer.embed_dim
            part_shapes["out_A"], part_shapes["out_B"] = (r, e), (e, r)
        for key, part in layer_keys(probe, dora=config.use_dora, bias=config.lora_bias).items():
            shapes[f"{name}.{key}"] = part_shapes[part]
    for name in to_save:
        for key, tensor in bases[name].state_dict().items():
            shapes[f"{name}.{key}"] = tuple(tensor.shape)
    return shapes


__all__ = ["AdapterFile", "ConfigError", "load_adapter", "read_adapter", "save_adapter", "adapter_state"]
