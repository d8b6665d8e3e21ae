"""Several named adapters: select, combine, disable, delete; training touches only adapters."""

import copy

import pytest
import torch

import lorakit
from tests.conftest import tiny_bert_classifier, tiny_llama


def _two_adapters():
    model = tiny_llama()
    base = copy.deepcopy(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=3, target_modules=["v_proj", "o_proj"]), adapter_name="b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for name in layer.lora_B:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g))
    return model, base


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_set_adapter_list_adds_updates(ids):
    model, base = _two_adapters()
    lorakit.set_adapter(model, "default")
    a = _logits(model, ids)
    lorakit.set_adapter(model, "b")
    b = _logits(model, ids)
    lorakit.set_adapter(model, ["default", "b"])
    both = _logits(model, ids)
    assert not torch.allclose(a, b)
    # the updates of a and b add in every layer: check one layer's output exactly
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + sum(
            layer.scaling[n] * x @ layer.lora_A[n].T @ layer.lora_B[n].T for n in ("default", "b")
        )
        torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(both, a) and not torch.allclose(both, b)


def test_disable_adapters_runs_the_base_also_when_merged(ids):
    model, base = _two_adapters()
    reference = _logits(base, ids)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(_logits(model, ids), reference)
    adapted = _logits(model, ids)
    lorakit.merge(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(_logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_delete_adapter_restores_plain_modules(ids):
    model, base = _two_adapters()
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["default"]
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    lorakit.delete_adapter(model, "default")
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids))
    with pytest.raises(lorakit.AdapterNameError, match="no adapter named 'b'"):
        lorakit.set_adapter(model, "b")


def test_optimizer_step_changes_only_adapters(ids):
    model = lorakit.inject(tiny_bert_classifier(), lorakit.LoraConfig(r=2, target_modules=["query", "value"],
                                                                      modules_to_save=["classifier"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    # the original head is untouched; the adapter's copy trained
    assert torch.equal(model.classifier.original_module.weight, frozen["classifier.original_module.weight"])
    assert not torch.equal(model.classifier.copies["default"].weight, frozen["classifier.original_module.weight"])


def test_merge_refuses_non_finite():
    model, _ = _two_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.base_weight().clone()
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("inf")
    with pytest.raises(lorakit.MergeError):
        lorakit.merge(model)
    assert torch.equal(layer.base_weight(), before)
