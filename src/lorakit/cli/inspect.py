"""``lorakit inspect ADAPTER``: what an adapter directory holds, and who else can load it."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path
from typing import Any

EPILOG = """\
example:
  lorakit inspect runs/code-search/adapter
  lorakit inspect runs/code-search/checkpoints/step-00000100/adapter

Shows the targets, r, α and the scale s = α/r (α/√r with rsLoRA), parameter counts, the fingerprint
of the base weights it was trained on, file sizes, and whether HF PEFT and vLLM can load it (and why not).
"""

# The vLLM rules below were checked against vLLM 0.32's LoRA loader (VLLM_CHECKED): its source
# (vllm/lora/peft_helper.py, lora_weights.py, lora_model.py, config/lora.py, lora/layers/) and a vLLM
# 0.32 CPU build serving a lorakit adapter (greedy tokens equal to lorakit's).  Per rule:
#   modules_to_save, DoRA: refused (PEFTHelper._validate_features).
#   rank: the config's r must not exceed --max-lora-rank (PEFTHelper.validate_legal); each module's rank is
#     its tensors' (LoRAModel.from_lora_tensors), so rank_pattern adapters load.
#   scale: one α/r (α/√r with use_rslora) from the top-level r and lora_alpha for every module
#     (PEFTHelper.__post_init__ → LoRALayerWeights.from_config); alpha_pattern is not read.  A module whose
#     own scale differs is served scaled wrongly, so such an adapter is a "no".
#   layers: linear and vocab-parallel embedding LoRA layers; no convolutions (vllm/lora/layers/).
#   --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks); the default is 16.
VLLM_CHECKED = "vLLM 0.32"
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="describe an adapter directory and check PEFT / vLLM compatibility",
        description="Describe a LoRA adapter directory (lorakit's or PEFT's) without loading any model.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (or a lorakit train --out / checkpoint dir)")
    p.set_defaults(func=run)
    return p


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def adapter_dir(path: str | Path) -> Path:
    """``path``, or the adapter inside it when it is a ``lorakit train`` output or checkpoint directory."""
    path = Path(path)
    inner = path / "adapter"
    if not (path / "adapter_config.json").exists() and (inner / "adapter_config.json").exists():
        return inner
    return path


def describe(path: str | Path) -> list[str]:
    """The report's lines (the CLI prints them)."""
    from ..io import read_adapter, split_lora_key

    af = read_adapter(adapter_dir(path))
    cfg, raw = af.config, af.raw_config
    modules: dict[str, dict[str, Any]] = {}
    saved_params, lora_params = 0, 0
    for key, t in af.tensors.items():
        parts = split_lora_key(key)
        if parts:
            info = modules.setdefault(parts[0], {})
            info[parts[1]] = t
            lora_params += t.numel()
        else:
            saved_params += t.numel()
    ranks = {name: int(info.get("lora_A", info.get("lora_embedding_A")).shape[0]) for name, info in modules.items()
             if "lora_A" in info or "lora_embedding_A" in info}
    leaves = Counter(name.rsplit(".", 1)[-1] for name in modules)
    rank_set = sorted(set(ranks.values()))
    scale = f"α/√r = {cfg.alpha / cfg.r ** 0.5:.4g}" if cfg.use_rslora else f"α/r = {cfg.alpha / cfg.r:.4g}"
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in af.tensors.values()})
    fp = af.fingerprint
    lines = [
        f"adapter: {af.path}",
        f"base model: {raw.get('base_model_name_or_path') or 'not recorded'}; "
        f"task type: {raw.get('task_type') or 'not recorded'}",
        f"targets (config): {cfg.target_modules if isinstance(cfg.target_modules, str) else ', '.join(cfg.target_modules or ())}",
        f"adapted modules: {len(modules)} ({', '.join(f'{leaf}×{n}' for leaf, n in sorted(leaves.items()))})",
        f"r: {cfg.r}" + (f" (per module: {rank_set})" if rank_set and rank_set != [cfg.r] else ""),
        f"alpha: {cfg.alpha:g}; scale {scale}" + (" (rsLoRA)" if cfg.use_rslora else "")
        + (f"; alpha_pattern {dict(cfg.alpha_pattern)}" if cfg.alpha_pattern else ""),
        f"dropout: {cfg.dropout:g}",
        "variant: " + ("DoRA (a trained magnitude per output row: lora_magnitude_vector)" if cfg.use_dora else "LoRA")
        + ("" if cfg.init == "kaiming" else f"; init {cfg.init}"),
        f"modules_to_save: {', '.join(cfg.modules_to_save) or 'none'}",
        f"parameters: {lora_params + saved_params:,} ({lora_params:,} LoRA, {saved_params:,} in saved modules); "
        f"dtype {', '.join(dtypes)}",
        f"base fingerprint: {fp['checksum']} over {len(fp.get('modules', {}))} modules" if fp
        else "base fingerprint: none (not saved by lorakit; loading cannot check the base model)",
        f"lorakit version: {af.metadata.get('lorakit_version', 'n/a (not written by lorakit)')}",
        _base_quantization(af.metadata),
        "files: " + ", ".join(f"{p.name} {_size(p.stat().st_size)}" for p in sorted(af.path.iterdir()) if p.is_file()),
    ]
    peft_problems = _peft_problems(af)
    lines.append("PEFT: " + ("yes (adapter_config.json and keys in PEFT's layout)" if not peft_problems
                             else "no: " + "; ".join(peft_problems)))
    vllm_problems, vllm_notes = _vllm_problems(af, modules, rank_set)
    lines.append("vLLM: " + ("yes" if not vllm_problems else "no: " + "; ".join(vllm_problems))
                 + (f" (note: {'; '.join(vllm_notes)})" if vllm_notes else ""))
    return lines


