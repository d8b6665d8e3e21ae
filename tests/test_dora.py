"""DoRA layers against HF PEFT on the same weights and inputs: files both ways, outputs, gradients, merging."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from tests.conftest import tiny_gpt2

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class Net(nn.Module):
    """An embedding, linears (one with bias) and a conv: every layer type DoRA covers."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 16)
        self.out = nn.Linear(16, 8, bias=False)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.to(dtype)

    def forward(self, ids, img):
        h = self.out(torch.tanh(self.lin(self.emb(ids))))
        return h, self.conv(img)


TARGETS = ["emb", "lin", "out", "conv"]


def _inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (3, 5), generator=gen), torch.randn(2, 2, 6, 6, generator=gen).to(dtype)


def _outputs(model, dtype):
    with torch.no_grad():
        return model(*_inputs(dtype))


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _peft_dora(base, tmp_path, dtype):
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False, use_dora=True)
    theirs = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # a magnitude that is not the initial norm, so m matters
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel(), dtype=p.dtype).reshape(p.shape))
    theirs.eval().save_pretrained(tmp_path / "peft")
    return theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_peft_dora_adapter_loads_in_lorakit(dtype, tmp_path):
    base = Net(dtype)
    pristine = copy.deepcopy(base)
    theirs = _peft_dora(base, tmp_path, dtype)
    ours = lorakit.load_adapter(pristine, tmp_path / "peft")
    assert lorakit.adapter_names(ours) == ["default"]
    assert all("default" in layer.lora_magnitude for _, layer in lorakit.lora_layers(ours))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _max_diff(_outputs(ours, dtype), _outputs(theirs, dtype)) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lorakit_dora_adapter_loads_in_peft(dtype, tmp_path):
    base = Net(dtype)
    pristine, for_peft = copy.deepcopy(base), copy.deepcopy(base)
    ours = lorakit.inject(base, lorakit.LoraConfig(r=3, alpha=5, target_modules=TARGETS, init="nonzero", use_dora=True))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(ours):
            m = layer.lora_magnitude["default"]
            m.mul_(torch.linspace(1.5, 0.5, m.numel(), dtype=m.dtype))
    lorakit.save_adapter(ours, tmp_path / "ours")
    _peft_dora(for_peft, tmp_path, dtype)  # PEFT's own file, to compare key names and shapes
    ours_file, peft_file = lorakit.read_adapter(tmp_path / "ours"), lorakit.read_adapter(tmp_path / "peft")
    assert {k: v.shape for k, v in ours_file.tensors.items()} == {k: v.shape for k, v in peft_file.tensors.items()}
    assert ours_file.raw_config["use_dora"] is True

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path / "ours").eval()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _max_diff(_outputs(ours.eval(), dtype), _outputs(theirs, dtype)) <= tol
    assert _max_diff(_outputs(ours, dtype), _outputs(Net(dtype), dtype)) > 1e-3, "the adapter must change the output"


