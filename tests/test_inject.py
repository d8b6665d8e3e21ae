"""Target matching rules, freezing, and all-or-nothing injection."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import TargetError, UnsupportedModuleError
from tests.conftest import tiny_bert_classifier, tiny_llama


def _adapted(model):
    return sorted(name for name, _ in lorakit.lora_layers(model))


def test_list_entries_match_names_and_dotted_suffixes():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj", "layers.1.mlp.up_proj"]))
    assert _adapted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]


def test_regex_is_a_full_match():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=r".*\.0\.self_attn\.(k|v)_proj"))
    assert _adapted(model) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]


def test_all_linear_skips_the_output_head_and_respects_excludes():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    names = _adapted(model)
    assert len(names) == 2 * 6 and "lm_head" not in names and not any(n.endswith("o_proj") for n in names)


def test_everything_else_is_frozen():
    model = lorakit.inject(tiny_bert_classifier(), lorakit.LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".lora_" in n or n.startswith("classifier.copies.default.") for n in trainable)
    assert len(trainable) == 2 * 2 + 2


def test_unmatched_entry_is_an_error_even_when_others_match():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetError, match="q_prj") as err:
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_prj", "v_proj"]))
    assert "q_proj" in str(err.value)  # the hint lists real names
    assert not list(lorakit.lora_layers(model)) and model.state_dict().keys() == before.keys()


def test_unsupported_module_is_refused():
    with pytest.raises(UnsupportedModuleError, match="LlamaRMSNorm"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"])
def test_quantized_base_layers_are_refused(targets):
    """bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses holding packed integer weights."""

    class PackedLinear(torch.nn.Linear):  # stands in for a quantized linear: an integer weight
        def __init__(self, inner: torch.nn.Linear):
            super().__init__(inner.in_features, inner.out_features, bias=False)
            self.weight = torch.nn.Parameter(torch.zeros(inner.out_features * inner.in_features // 2,
                                                         dtype=torch.uint8), requires_grad=False)

    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = PackedLinear(attn.q_proj)
    with pytest.raises(UnsupportedModuleError, match=r"quantized .*layers\.0\.self_attn\.q_proj \(torch\.uint8\)"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=targets))
    assert not list(lorakit.lora_layers(model))


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    structure = [n for n, _ in model.named_modules()]
    calls = {"n": 0}
    original = lorakit.LoraLayer.add_adapter

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        return original(self, *a, **k)

    monkeypatch.setattr(lorakit.LoraLayer, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert [n for n, _ in model.named_modules()] == structure
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_second_adapter_is_added_inactive():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="b")
    assert lorakit.adapter_names(model) == ["default", "b"] and lorakit.active_adapters(model) == ["default"]
    with pytest.raises(lorakit.AdapterNameError):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]), adapter_name="b")


def test_plain_module_without_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2)))
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["1.0"]))
    assert _adapted(model) == ["1.0"]
