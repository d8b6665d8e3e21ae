"""Adapters cross over both ways with HF PEFT on the same inputs (fp32, max |Δ| ≤ 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from tests.conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

CASES = {
    # name: (builder, lorakit/peft kwargs)
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], rank_pattern={"down_proj": 3})),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], alpha_pattern={"c_proj": 2.0})),
    "bert": (tiny_bert_classifier, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
}


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_one_step(model, ids) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_adapter_loads_in_peft(case, ids, tmp_path):
    build, kw = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, use_rslora=case == "gpt2", **kw))
    _train_one_step(model, ids)
    assert any(layer.lora_B["default"].abs().sum() > 0 for _, layer in lorakit.lora_layers(model))
    lorakit.save_adapter(model, tmp_path / "adapter")
    ours, before = _out(model, ids), _out(pristine, ids)
    assert not torch.allclose(ours, before, atol=1e-4), "the trained adapter must change the output"

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path / "adapter").eval()
    assert (ours - _out(theirs, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_lorakit(case, ids, tmp_path):
    build, kw = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=case == "llama", **kw)
    theirs = peft.get_peft_model(base, cfg).eval()
    theirs.save_pretrained(tmp_path / "adapter")

    ours = lorakit.load_adapter(pristine, tmp_path / "adapter")
    assert (_out(ours, ids) - _out(theirs, ids)).abs().max() <= 1e-5