def test_gradients_match_peft_in_float64(tmp_path):
    base = Net(torch.float64)
    pristine = copy.deepcopy(base)
    theirs = _peft_dora(base, tmp_path, torch.float64)
    ours = lorakit.load_adapter(pristine, tmp_path / "peft", trainable=True)
    ids, img = _inputs(torch.float64)
    grads = []
    for model in (ours, theirs):
        model.train()  # no dropout configured: train mode changes nothing but the code path
        h, c = model(ids, img)
        (h.pow(2).sum() + c.pow(3).sum()).backward()
        grads.append({n.replace(".default", "").replace("base_model.model.", ""): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    ours_g, peft_g = grads
    pairs = 0
    for name, g in ours_g.items():
        module, kind = name.rsplit(".", 1)
        key = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector.weight"}[kind]
        if module == "emb":
            key = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}.get(kind, key)
        theirs_g = peft_g[f"{module}.{key}"]
        assert torch.allclose(g.reshape(theirs_g.shape), theirs_g, rtol=1e-9, atol=1e-12), name
        pairs += 1
    assert pairs == 3 * len(TARGETS)


def test_merge_and_unmerge(tmp_path):
    base = Net(torch.float64)
    model = lorakit.inject(base, lorakit.LoraConfig(r=3, alpha=5, target_modules=TARGETS, init="nonzero", use_dora=True))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_magnitude["default"].mul_(0.7)
    weights = {n: layer.base_weight().clone() for n, layer in lorakit.lora_layers(model)}
    before = _outputs(model, torch.float64)
    lorakit.merge(model)
    assert _max_diff(_outputs(model, torch.float64), before) < 1e-12
    lorakit.unmerge(model)
    assert all(torch.allclose(layer.base_weight(), weights[n], atol=1e-13) for n, layer in lorakit.lora_layers(model))
    merged = lorakit.merge_and_unload(copy.deepcopy(model))
    assert _max_diff(_outputs(merged, torch.float64), before) < 1e-12


def test_dora_on_gpt2_conv1d_matches_peft(tmp_path):
    base = tiny_gpt2()
    pristine = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False,
                          use_dora=True, fan_in_fan_out=True)
    theirs = peft.get_peft_model(base, cfg).eval()
    theirs.save_pretrained(tmp_path / "a")
    ours = lorakit.load_adapter(pristine, tmp_path / "a")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-5


def test_dora_with_dropout_trains_and_matches_eval_in_eval_mode():
    model = lorakit.inject(Net(), lorakit.LoraConfig(r=2, alpha=4, dropout=0.3, target_modules=["lin", "out"],
                                                     use_dora=True))
    ids, img = _inputs(torch.float32)
    model.train()
    h, _ = model(ids, img)
    h.sum().backward()
    mags = [layer.lora_magnitude["default"].grad for _, layer in lorakit.lora_layers(model)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in mags)
    model.eval()
    assert _max_diff(_outputs(model, torch.float32), _outputs(Net(), torch.float32)) < 1e-5  # B = 0: unchanged


def test_dora_is_refused_where_lorakit_computes_plain_lora(tmp_path):
    model = lorakit.inject(Net(), lorakit.LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["lin"]), "plain")
    with pytest.raises(lorakit.ConfigError, match="DoRA"):
        lorakit.combine(model, {"default": 1.0}, "sum")
    with pytest.raises(lorakit.ConfigError, match="DoRA"):
        with lorakit.batch_adapters(model, ["default", "plain", None]):
            pass


def test_quantizing_a_dora_model_is_refused_and_changes_nothing():
    from lorakit.quant import QuantizationError, quantize_base

    model = lorakit.inject(Net(), lorakit.LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    with pytest.raises(QuantizationError, match="DoRA"):
        quantize_base(model)
    assert isinstance(model.lin.base_layer, nn.Linear) and isinstance(model.out, nn.Linear)


def test_dora_layers_are_left_alone_by_share_inputs_and_fuse_mlps():
    from tests.conftest import tiny_llama

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    cfg = lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                             init="nonzero", use_dora=True)
    model = lorakit.inject(tiny_llama(), cfg)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        lorakit.share_inputs(model)
        lorakit.fuse_mlps(model)
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)


