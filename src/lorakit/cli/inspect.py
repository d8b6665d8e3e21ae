"""``lorakit inspect ADAPTER``: what an adapter directory holds, and who else can load it."""

from __future__ import annotations

import argparse
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
    from ..compat import compatibility, lora_modules, module_ranks
    from ..io import read_adapter
    from ..peft_keys import split_lora_key

    af = read_adapter(adapter_dir(path))
    cfg, raw = af.config, af.raw_config
    modules = lora_modules(af.tensors)
    lora_params = sum(t.numel() for k, t in af.tensors.items() if split_lora_key(k))
    saved_params = sum(t.numel() for k, t in af.tensors.items() if not split_lora_key(k))
    ranks = module_ranks(modules)
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
    verdicts = compatibility(af)
    peft, vllm = verdicts.peft, verdicts.vllm
    lines.append("PEFT: " + ("yes (adapter_config.json and keys in PEFT's layout)" if peft.loads
                             else "no: " + "; ".join(peft.problems)))
    vllm_notes = [*vllm.notes, f"rules checked against {vllm.checked_against}"]
    lines.append("vLLM: " + ("yes" if vllm.loads else "no: " + "; ".join(vllm.problems))
                 + f" (note: {'; '.join(vllm_notes)})")
    return lines


def _base_quantization(metadata: dict[str, str]) -> str:
    quant = metadata.get("lorakit_base_quantization")
    if quant:
        return (f"trained on a quantized base: yes ({quant}, QLoRA); the adapter applies to the full-precision "
                "base as well (lorakit merge merges it there)")
    if "lorakit_version" in metadata:
        return "trained on a quantized base: no"
    return "trained on a quantized base: not recorded (not written by lorakit)"


def run(args: argparse.Namespace) -> int:
    for line in describe(args.adapter):
        print(line)
    return 0
