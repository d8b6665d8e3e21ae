"""Numerics found by the issue-14 audit: mixed-adapter batches keep a float64 model's scales in float64;
compare_adapters cuts noise directions at the factors' own precision."""

from __future__ import annotations

import math

import torch
from torch import nn

import lorakit
from lorakit.analysis import compare_adapters, lowrank_svd


def _two_adapters(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    # rsLoRA: s = α/√r, not a float32 number (5/√3, 7/√5)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5, use_rslora=True, target_modules=["0", "2"]), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=5, alpha=7, use_rslora=True, target_modules=["0", "2"]), "b")
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for name in ("a", "b"):
                layer.lora_B[name].normal_()
    return model.eval()


def test_mixed_batch_of_a_float64_model_matches_each_adapter_alone_to_float64_precision():
    model = _two_adapters(torch.float64)
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    names = ["a", "b", None]
    with torch.no_grad(), lorakit.batch_adapters(model, names):
        mixed = model(x)
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    alone = model(x[i : i + 1])
            else:
                lorakit.set_adapter(model, name)
                alone = model(x[i : i + 1])
        # float32 scales gave ~4e-8 relative error here (the rounding of α/√r)
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-13, atol=1e-13)


def test_float32_scales_stay_float32():
    from lorakit.mixed_batch import _Stacks

    model = _two_adapters(torch.float32)
    layer = next(layer for _, layer in lorakit.lora_layers(model))
    stacks = _Stacks(layer, ["a", "b"])
    assert stacks.scales.dtype == torch.float32
    assert stacks.scales.tolist() == [torch.tensor(5 / math.sqrt(3)).item(), torch.tensor(7 / math.sqrt(5)).item()]


def _rank4_stored_at_16(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A4, C = torch.randn(4, 64, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)
    B = torch.randn(48, 16, generator=g, dtype=torch.float64)
    return (C @ A4).to(dtype), B.to(dtype), (A4, B @ C)  # ΔW = B C A4: rank 4 before rounding to dtype


def test_cut_off_follows_the_factors_dtype():
    A, B, _ = _rank4_stored_at_16(torch.float32, 0)
    svd = lowrank_svd(A, B)
    # rounding A to float32 leaves 12 directions at ~1e-7·σ₁, far above a float64 noise cut-off
    assert (svd.S > svd.S[0] * 1e-10).sum() == 16 and svd.S[4] < svd.S[0] * 1e-5
    assert svd.eps == torch.finfo(torch.float32).eps and svd.nonzero().S.numel() == 4
    A64, B64, _ = _rank4_stored_at_16(torch.float64, 0)
    assert lowrank_svd(A64, B64).nonzero().S.numel() == 4


def test_compare_a_float32_rank4_adapter_stored_at_rank16(tmp_path):
    A, B, (A4, B4) = _rank4_stored_at_16(torch.float32, 1)
    key = "base_model.model.layer"
    big = {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}
    small = {f"{key}.lora_A.weight": A4.float(), f"{key}.lora_B.weight": B4.float()}
    comparison = compare_adapters(big, small)
    (module,) = comparison.modules
    assert tuple(module.grid.shape) == (4, 4)  # the noise directions are not compared
    torch.testing.assert_close(module.grid, torch.ones(4, 4, dtype=torch.float64), rtol=0, atol=1e-5)
