"""lorakit.compat: PEFT's and vLLM's verdicts on saved adapters, with reasons and the versions checked against."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.compat import VLLM_CHECKED, compatibility, lora_modules, module_ranks
from lorakit.io import read_adapter


def two_linears() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def save(model: torch.nn.Module, cfg: lorakit.LoraConfig, path: Path) -> Path:
    lorakit.save_adapter(lorakit.inject(model, cfg), path)
    return path


def test_plain_adapter_loads_in_both(tmp_path: Path) -> None:
    c = compatibility(save(two_linears(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]), tmp_path / "a"))
    assert c.peft.loads and c.peft.problems == ()
    assert c.vllm.loads and c.vllm.problems == () and c.vllm.checked_against == VLLM_CHECKED == "vLLM 0.32"
    assert c.vllm.notes == ("the base architecture must support LoRA in vLLM",)
    peft = pytest.importorskip("peft")
    assert c.peft.checked_against == f"peft {peft.__version__}"


def test_pattern_scale_differing_from_the_top_level_one_is_a_vllm_no(tmp_path: Path) -> None:
    cfg = lorakit.LoraConfig(r=32, alpha=8, target_modules=["0", "2"], rank_pattern={"2": 4}, use_rslora=True)
    v = compatibility(save(two_linears(), cfg, tmp_path / "a")).vllm
    # vLLM serves every module at 8/√32 = 1.414; module 2's own scale is 8/√4 = 4
    assert not v.loads and len(v.problems) == 1
    assert f"top-level α/√r = {8 / math.sqrt(32):.4g}; 1 module(s) have another scale (e.g. 2: 4)" in v.problems[0]
    assert "start vLLM with --max-lora-rank 32 (its default is 16)" in v.notes


def test_pattern_scales_that_agree_are_served(tmp_path: Path) -> None:
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["0", "2"], rank_pattern={"2": 4}, alpha_pattern={"2": 8})
    v = compatibility(save(two_linears(), cfg, tmp_path / "a")).vllm  # 16/8 = 8/4 = 2
    assert v.loads and any("top-level α/r = 2, which is every module's scale" in n for n in v.notes)


def test_dora_modules_to_save_and_rank_above_512_are_refused(tmp_path: Path) -> None:
    cfg = lorakit.LoraConfig(r=600, alpha=8, target_modules=["0"], use_dora=True, modules_to_save=["2"])
    v = compatibility(save(two_linears(), cfg, tmp_path / "a")).vllm
    assert not v.loads
    assert len(v.problems) == 3
    assert v.problems[0].startswith("vLLM does not load DoRA adapters")
    assert v.problems[1].startswith("vLLM does not load modules_to_save (2)")
    assert v.problems[2] == "r = 600 exceeds vLLM's largest --max-lora-rank (512)"


def test_conv_is_refused_and_embedding_is_a_note(tmp_path: Path) -> None:
    conv = compatibility(save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)),
                              lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"]), tmp_path / "c")).vllm
    assert not conv.loads and conv.problems == ("vLLM has no LoRA for Conv2d layers",)
    emb = compatibility(save(torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)),
                             lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "1"]), tmp_path / "e")).vllm
    assert emb.loads and emb.notes[0].startswith("embedding LoRA is served for input embeddings")


def test_non_generative_task_type_is_a_note(tmp_path: Path) -> None:
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["0"], task_type="SEQ_CLS")
    v = compatibility(save(two_linears(), cfg, tmp_path / "a")).vllm
    assert v.loads and "task type SEQ_CLS: vLLM serves LoRA mainly on generative models" in v.notes


def test_keys_without_peft_prefix_are_a_peft_no(tmp_path: Path) -> None:
    af = read_adapter(save(two_linears(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["0"]), tmp_path / "a"))
    af.tensors = {k.removeprefix("base_model.model."): t for k, t in af.tensors.items()}
    p = compatibility(af).peft
    assert not p.loads and "lacks PEFT's 'base_model.model.' prefix" in p.problems[0]


def test_modules_and_ranks_per_module(tmp_path: Path) -> None:
    cfg = lorakit.LoraConfig(r=6, alpha=8, target_modules=["0", "2"], rank_pattern={"2": 3}, modules_to_save=[])
    af = read_adapter(save(two_linears(), cfg, tmp_path / "a"))
    modules = lora_modules(af.tensors)
    assert sorted(modules) == ["0", "2"] and sorted(modules["2"]) == ["lora_A", "lora_B"]
    assert modules["2"]["lora_A"].shape == (3, 8) and modules["2"]["lora_B"].shape == (4, 3)
    assert module_ranks(modules) == {"0": 6, "2": 3}
