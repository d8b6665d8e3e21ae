"""Can HF PEFT and vLLM load a saved adapter, and if not, why not.

The vLLM rules were checked against vLLM 0.32's LoRA loader (:data:`VLLM_CHECKED`): its source
(vllm/lora/peft_helper.py, lora_weights.py, lora_model.py, config/lora.py, lora/layers/) and a vLLM
0.32 CPU build serving a lorakit adapter (greedy tokens equal to lorakit's).  Per rule:

* modules_to_save, DoRA: refused (PEFTHelper._validate_features).
* rank: the config's r must not exceed --max-lora-rank (PEFTHelper.validate_legal); each module's rank is
  its tensors' (LoRAModel.from_lora_tensors), so rank_pattern adapters load.
* scale: one α/r (α/√r with use_rslora) from the top-level r and lora_alpha for every module
  (PEFTHelper.__post_init__ → LoRALayerWeights.from_config); alpha_pattern is not read.  A module whose
  own scale differs is served scaled wrongly, so such an adapter is a "no".
* layers: linear and vocab-parallel embedding LoRA layers; no convolutions (vllm/lora/layers/).
* --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks); the default is 16.

The PEFT rules: every key carries PEFT's ``base_model.model.`` prefix, and the installed ``peft``'s
``LoraConfig`` accepts adapter_config.json (skipped when peft is not installed).
"""

from __future__ import annotations

import dataclasses
import math
import os

from torch import Tensor

from .io import AdapterFile, read_adapter
from .peft_keys import PREFIX, split_lora_key

VLLM_CHECKED = "vLLM 0.32"
#: the values vLLM's --max-lora-rank accepts
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether one loader can load the adapter: ``problems`` say why not, ``notes`` what to know anyway."""

    #: True when there are no problems
    loads: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    #: the loader version the rules were checked against ("vLLM 0.32", "peft 0.21.0"); None when the
    #: loader is not installed and only the rules that need no import were checked
    checked_against: str | None


@dataclasses.dataclass(frozen=True)
class Compatibility:
    """PEFT's and vLLM's verdicts on one adapter."""

    peft: Verdict
    vllm: Verdict


def lora_modules(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Module path → {kind ("lora_A", "lora_B", "lora_embedding_A", ...): tensor} over the LoRA keys of
    ``tensors`` (PEFT keys); other keys (modules_to_save) are left out."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        parts = split_lora_key(key)
        if parts:
            modules.setdefault(parts[0], {})[parts[1]] = t
    return modules


def module_ranks(modules: dict[str, dict[str, Tensor]]) -> dict[str, int]:
    """Each module's rank: the first dimension of its A factor (lora_A: (r, k); lora_embedding_A: (r, vocab))."""
    return {name: int(info.get("lora_A", info.get("lora_embedding_A")).shape[0]) for name, info in modules.items()
            if "lora_A" in info or "lora_embedding_A" in info}


def compatibility(adapter: AdapterFile | str | os.PathLike[str]) -> Compatibility:
    """PEFT's and vLLM's verdicts on ``adapter`` (an :class:`~lorakit.io.AdapterFile` or an adapter
    directory, read with :func:`~lorakit.io.read_adapter`); loads no model."""
    af = adapter if isinstance(adapter, AdapterFile) else read_adapter(adapter)
    return Compatibility(peft=peft_verdict(af), vllm=vllm_verdict(af))


def peft_verdict(af: AdapterFile) -> Verdict:
    """Can HF PEFT (the installed version, when there is one) load ``af``."""
    problems = []
    bad_keys = [k for k in af.tensors if not k.startswith(PREFIX)]
    if bad_keys:
        problems.append(f"key {bad_keys[0]!r} lacks PEFT's {PREFIX!r} prefix")
    try:
        import peft
    except ImportError:
        return Verdict(not problems, tuple(problems), (), None)
    known = set(peft.LoraConfig.__dataclass_fields__)
    try:
        peft.LoraConfig(**{k: v for k, v in af.raw_config.items() if k in known})
    except (TypeError, ValueError) as err:
        problems.append(f"peft {peft.__version__} rejects the config: {err}")
    return Verdict(not problems, tuple(problems), (), f"peft {peft.__version__}")


def vllm_verdict(af: AdapterFile) -> Verdict:
    """Can vLLM (:data:`VLLM_CHECKED`) serve ``af``; the rules are in this module's docstring.

    vLLM scales every module by the top-level s = α/r (α/√r with rsLoRA), so a module whose own scale
    (rank_pattern / alpha_pattern) differs from it would be served as another model."""
    cfg = af.config
    problems: list[str] = []
    notes: list[str] = []
    modules = lora_modules(af.tensors)
    ranks = sorted(set(module_ranks(modules).values()))
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
    if top > VLLM_RANKS[-1]:
        problems.append(f"r = {top} exceeds vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    elif top > 16:
        need = next(r for r in VLLM_RANKS if r >= top)
        notes.append(f"start vLLM with --max-lora-rank {need} (its default is 16)")
    task = af.raw_config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        notes.append(f"task type {task}: vLLM serves LoRA mainly on generative models")
    notes.append("the base architecture must support LoRA in vLLM")
    return Verdict(not problems, tuple(problems), tuple(notes), VLLM_CHECKED)