def _base_quantization(metadata: dict[str, str]) -> str:
    quant = metadata.get("lorakit_base_quantization")
    if quant:
        return (f"trained on a quantized base: yes ({quant}, QLoRA); the adapter applies to the full-precision "
                "base as well (lorakit merge merges it there)")
    if "lorakit_version" in metadata:
        return "trained on a quantized base: no"
    return "trained on a quantized base: not recorded (not written by lorakit)"


def _peft_problems(af: Any) -> list[str]:
    problems = []
    bad_keys = [k for k in af.tensors if not k.startswith("base_model.model.")]
    if bad_keys:
        problems.append(f"key {bad_keys[0]!r} lacks PEFT's 'base_model.model.' prefix")
    try:
        import peft
    except ImportError:
        return problems
    known = set(peft.LoraConfig.__dataclass_fields__)
    try:
        peft.LoraConfig(**{k: v for k, v in af.raw_config.items() if k in known})
    except (TypeError, ValueError) as err:
        problems.append(f"peft {peft.__version__} rejects the config: {err}")
    return problems


def _vllm_problems(af: Any, modules: dict[str, dict[str, Any]], ranks: list[int]) -> tuple[list[str], list[str]]:
    cfg, problems, notes = af.config, [], []
    if cfg.use_dora:
        problems.append("vLLM does not load DoRA adapters; serve a merged model (lorakit merge) instead")
    if cfg.modules_to_save:
        problems.append(f"vLLM does not load modules_to_save ({', '.join(cfg.modules_to_save)}); serve a merged model "
                        "(lorakit merge) instead")
    if any(t.dim() == 4 for info in modules.values() for t in info.values()):
        problems.append("vLLM has no LoRA for Conv2d layers")
    if any("lora_embedding_A" in info for info in modules.values()):  # VocabParallelEmbeddingWithLoRA
        notes.append("embedding LoRA is served for input embeddings (not the output head) of models whose "
                     "vLLM implementation lists them as LoRA modules")
    if cfg.rank_pattern or cfg.alpha_pattern:
        formula = "α/√r" if cfg.use_rslora else "α/r"
        served = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
        own = {name: cfg.scale_for(name) for name in modules}
        off = sorted(name for name, s in own.items() if not math.isclose(s, served, rel_tol=1e-9))
        if off:
            problems.append(
                f"vLLM loads rank_pattern/alpha_pattern adapters but scales every module by the top-level {formula} = "
                f"{served:.4g}; {len(off)} module(s) have another scale (e.g. {off[0]}: {own[off[0]]:.4g}), so vLLM would "
                "serve another model: give every module the same scale, or serve a merged model (lorakit merge)"
            )
        else:
            notes.append(f"rank_pattern/alpha_pattern: vLLM takes each module's rank from its tensors and applies the "
                         f"top-level {formula} = {served:.4g}, which is every module's scale here")
    top = max(ranks or [cfg.r])
    if top > 512:
        problems.append(f"r = {top} exceeds vLLM's largest --max-lora-rank (512)")
    elif top > 16:
        need = next(r for r in _VLLM_RANKS if r >= top)
        notes.append(f"start vLLM with --max-lora-rank {need} (its default is 16)")
    task = af.raw_config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        notes.append(f"task type {task}: vLLM serves LoRA mainly on generative models")
    notes.append("the base architecture must support LoRA in vLLM")
    notes.append(f"rules checked against {VLLM_CHECKED}")
    return problems, notes


def run(args: argparse.Namespace) -> int:
    for line in describe(args.adapter):
        print(line)
    return 0
