"""Every layer type: zero-init equals base, merged == unmerged == merge_and_unload, the seed's figure."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from tests.conftest import tiny_gpt2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv2d(6, 5, kernel_size=3, padding=1, stride=2)
        self.fc = nn.Linear(5, 4)

    def forward(self, ids):  # ids: (B, 9) → image (B, 6, 3, 3)
        img = self.emb(ids).transpose(1, 2).reshape(ids.shape[0], 6, 3, 3)
        return self.fc(self.conv(img).mean((2, 3)))


def _randomize_B(model, name="default"):
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B[name].normal_(0, 0.5)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().double()


def test_zero_init_equals_base_for_every_layer_type(net):
    ids = torch.randint(0, 11, (3, 9))
    before = net(ids)
    lorakit.inject(net, lorakit.LoraConfig(r=2, alpha=3, target_modules=["emb", "conv", "fc"]))
    assert {type(m).__name__ for _, m in lorakit.lora_layers(net)} == {"LoraEmbedding", "LoraConv", "LoraLinear"}
    assert torch.equal(net(ids), before)


def test_merged_equals_unmerged_equals_unloaded(net):
    ids = torch.randint(0, 11, (3, 9))
    lorakit.inject(net, lorakit.LoraConfig(r=2, alpha=3, target_modules=["emb", "conv", "fc"]))
    _randomize_B(net)
    base_weights = {n: l.base_weight().clone() for n, l in lorakit.lora_layers(net)}
    unmerged = net(ids)
    lorakit.merge(net)
    torch.testing.assert_close(net(ids), unmerged, rtol=1e-10, atol=1e-12)
    lorakit.merge(net)  # idempotent
    torch.testing.assert_close(net(ids), unmerged, rtol=1e-10, atol=1e-12)
    lorakit.unmerge(net)
    for n, l in lorakit.lora_layers(net):
        torch.testing.assert_close(l.base_weight(), base_weights[n], rtol=0, atol=1e-14)
    plain = lorakit.merge_and_unload(copy.deepcopy(net))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(Net().state_dict())
    torch.testing.assert_close(plain(ids), unmerged, rtol=1e-10, atol=1e-12)


def test_embedding_delta_by_hand():
    emb = nn.Embedding(3, 2)
    model = nn.Sequential(emb)
    lorakit.inject(model, lorakit.LoraConfig(r=1, alpha=2, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_A["default"].copy_(torch.tensor([[1.0, 2.0, 3.0]]))  # (r, num_embeddings)
        layer.lora_B["default"].copy_(torch.tensor([[1.0], [-1.0]]))  # (dim, r)
    # id 2 → A column 3 → B·3 = [3, -3], × s = 2 → [6, -6]
    torch.testing.assert_close(model(torch.tensor([2])) - emb.weight[2], torch.tensor([[6.0, -6.0]]))


def test_hf_conv1d_uses_transposed_weight(ids):
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["c_attn"]))
    _randomize_B(model)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.layout == "transposed" and (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        x = torch.randn(3, 32)
        expected = layer.base_layer(x) + layer.scaling["default"] * x @ layer.lora_A["default"].T @ layer.lora_B["default"].T
        torch.testing.assert_close(layer(x), expected)
        out = model(input_ids=ids).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-5, atol=1e-5)


def test_seed_figure_4096():
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["0"]))
    count = lorakit.trainable_parameters(model)
    assert count.trainable == 65_536 == 8 * (4096 + 4096)
    assert count.total == 16_777_216 + 65_536
    assert f"{100 * count.trainable / 16_777_216:.2f}" == "0.39"
    assert "65,536" in str(count) and "total" in str(count)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=4, dropout=0.5, target_modules=["0"]))
    _randomize_B(model)
    x = torch.randn(4, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))  # a fresh mask per call
    torch.manual_seed(7)
    a = model(x)
    torch.manual_seed(7)
    assert torch.equal(a, model(x))  # reproducible from torch's seed
