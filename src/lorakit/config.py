"""LoraConfig: what to adapt and how, validated once, written as PEFT's adapter_config.json.

The seed's numbers live here: rank r, alpha α and the scale s = α / r (rsLoRA: s = α / √r).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError, PlainLoraVariantWarning, UnsupportedFeatureError
from .patterns import check_pattern, short, suffix_matches

ALL_LINEAR = "all-linear"
#: Initialisations of A and B; "pissa_niter_<K>" is "pissa" by a K-iteration randomised SVD.
INITS = ("kaiming", "gaussian", "nonzero", "pissa", "olora")
#: Inits that move part of W into the adapter (W ← W − s·B₀A₀): the base weight changes.
MUTATING_INITS = ("pissa", "olora")
_INIT_TO_PEFT = {"kaiming": True, "nonzero": False}


def init_kind(init: str) -> str:
    """The INITS entry an init string names ("pissa_niter_4" → "pissa")."""
    return "pissa" if re.fullmatch(r"pissa_niter_[1-9][0-9]*", init) else init

# adapter_config.json keys that PEFT writes and that lorakit understands.
_PEFT_KEYS = {
    "r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target_modules",
    "exclude_modules": "exclude_modules",
    "use_rslora": "use_rslora",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "modules_to_save": "modules_to_save",
    "base_model_name_or_path": "base_model_name_or_path",
    "task_type": "task_type",
    "lora_bias": "lora_bias",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "use_bdlora": "use_bdlora",
}
# PEFT options whose non-default values lorakit does not implement: key -> (neutral values, what it is).
# A file that sets one is refused by name rather than loaded into something that computes differently.
_UNSUPPORTED_PEFT_OPTIONS: dict[str, tuple[tuple, str]] = {
    "use_dora": ((False, None), "DoRA (use_dora)"),
    "kasa_config": ((None, {}), "KaSA (kasa_config)"),
    "use_bdlora": ((None, {}, False), "BD-LoRA (use_bdlora)"),
    "arrow_config": ((None, {}), "Arrow routing (arrow_config)"),
    "alora_invocation_tokens": ((None, []), "Activated LoRA (alora_invocation_tokens)"),
    "use_qalora": ((False, None), "QA-LoRA (use_qalora)"),
    "layer_replication": ((None, []), "layer replication (layer_replication)"),
    "megatron_config": ((None, {}), "Megatron parallel layers (megatron_config)"),
    "layers_to_transform": ((None, []), "layers_to_transform"),
    "layers_pattern": ((None, [], ""), "layers_pattern"),
}
# PEFT LoRA variants that change only how an adapter trains, never what it computes once trained: in PEFT 0.21
# (tuners/lora/variants.py) both compute h = W x + s · B (A x) from the saved lora_A / lora_B whenever the layer is in
# eval mode, and both merge s · B A exactly as plain LoRA does.
#  - VeLoRA (VeloraLinearVariant, velora.py): in training mode with grad enabled, A runs through VeloraFunction,
#    whose forward is F.linear(x, A) as well; only its backward differs: it keeps a projection of each group of x's
#    features onto lora_velora_embed instead of x, so A's gradient is approximate (saves activation memory).
#  - MonteCLoRA (MontecloraLinearVariant, monteclora.py): in training mode A is replaced by a weighted mixture of
#    sampled perturbations A + ε drawn by lora_monteclora_sampler (plus a KL loss); out of training mode it uses A.
# A file of either therefore loads as plain LoRA with PEFT's outputs; lorakit trains it on as plain LoRA (no
# compression, no sampling), hence the warning.  Their extra saved tensors: peft_keys.training_variant_shapes.
#: adapter_config.json key -> (name, the sub-config field that sizes its saved state, PEFT's default for it)
TRAINING_ONLY_VARIANTS: dict[str, tuple[str, str, int]] = {
    "velora_config": ("VeLoRA", "num_groups", 64),
    "monteclora_config": ("MonteCLoRA", "num_samples", 8),
}


def training_only_variant(data: Mapping[str, Any], source: str = "adapter_config.json") -> tuple[str, int] | None:
    """(adapter_config key, the size its saved state depends on) of the training-only variant (VeLoRA: num_groups,
    MonteCLoRA: num_samples) an adapter_config.json uses, or None.

    Raises:
        ConfigError: the sub-config is not a JSON object or its size is not an integer ≥ 1.
        UnsupportedFeatureError: it is combined with another LoRA variant (PEFT builds no such combination).
    """
    used = [key for key in TRAINING_ONLY_VARIANTS if data.get(key) is not None]
    if not used:
        return None
    key = used[0]
    name, field, default = TRAINING_ONLY_VARIANTS[key]
    others = [TRAINING_ONLY_VARIANTS[k][0] for k in used[1:]]
    others += [what for flag, what in (("use_dora", "DoRA"), ("use_bdlora", "BD-LoRA")) if data.get(flag)]
    others += ["MiCA"] if data.get("init_lora_weights") == "mica" else []
    if others:
        raise UnsupportedFeatureError(f"{source}: this adapter combines {name} ({key}) with {others[0]}, which PEFT does "
                                      "not build either; lorakit does not support the combination")
    sub = data[key]
    if not isinstance(sub, Mapping):
        raise ConfigError(f"{source}: {key} must be a JSON object of PEFT's {name} options, got {short(sub)}")
    size = sub.get(field, default)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{source}: {key}.{field} must be an integer ≥ 1, got {short(size)}")
    return key, size


# init_lora_weights values whose adapters are plain LoRA once trained (only the starting point differs), and those
# that change the base weights (the file's B·A is relative to a modified W, unless PEFT converted it on saving).
_PLAIN_PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_BASE_CHANGING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}


def unsupported(data: Mapping[str, Any], fields: set[str] | None = None) -> str | None:
    """The PEFT feature an adapter_config.json uses that lorakit does not implement, or None.

    ``fields``: LoraConfig fields that exist (an option that became a field is supported)."""
    fields = fields if fields is not None else {f.name for f in dataclasses.fields(LoraConfig)}
    for key, (neutral, what) in _UNSUPPORTED_PEFT_OPTIONS.items():
        if key not in fields and data.get(key) not in neutral:
            return what
    init = data.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        return f"init_lora_weights={short(init)}"
    if init not in _PLAIN_PEFT_INITS:
        base = init.split("_niter")[0] if isinstance(init, str) else init
        if base not in INITS:  # an init lorakit implements is its business (it knows how to load such files)
            name = _BASE_CHANGING_INITS.get(base)
            return f"init_lora_weights={short(init)}" + (f" ({name}, which changes the base weights)" if name else "")
    if data.get("bias", "none") not in ("none", None):
        return f"bias={short(data['bias'])} (training the base models' biases)"
    return None


#: the largest rank accepted (far above any useful LoRA rank; keeps a typo or a corrupt file from
#: asking for a tensor that cannot be allocated)
MAX_RANK = 1 << 16


def pattern_matches(pattern: str, module_name: str) -> bool:
    """PEFT's rule for rank_pattern / alpha_pattern keys: the name, or a dotted suffix, as a regex
    (matched in bounded time; see :mod:`lorakit.patterns`)."""
    return suffix_matches(pattern, module_name)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """How to adapt a model with LoRA; immutable and validated on construction.

    The adapted layer computes ``h = W x + s · B (A x)`` with ``A: (r, k)`` and ``B: (d, r)``.

    Args:
        r: rank of the update BA; r ≥ 1.
        alpha: α in the scale s = α / r (or α / √r with ``use_rslora``); α > 0.
        dropout: probability of zeroing an input element of the low-rank branch; 0 ≤ p < 1.
        target_modules: which modules to adapt. A list: each entry is a module's full dotted
            name or a dotted suffix of it ("q_proj" matches "model.layers.0.self_attn.q_proj").
            A string: a regular expression that must match the whole name. ``"all-linear"``:
            every Linear / Conv1D except the model's output head.
        exclude_modules: names (list, same rule) or a regex (string) never to adapt.
        init: PEFT's ``init_lora_weights``: "kaiming" (A Kaiming-uniform, B zero; PEFT's default, True),
            "gaussian" (A ~ N(0, 1/r²), B zero), "nonzero" (A and B both random, so the adapter changes the
            output from the start — PEFT's False; for tests and debugging), "pissa" / "pissa_niter_K"
            (A, B from the top-r SVD of W, exact or by K randomised-SVD iterations) or "olora" (from the QR
            of W). PiSSA and OLoRA move s·B₀A₀ out of the base weight (W ← W − s·B₀A₀), so the output is
            unchanged; saving then writes the plain rank-2r LoRA [A; A₀], [B, −B₀] against the original W
            (PEFT's conversion, r and α doubled), which any LoRA loader applies to the unmodified base.
            Embedding adapters always start as PEFT's do: A = 0, B ~ N(0, 1) ("nonzero": both N(0, 1)).
        use_dora: DoRA — each adapted weight becomes m ⊙ (W + s·B A) / ‖W + s·B A‖ (row norms) with a
            trained magnitude m (d,), initialised to the norms (see :mod:`lorakit.ops.dora`).
        use_rslora: rank-stabilised scaling s = α / √r.
        rank_pattern / alpha_pattern: per-module overrides of r / α; keys are matched like PEFT
            does (a module name or dotted suffix, as a regex).
        modules_to_save: modules (same matching rule as a target list) trained and saved whole,
            e.g. a classifier head.
        lora_bias: give each adapter a trainable bias b on B: h = W x + s · (B (A x) + b)
            (PEFT's ``lora_bias``; merging adds s·b to the base bias).
        target_parameters: parameters to adapt directly, by name or dotted suffix of
            ``<module>.<parameter>`` (PEFT's ``target_parameters``, e.g. the 3-D expert weights of
            MoE layers, ``["experts.gate_up_proj"]``); the module's forward sees P + ΔP.
        trainable_token_indices: embedding rows trained outright (PEFT's trainable tokens):
            ``{"embed_tokens": [0, 5]}``, or a list for the model's input embeddings.
        use_bdlora: BD-LoRA (PEFT's ``BdLoraConfig`` as a dict): ``{"target_modules_bd_a": [...],
            "target_modules_bd_b": [...], "nblocks": n, "match_strict": bool}`` — the targets whose leaf
            name contains a ``_bd_a`` pattern get a block-diagonal A (n blocks), ``_bd_b`` a block-diagonal
            B; linear layers only.
        strict_targets: every target_modules / modules_to_save / target_parameters entry must
            match something (catches typos). Configs read from adapter files set it False and are
            matched as PEFT matches them (unmatched entries ignored, modules_to_save by suffix).
        base_model_name_or_path / task_type: recorded in adapter_config.json for other tools.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    init: str = "kaiming"
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: tuple[str, ...] | None = None
    trainable_token_indices: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None = None
    strict_targets: bool = dataclasses.field(default=True, compare=False)
    use_bdlora: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        set_("alpha", float(self.alpha))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be a number in [0, 1), got {short(self.dropout)}")
        set_("dropout", float(self.dropout))
        for field in ("target_modules", "exclude_modules"):
            set_(field, _names_or_regex(field, getattr(self, field)))
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, (list, tuple, set, frozenset)):
            raise ConfigError(f"modules_to_save must be a list of module names, e.g. ['classifier'], got {short(self.modules_to_save)}")
        set_("modules_to_save", _names_or_regex("modules_to_save", list(self.modules_to_save or ())) or ())
        if not isinstance(self.init, str) or init_kind(self.init) not in INITS:
            raise ConfigError(f"init must be one of {INITS} or 'pissa_niter_<K>' (K ≥ 1), got {short(self.init)}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {short(getattr(self, flag))}")
        for field in ("base_model_name_or_path", "task_type"):
            if getattr(self, field) is not None and not isinstance(getattr(self, field), str):
                raise ConfigError(f"{field} must be a string, got {short(getattr(self, field))}")
        for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            pattern = getattr(self, field) or {}
            if not isinstance(pattern, Mapping):
                raise ConfigError(f"{field} must map module-name patterns to values, got {type(pattern).__name__}")
            for key, value in pattern.items():
                check_pattern(f"{field} key", key, suffix=True)
                check(f"{field}[{short(key)}]", value)
            set_(field, dict(pattern))
        for field in ("lora_bias", "strict_targets"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{field} must be True or False, got {short(getattr(self, field))}")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not isinstance(self.target_parameters, (list, tuple)):
                raise ConfigError("target_parameters must be a list of '<module>.<parameter>' names, e.g. "
                                  f"['experts.down_proj'], got {short(self.target_parameters)}")
            set_("target_parameters", _names_or_regex("target_parameters", list(self.target_parameters)))
        set_("trainable_token_indices", _token_indices(self.trainable_token_indices))
        set_("use_bdlora", _bdlora(self.use_bdlora))
        if self.target_modules == () and not self.target_parameters:
            raise ConfigError("target_modules is an empty list and no target_parameters are given; name what to adapt")

    # -- per-module values -------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """r for this module: the first matching rank_pattern key, else r."""
        return next((v for k, v in self.rank_pattern.items() if pattern_matches(k, module_name)), self.r)

    def alpha_for(self, module_name: str) -> float:
        """α for this module: the first matching alpha_pattern key, else alpha."""
        return float(next((v for k, v in self.alpha_pattern.items() if pattern_matches(k, module_name)), self.alpha))

    def scale_for(self, module_name: str) -> float:
        """s = α / r, or α / √r with rsLoRA, for this module."""
        r = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(r) if self.use_rslora else r)

    def bd_blocks(self, module_name: str) -> tuple[int, int]:
        """(blocks of A, blocks of B) for this module under ``use_bdlora``: PEFT's rule, a pattern contained in
        the module's leaf name; (1, 1) without BD-LoRA."""
        if not self.use_bdlora:
            return (1, 1)
        leaf = module_name.rsplit(".", 1)[-1]
        a = any(p in leaf for p in self.use_bdlora["target_modules_bd_a"])
        b = any(p in leaf for p in self.use_bdlora["target_modules_bd_b"])
        if a and b:
            raise ConfigError(f"use_bdlora: {module_name!r} matches both the A and the B block-diagonal patterns")
        if not (a or b) and self.use_bdlora["match_strict"]:
            raise ConfigError(f"use_bdlora: {module_name!r} matches neither block-diagonal pattern (match_strict)")
        n = self.use_bdlora["nblocks"]
        return (n, 1) if a else (1, n) if b else (1, 1)

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- JSON both ways ------------------------------------------------------------------------
    def to_peft_dict(self, *, fan_in_fan_out: bool = False) -> dict[str, Any]:
        """The adapter_config.json contents, in PEFT's keys (PEFT and vLLM read this)."""
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(targets) if isinstance(targets, tuple) else targets,
            "exclude_modules": list(self.exclude_modules) if isinstance(self.exclude_modules, tuple) else self.exclude_modules,
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": list(self.modules_to_save) or None,
            "bias": "none",
            "init_lora_weights": _INIT_TO_PEFT.get(self.init, self.init),
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "target_parameters": list(self.target_parameters) if self.target_parameters else None,
            "trainable_token_indices": _tokens_json(self.trainable_token_indices),
            "use_bdlora": dict(self.use_bdlora) if self.use_bdlora else None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], *, source: str = "adapter_config.json") -> LoraConfig:
        """Build from an adapter_config.json written by lorakit or PEFT.

        Raises ConfigError naming ``source`` for a non-LoRA peft_type or a PEFT option that would
        change the math in ways lorakit does not implement (LoRA bias, ...).
        """
        peft_type = data.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise ConfigError(f"{source}: peft_type is {short(peft_type)}; lorakit loads only LoRA adapters (peft_type 'LORA')")
        feature = unsupported(data, {f.name for f in dataclasses.fields(cls)})
        if feature is not None:
            raise UnsupportedFeatureError(f"{source}: this adapter uses {feature}, which lorakit does not support")
        variant = training_only_variant(data, source)
        if variant is not None:
            name = TRAINING_ONLY_VARIANTS[variant[0]][0]
            warnings.warn(PlainLoraVariantWarning(
                f"{source}: this adapter uses {name} ({variant[0]}), which changes only how PEFT trains it; lorakit "
                f"computes the same outputs (and merges) but trains it further as plain LoRA, without {name}"
            ), stacklevel=2)
        kwargs: dict[str, Any] = {ours: data[theirs] for theirs, ours in _PEFT_KEYS.items() if data.get(theirs) is not None}
        init = data.get("init_lora_weights", True)
        if init is True or init is False:
            kwargs["init"] = "kaiming" if init else "nonzero"
        elif init in _PLAIN_PEFT_INITS:  # eva, orthogonal, mica: only the starting point differed; plain LoRA now
            kwargs["init"] = "gaussian" if init == "gaussian" else "kaiming"
        elif isinstance(init, str) and init_kind(init) in INITS and init not in _INIT_TO_PEFT:
            kwargs["init"] = init
        else:
            raise UnsupportedFeatureError(f"{source}: this adapter uses init_lora_weights={short(init)}, which lorakit does "
                                          "not support")
        if data.get("use_dora") is not None:
            kwargs["use_dora"] = data["use_dora"]
        for key in ("rank_pattern", "alpha_pattern"):  # JSON objects only (a list of pairs would pass Mapping())
            if key in kwargs and not isinstance(kwargs[key], dict):
                raise ConfigError(f"{source}: {key} must be a JSON object mapping module-name patterns to values, "
                                  f"got {type(kwargs[key]).__name__}")
        kwargs["strict_targets"] = False
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def _bdlora(value: Any) -> dict[str, Any] | None:
    """use_bdlora: None, or PEFT's BdLoraConfig fields with its defaults filled in."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"use_bdlora must be a dict of PEFT's BdLoraConfig fields, got {short(value)}")
    known = {"target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict"}
    unknown = sorted(set(map(str, value)) - known)
    if unknown:
        raise ConfigError(f"use_bdlora has unknown fields {short(unknown)}; it takes {sorted(known)}")
    out = {"target_modules_bd_a": value.get("target_modules_bd_a") or [],
           "target_modules_bd_b": value.get("target_modules_bd_b") or [],
           "nblocks": value.get("nblocks", 1), "match_strict": value.get("match_strict", True)}
    for key in ("target_modules_bd_a", "target_modules_bd_b"):
        if not isinstance(out[key], (list, tuple)) or not all(isinstance(p, str) and p for p in out[key]):
            raise ConfigError(f"use_bdlora.{key} must be a list of module-name patterns, got {short(out[key])}")
        out[key] = list(out[key])
    _check_rank("use_bdlora.nblocks", out["nblocks"])
    if not isinstance(out["match_strict"], bool):
        raise ConfigError(f"use_bdlora.match_strict must be True or False, got {short(out['match_strict'])}")
    return out


def _tokens_json(value: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None) -> Any:
    if value is None:
        return None
    return {k: list(v) for k, v in value.items()} if isinstance(value, Mapping) else list(value)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise ConfigError(f"{name} must be an integer in [1, {MAX_RANK}], got {short(value)}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a finite number > 0, got {short(value)}")
    try:
        ok = math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be a finite number > 0, got {short(value)}")


def _token_indices(value: Any) -> Mapping[str, tuple[int, ...]] | tuple[int, ...] | None:
    """trainable_token_indices: None, a list of ids (the input embeddings), or module name → ids."""
    if value is None:
        return None

    def ids(where: str, items: Any) -> tuple[int, ...]:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
            raise ConfigError(f"trainable_token_indices{where} must be a non-empty list of token ids, got {short(items)}")
        out = tuple(items)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in out) or len(set(out)) != len(out):
            raise ConfigError(f"trainable_token_indices{where} must hold distinct token ids ≥ 0, got {short(list(out))}")
        return out

    if isinstance(value, Mapping):
        if not value:
            return None
        for key in value:
            if not isinstance(key, str) or not key:
                raise ConfigError(f"trainable_token_indices keys must be embedding module names, got {short(key)}")
        return {key: ids(f"[{short(key)}]", items) for key, items in value.items()}
    return ids("", value)


def _names_or_regex(field: str, value: Any) -> tuple[str, ...] | str | None:
    """Lists become tuples of names; a string stays a regex (or 'all-linear')."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != ALL_LINEAR:
            check_pattern(field, value)
        return value
    if isinstance(value, Sequence) or isinstance(value, (set, frozenset)):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{field} entries must be non-empty strings, got {short(name)}")
        if not names:  # an empty target_modules is allowed beside target_parameters (checked by the caller)
            return () if field == "target_modules" else None
        return names
    raise ConfigError(f"{field} must be a list of names or a regex string, got {short(value)}")
