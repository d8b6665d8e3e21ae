"""LoraConfig.init against HF PEFT's init_lora_weights: PiSSA, OLoRA, embeddings, non-zero B; PEFT's
conversion of PiSSA / OLoRA adapters to plain LoRA on save."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 16)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 10, bias=False)

    def forward(self, ids):
        return self.b(torch.relu(self.a(self.emb(ids))))


IDS = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(3))


def _out(model):
    with torch.no_grad():
        return model(IDS)


def _peft_param(model, module, kind):
    return model.base_model.model.get_submodule(module).get_submodule(kind).get_parameter("default.weight")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_match_peft(init):
    ours = lorakit.inject(Net(), lorakit.LoraConfig(r=4, alpha=6, target_modules=["a", "b"], init=init))
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["a", "b"],
                                                        init_lora_weights=init))
    for name, layer in lorakit.lora_layers(ours):
        assert torch.allclose(layer.lora_A["default"], _peft_param(theirs, name, "lora_A"), atol=1e-5)
        assert torch.allclose(layer.lora_B["default"], _peft_param(theirs, name, "lora_B"), atol=1e-5)
        residual = theirs.base_model.model.get_submodule(name).base_layer.weight
        assert torch.allclose(layer.base_weight(), residual, atol=1e-5)
        assert not torch.allclose(layer.base_weight(), Net().get_submodule(name).weight, atol=1e-2)
    assert (_out(ours) - _out(Net())).abs().max() < 1e-5  # W_res + s·B₀A₀ = W


def _decaying_spectrum_net():
    """A Net whose layer a has singular values 8, 4, 2, 1, 0.1, ...: a spectrum with a clear top 3."""
    net = Net()
    U, _, Vh = torch.linalg.svd(net.a.weight.detach(), full_matrices=False)
    S = torch.tensor([8.0, 4.0, 2.0] + [0.1] * (U.shape[1] - 3))
    with torch.no_grad():
        net.a.weight.copy_(U @ torch.diag(S) @ Vh)
    return net


def test_fast_pissa_approximates_exact_pissa():
    cfg = lorakit.LoraConfig(r=3, alpha=3, target_modules=["a"], init="pissa")
    exact = lorakit.inject(_decaying_spectrum_net(), cfg)
    fast = lorakit.inject(_decaying_spectrum_net(), cfg.replace(init="pissa_niter_4"))
    e, f = exact.a.delta_weight("default"), fast.a.delta_weight("default")
    assert (e - f).norm() / e.norm() < 1e-3
    assert (_out(fast) - _out(_decaying_spectrum_net())).abs().max() < 1e-5


def _train_like(model_layers, gen):
    """Move every A and B a little, as training would (the same moves for both libraries)."""
    moves = {}
    with torch.no_grad():
        for name, (A, B) in model_layers.items():
            dA, dB = torch.randn(A.shape, generator=gen) * 0.05, torch.randn(B.shape, generator=gen) * 0.05
            A.add_(dA)
            B.add_(dB)
            moves[name] = (dA, dB)
    return moves


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_saving_converts_to_plain_lora_as_peft_does(init, rslora, tmp_path):
    cfg = lorakit.LoraConfig(r=3, alpha=5, target_modules=["a", "b"], init=init, use_rslora=rslora)
    ours = lorakit.inject(Net(), cfg)
    moves = _train_like({n: (l.lora_A["default"], l.lora_B["default"]) for n, l in lorakit.lora_layers(ours)},
                        torch.Generator().manual_seed(5))
    lorakit.save_adapter(ours, tmp_path / "ours")
    saved = lorakit.read_adapter(tmp_path / "ours")
    assert saved.raw_config["r"] == 6 and saved.raw_config["init_lora_weights"] is True
    assert saved.config.scale_for("a") == pytest.approx(cfg.scale_for("a"))

    # PEFT: the same init, the same moves, saved with its conversion against the initial adapter
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["a", "b"],
                                                        init_lora_weights=init, use_rslora=rslora))
    theirs.save_pretrained(tmp_path / "initial")
    with torch.no_grad():
        for name, (dA, dB) in moves.items():
            _peft_param(theirs, name, "lora_A").add_(dA)
            _peft_param(theirs, name, "lora_B").add_(dB)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    peft_file = lorakit.read_adapter(tmp_path / "peft")
    assert saved.tensors.keys() == peft_file.tensors.keys()
    for key, tensor in saved.tensors.items():
        assert torch.allclose(tensor, peft_file.tensors[key], atol=1e-5), key

    # Either library applies the converted file to the ORIGINAL base and gets the trained model.
    trained = _out(ours)
    assert (trained - _out(Net())).abs().max() > 1e-3
    assert (_out(peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")) - trained).abs().max() < 1e-5
    assert (_out(lorakit.load_adapter(Net(), tmp_path / "ours")) - trained).abs().max() < 1e-5


def test_deleting_a_pissa_adapter_restores_the_base():
    model = lorakit.inject(Net(), lorakit.LoraConfig(r=4, target_modules=["a"], init="pissa"))
    lorakit.delete_adapter(model, "default")
    assert isinstance(model.a, nn.Linear)
    assert torch.allclose(model.a.weight, Net().a.weight, atol=1e-6)


def test_loading_an_unconverted_pissa_file_never_touches_the_base(tmp_path):
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["a"], init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path / "p")  # no conversion: the factors belong to PEFT's residual base
    residual_model = copy.deepcopy(theirs.base_model.model.a.base_layer)
    target = Net()
    target.a.weight.data.copy_(residual_model.weight)
    model = lorakit.load_adapter(target, tmp_path / "p")
    assert torch.equal(model.a.base_weight(), residual_model.weight)
    assert (_out(model) - _out(theirs)).abs().max() < 1e-5
    assert lorakit.read_adapter(tmp_path / "p").config.init == "pissa"


def test_embedding_init_is_peft_s_and_nonzero_init_changes_the_output():
    model = lorakit.inject(Net(), lorakit.LoraConfig(r=4, target_modules=["emb", "a"]))
    emb = model.emb
    assert torch.count_nonzero(emb.lora_A["default"]) == 0
    B = emb.lora_B["default"]
    assert 0.7 < float(B.detach().std()) < 1.3  # N(0, 1)
    assert (_out(model) - _out(Net())).abs().max() == 0
    changed = lorakit.inject(Net(), lorakit.LoraConfig(r=4, target_modules=["emb", "a"], init="nonzero"))
    assert all(torch.count_nonzero(l.lora_B["default"]) > 0 and torch.count_nonzero(l.lora_A["default"]) > 0
               for _, l in lorakit.lora_layers(changed))
    assert (_out(changed) - _out(Net())).abs().max() > 1e-3


@pytest.mark.parametrize("init,peft_value", [("kaiming", True), ("nonzero", False), ("gaussian", "gaussian"),
                                             ("pissa_niter_4", "pissa_niter_4"), ("olora", "olora")])
def test_init_json_both_ways(init, peft_value):
    cfg = lorakit.LoraConfig(target_modules=["a"], init=init, use_dora=True)
    data = cfg.to_peft_dict()
    assert data["init_lora_weights"] == peft_value and data["use_dora"] is True
    assert lorakit.LoraConfig.from_peft_dict(data) == cfg
    assert peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"}).init_lora_weights == peft_value


@pytest.mark.parametrize("bad", ["pissa_niter_0", "svd", "loftq"])
def test_unknown_inits_are_refused(bad):
    with pytest.raises(lorakit.ConfigError, match="init"):
        lorakit.LoraConfig(target_modules=["a"], init=bad)
    with pytest.raises(lorakit.ConfigError, match="init_lora_weights"):
        lorakit.LoraConfig.from_peft_dict({"target_modules": ["a"], "init_lora_weights": bad})


def test_pissa_on_a_conv_is_refused_and_leaves_the_model_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 3))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(lorakit.UnsupportedModuleError, match="pissa"):
        lorakit.inject(net, lorakit.LoraConfig(r=2, target_modules=["0", "1"], init="pissa"))
    assert isinstance(net[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