def test_inspect_names_dora_and_refuses_vllm(tmp_path):
    from lorakit.cli.inspect import describe

    model = lorakit.inject(Net(), lorakit.LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    lorakit.save_adapter(model, tmp_path / "a")
    lines = describe(tmp_path / "a")
    assert any(line.startswith("variant: DoRA") for line in lines)
    assert any(line.startswith("vLLM: no") and "DoRA" in line for line in lines)


def test_training_with_dropout_matches_peft_given_the_same_mask(monkeypatch):
    """PEFT's dropout semantics — (f − 1)·x̃Wᵀ + f·s·x̃AᵀBᵀ on top of the base — with PEFT's dropout module
    replaced by lorakit's mask for the same seed: outputs and gradients agree in float64."""
    from lorakit.ops.dora import dropped_copy

    p, seed = 0.3, 4321
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    pristine = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, lora_dropout=p, target_modules=["0", "2"], init_lora_weights=False,
                          use_dora=True)
    theirs = peft.get_peft_model(base, cfg)

    class SameMask(nn.Module):
        def forward(self, x):
            return dropped_copy(x.reshape(-1, x.shape[-1]), p, seed).reshape(x.shape)

    for name in ("0", "2"):
        theirs.base_model.model.get_submodule(name).lora_dropout["default"] = SameMask()
    tmp = {k.replace("base_model.model.", ""): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    ours = lorakit.inject(pristine, lorakit.LoraConfig(r=2, alpha=3, dropout=p, target_modules=["0", "2"], use_dora=True))
    with torch.no_grad():
        for name, layer in lorakit.lora_layers(ours):
            layer.lora_A["default"].copy_(tmp[f"{name}.lora_A.weight"])
            layer.lora_B["default"].copy_(tmp[f"{name}.lora_B.weight"])
            layer.lora_magnitude["default"].copy_(tmp[f"{name}.lora_magnitude_vector"])
    monkeypatch.setattr(lorakit.LoraLayer, "_dropout_and_seed", lambda self, name: (p, seed) if self.training else (0.0, 0))
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (ours.train(), theirs.train()):
        out = model(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(outs[0], _eval_out(ours, x), atol=1e-6), "dropout must change the output"
    for name, layer in lorakit.lora_layers(ours):
        mod = theirs.base_model.model.get_submodule(name)
        for ours_p, theirs_p in ((layer.lora_A["default"], mod.lora_A["default"].weight),
                                 (layer.lora_B["default"], mod.lora_B["default"].weight),
                                 (layer.lora_magnitude["default"], mod.lora_magnitude_vector["default"].weight)):
            assert torch.allclose(ours_p.grad, theirs_p.grad, rtol=1e-10, atol=1e-12)


def _eval_out(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return out


def test_trainer_trains_and_saves_dora(tmp_path):
    import io

    from tiny_models import ToyTask

    from lorakit.train.config import TrainConfig
    from lorakit.train.trainer import Trainer

    task = ToyTask(n=12)
    initial = {name: torch.linalg.norm(task.model[int(name)].weight.detach(), dim=1) for name in task.default_targets}
    cfg = lorakit.LoraConfig(r=2, target_modules=task.default_targets, use_dora=True)
    Trainer(task, cfg, TrainConfig(max_steps=3, lr=1e-2, batch_size=4), tmp_path, log=io.StringIO(), device="cpu").fit()
    saved = lorakit.read_adapter(tmp_path / "adapter")
    assert saved.config.use_dora
    for name, norm in initial.items():  # m starts at the row norms of W (B = 0) and training moves it
        m = saved.tensors[f"base_model.model.{name}.lora_magnitude_vector"]
        assert m.shape == norm.shape and not torch.allclose(m, norm, atol=1e-4)


def test_inference_reuses_the_norm_until_a_weight_changes(monkeypatch):
    model = lorakit.inject(Net(torch.float64), lorakit.LoraConfig(r=2, target_modules=["lin"], init="nonzero",
                                                                 use_dora=True)).eval()
    calls = []
    original = lorakit.LoraLinear.dora_norm
    monkeypatch.setattr(lorakit.LoraLinear, "dora_norm", lambda self, name: calls.append(name) or original(self, name))
    ids, img = _inputs(torch.float64)
    first = _outputs(model, torch.float64)
    assert _max_diff(_outputs(model, torch.float64), first) == 0 and len(calls) == 1  # cached
    with torch.no_grad():
        model.lin.lora_B["default"].mul_(2.0)  # an in-place change: the cache must notice
    changed = _outputs(model, torch.float64)
    assert len(calls) == 2
    with torch.enable_grad():  # training-style calls compute n in the op, never from the cache
        expected = model(ids, img)
    assert _max_diff(changed, expected) < 1e-12 and _max_diff(changed, first) > 1e-6
