"""Module types and depths from module names: "model.layers.3.self_attn.q_proj" is the type
"q_proj" at depth 3.

A type is the module path with its layer indices removed; its label is the shortest dotted suffix
that names exactly the modules of that type, also as a PEFT rank_pattern key (a regex matched
against the name or a dotted suffix of it), so a suggestion can be pasted into a config and hits
exactly those modules, whatever the order of the pattern's keys. BERT's
"encoder.layer.*.attention.output.dense" and "encoder.layer.*.output.dense" get
"attention.output.dense" and "layer.*.output.dense".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from ..config import pattern_matches

_ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query", "key", "value", "qkv",
                     "qkv_proj", "c_attn", "wq", "wk", "wv", "wo", "q", "k", "v", "o", "Wqkv"}
_MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "wi", "wi_0", "wi_1",
               "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h"}
_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "intermediate", "experts")


@dataclasses.dataclass(frozen=True)
class ModuleGroup:
    """One module type: its label for tables, its rank_pattern key, and its family."""

    label: str
    pattern: str
    family: str  # "attention", "mlp", "embedding" or "other"
    names: tuple[str, ...]


def type_key(name: str) -> tuple[str, ...]:
    """The module path with numeric components (layer / expert indices) replaced by "*"."""
    return tuple("*" if part.isdigit() else part for part in name.split("."))


def module_depth(name: str) -> int | None:
    """The first numeric component of the path (the block index), or None."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def module_family(name: str, kind: str = "linear") -> str:
    """"attention", "mlp", "embedding" or "other", from the name (a heuristic for plain-words reports)."""
    if kind == "embedding":
        return "embedding"
    parts = name.split(".")
    leaf, path = parts[-1], [p.lower() for p in parts[:-1]]
    if any(any(key in p for key in _MLP_PARTS) for p in path) or leaf in _MLP_LEAVES:
        return "mlp"
    if any(any(key in p for key in _ATTENTION_PARTS) for p in path) or leaf in _ATTENTION_LEAVES:
        return "attention"
    if path and path[-1] == "output":  # BERT-style blocks: "layer.3.output.dense" is the FFN's second half
        return "mlp"
    return "other"


def group_modules(names: Sequence[str], kinds: Sequence[str] | None = None) -> list[ModuleGroup]:
    """Group module names by type, in order of first appearance, each with a unique label/pattern."""
    kinds = list(kinds) if kinds is not None else ["linear"] * len(names)
    members: dict[tuple[str, ...], list[str]] = {}
    kind_of: dict[tuple[str, ...], str] = {}
    for name, kind in zip(names, kinds):
        members.setdefault(type_key(name), []).append(name)
        kind_of.setdefault(type_key(name), kind)
    groups = []
    for key, group_names in members.items():
        label, pattern = _unique_suffix(key, group_names, names)
        groups.append(ModuleGroup(label, pattern, module_family(group_names[0], kind_of[key]), tuple(group_names)))
    return groups


def _unique_suffix(key: tuple[str, ...], own: Iterable[str], everyone: Sequence[str]) -> tuple[str, str]:
    own = set(own)
    for n in range(1, len(key) + 1):
        suffix = key[-n:]
        pattern = r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in suffix)
        hits = {name for name in everyone if pattern_matches(pattern, name)}
        if hits == own:
            return ".".join(suffix), pattern
    # Names that are suffixes of one another's types: only the full path is unique.
    return ".".join(key), "^" + r"\.".join(r"\d+" if p == "*" else re.escape(p) for p in key) + "$"
