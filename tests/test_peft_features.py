"""The PEFT layer kinds and options beyond plain Linear LoRA: N-d and grouped convolutions, lora_bias,
refusal of PEFT variants lorakit lacks, PEFT-lenient matching of configs read from files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.config import unsupported
from lorakit.errors import MergeError, TargetError, UnsupportedFeatureError, UnsupportedModuleError


def _randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for p in layer.trainable("default"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize(("conv", "shape"), [(nn.Conv1d, (2, 4, 9)), (nn.Conv3d, (2, 4, 5, 5, 5))])
def test_conv_nd_matches_float64_reference(conv, shape):
    """h = conv(x; W) + s·conv(conv(x; A); B) + s·b, against the same sum written out with ΔW = s·BA reshaped."""
    torch.manual_seed(0)
    net = nn.Sequential(conv(4, 6, 3, stride=2, padding=1, dilation=1)).double().eval()
    base = copy.deepcopy(net)
    lorakit.inject(net, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"], lora_bias=True))
    _randomise(net)
    layer = net[0]
    x = torch.randn(shape, dtype=torch.float64)
    W, b = base[0].weight, base[0].bias
    delta = (layer.lora_B["default"] @ layer.lora_A["default"]).reshape(W.shape) * 2.0
    fn = F.conv1d if conv is nn.Conv1d else F.conv3d
    want = fn(x, W + delta, b + 2.0 * layer.lora_bias["default"], stride=2, padding=1)
    assert torch.allclose(net(x), want, atol=1e-12)
    lorakit.merge(net)  # weight and bias both take the update
    assert torch.allclose(net(x), want, atol=1e-12)
    lorakit.unmerge(net)
    assert torch.allclose(layer.base_layer.bias, b, atol=1e-12) and torch.allclose(layer.base_layer.weight, W, atol=1e-12)


def test_grouped_conv_update_and_refusals():
    """groups > 1 (PEFT's way): A an ungrouped conv to r channels, B a grouped 1×1 conv; ΔW is an ungrouped conv
    the grouped weight cannot hold, so merging is refused and leaves the weight alone; r must divide by groups."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)).double().eval()
    with pytest.raises(UnsupportedModuleError, match="multiple of 2"):
        lorakit.inject(copy.deepcopy(net), lorakit.LoraConfig(r=3, target_modules=["0"]))
    lorakit.inject(net, lorakit.LoraConfig(r=4, alpha=4, target_modules=["0"]))
    _randomise(net)
    layer = net[0]
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    A = layer.lora_A["default"].reshape(4, 4, 3, 3)  # (r, in, kh, kw): all input channels
    B = layer.lora_B["default"]  # (d, r/groups)
    assert B.shape == (6, 2)
    B_full = torch.zeros(6, 4, dtype=torch.float64)  # the block-diagonal B the grouped 1×1 conv applies
    B_full[:3, :2], B_full[3:, 2:] = B[:3], B[3:]
    want = layer.base_layer(x) + F.conv2d(x, torch.einsum("or,rikl->oikl", B_full, A))
    assert torch.allclose(net(x), want, atol=1e-12)
    before = layer.base_layer.weight.clone()
    with pytest.raises(MergeError, match="groups=2"):
        lorakit.merge(net)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged_adapters


def test_lora_bias_merge_needs_a_base_bias_and_embeddings_refuse_it():
    net = nn.Sequential(nn.Linear(4, 3, bias=False)).eval()
    lorakit.inject(net, lorakit.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    _randomise(net)
    before = net[0].base_layer.weight.clone()
    with pytest.raises(MergeError, match="no bias"):
        lorakit.merge(net)
    assert torch.equal(net[0].base_layer.weight, before)
    with pytest.raises(UnsupportedModuleError, match="lora_bias"):
        lorakit.inject(nn.Sequential(nn.Embedding(5, 3)), lorakit.LoraConfig(target_modules=["0"], lora_bias=True))


def test_wrappers_follow_the_models_training_mode():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    lorakit.inject(net, lorakit.LoraConfig(r=2, dropout=0.5, target_modules=["0"], modules_to_save=["1"]))
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("use_dora", True, "DoRA"), ("kasa_config", {"beta": 1}, "KaSA"), ("use_bdlora", {"nblocks": 2}, "BD-LoRA"),
        ("alora_invocation_tokens", [5, 6], "Activated LoRA"), ("use_qalora", True, "QA-LoRA"),
        ("layer_replication", [[0, 2]], "layer replication"), ("arrow_config", {"top_k": 2}, "Arrow"),
        ("init_lora_weights", "corda", "CorDA"), ("init_lora_weights", "loftq", "LoftQ"),
        ("init_lora_weights", "lora_ga", "LoRA-GA"), ("bias", "all", "bias='all'"),
    ],
)
def test_peft_variants_lorakit_lacks_are_refused_by_name(field, value, words, tmp_path):
    if field in {f for f in lorakit.LoraConfig.__dataclass_fields__}:
        pytest.skip(f"lorakit supports {field} now")
    data = lorakit.LoraConfig(target_modules=["0"]).to_peft_dict() | {field: value}
    with pytest.raises(UnsupportedFeatureError, match=f"this adapter uses .*{words}.*which lorakit does not support"):
        lorakit.LoraConfig.from_peft_dict(data)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_a_plain_lora_are_accepted(init):
    """These only choose the starting A and B (MiCA also freezes B while training); the saved adapter is plain LoRA."""
    assert unsupported(lorakit.LoraConfig(target_modules=["0"]).to_peft_dict() | {"init_lora_weights": init}) is None


def test_modules_to_save_from_a_file_match_as_peft_does(tmp_path):
    """A SEQ_CLS file lists ["classifier", "score"] whatever the model has; PEFT matches any suffix; exclude_modules
    may remove a listed target. A config a user writes keeps lorakit's typo check."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    model = Head().eval()
    base = copy.deepcopy(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"]))
    _randomise(model)
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    path = lorakit.save_adapter(model, tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    config |= {"modules_to_save": ["classifier", "score"], "target_modules": ["body", "classifier", "q_proj"],
               "exclude_modules": ["classifier"], "task_type": "SEQ_CLS"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    loaded = lorakit.load_adapter(copy.deepcopy(base), path)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(TargetError, match="score"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["body"], modules_to_save=["classifier", "score"]))


class _Experts(nn.Module):
    """An MoE block whose experts are 3-D parameters (no nn.Linear), like transformers' Llama4 / Qwen-MoE ones."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed  # experts stored (E, in, out) instead of (E, out, in)
        self.gate_up_proj = nn.Parameter(torch.randn(3, 6, 8) if transposed else torch.randn(3, 8, 6))
        self.down_proj = nn.Parameter(torch.randn(3, 8, 6) if transposed else torch.randn(3, 6, 8))

    def forward(self, x):  # x: (E, n, 6), one token group per expert
        up = x @ self.gate_up_proj if self.is_transposed else x @ self.gate_up_proj.transpose(1, 2)
        up = torch.relu(up)
        return up @ self.down_proj if self.is_transposed else up @ self.down_proj.transpose(1, 2)


class _Moe(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.experts = _Experts(transposed)

    def forward(self, x):
        return self.experts(x)


@pytest.mark.parametrize("transposed", [False, True])
def test_target_parameters_on_3d_experts_match_peft_both_ways(transposed, tmp_path):
    """PEFT's ParamWrapper semantics and keys (nested wrappers for two parameters of one module), both ways, and
    merge = unmerged forward."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Moe(transposed).eval()
    x = torch.randn(3, 5, 6)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=3, target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    layer = ours.experts
    assert isinstance(layer, lorakit.layers.LoraParameter) and layer.parameter_name == "down_proj"  # outermost
    assert layer.lora_A["default"].shape == (6, 8)  # (r·E, k): k = 8 either way for down_proj
    with torch.no_grad():
        want = theirs(x)
        assert torch.allclose(ours(x), want, atol=1e-5)
        lorakit.merge(ours)
        assert torch.allclose(ours(x), want, atol=1e-5)
        lorakit.unmerge(ours)
    lorakit.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(back(x), want, atol=1e-5)
    # the same adapter trained from lorakit: only A and B of both wrappers get gradients
    trained = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(
        r=2, alpha=3, init="nonzero", target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    trained(x).square().sum().backward()
    grads = {n for n, p in trained.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in trained.named_parameters() if "lora_" in n} and len(grads) == 4


def test_target_parameters_typo_and_dropout_are_refused():
    base = _Moe(False)
    with pytest.raises(TargetError, match="gate_proj"):
        lorakit.inject(base, lorakit.LoraConfig(target_parameters=["experts.gate_proj"]))
    with pytest.raises(UnsupportedModuleError, match="dropout"):
        lorakit.inject(base, lorakit.LoraConfig(dropout=0.1, target_parameters=["experts.down_proj"]))
    assert isinstance(base.experts, _Experts) and not any(p.requires_grad is False for p in base.parameters())


def test_multihead_attention_update_merge_and_refusals():
    """in_proj gets s·BA, out_proj c·s·B'A' with PEFT's c = 2 (a float64 reference with the weights set by hand);
    merge gives the same output and unmerge restores both weights; out_proj alone is refused (MHA never calls it)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.MultiheadAttention(8, 2)).double().eval()
    net = copy.deepcopy(base)
    lorakit.inject(net, lorakit.LoraConfig(r=2, alpha=3, init="nonzero", target_modules=["0"]))
    layer = net[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref[0].in_proj_weight += 1.5 * layer.lora_B["default"] @ layer.lora_A["default"]
        ref[0].out_proj.weight += 2 * 1.5 * layer.out_B["default"] @ layer.out_A["default"]
        want = ref[0](x, x, x)[0]
        assert torch.allclose(net[0](x, x, x)[0], want, atol=1e-12)
        lorakit.merge(net)
        assert torch.allclose(net[0](x, x, x)[0], want, atol=1e-12)
        lorakit.unmerge(net)
        assert torch.allclose(layer.base_layer.out_proj.weight, base[0].out_proj.weight, atol=1e-12)
        assert torch.allclose(layer.base_layer.in_proj_weight, base[0].in_proj_weight, atol=1e-12)
    net[0](x, x, x)[0].sum().backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None} == {
        "0.lora_A.default", "0.lora_B.default", "0.out_A.default", "0.out_B.default"}
    with pytest.raises(UnsupportedModuleError, match="out_proj"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["out_proj"]))
    with pytest.raises(TargetError, match="all-linear"):  # all-linear skips an attention's out_proj: nothing left here
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules="all-linear"))


def test_trainable_tokens_rows_forward_unload_and_refusals():
    """Rows [1, 4] of the embedding take the adapter's values (others untouched); merge_and_unload writes them in;
    disabling gives the base; only the rows' values get gradients; a LoRA on the same embedding is refused."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens, self.head = nn.Embedding(6, 3), nn.Linear(3, 2)

        def forward(self, ids):
            return self.head(self.embed_tokens(ids))

    torch.manual_seed(0)
    base = Tiny().eval()
    net = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["head"], trainable_token_indices=[1, 4]))
    tokens = net.embed_tokens
    assert isinstance(tokens, lorakit.modules_to_save.TrainableTokens) and tokens.token_indices["default"] == (1, 4)
    new = torch.randn(2, 3)
    with torch.no_grad():
        tokens.copies["default"].copy_(new)
    ids = torch.tensor([[0, 1, 4, 5]])
    want = base.embed_tokens.weight.detach().clone()
    want[[1, 4]] = new
    assert torch.equal(tokens(ids), want[ids])
    with lorakit.disable_adapters(net):
        assert torch.equal(net.embed_tokens(ids), base.embed_tokens(ids))
    net(ids).sum().backward()
    assert tokens.copies["default"].grad is not None and base.embed_tokens.weight.grad is None
    assert not tokens.original_module.weight.requires_grad
    plain = lorakit.merge_and_unload(net)
    assert isinstance(plain.embed_tokens, nn.Embedding) and torch.equal(plain.embed_tokens.weight, want)
    with pytest.raises(UnsupportedFeatureError, match="trainable tokens"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["embed_tokens"],
                                                               trainable_token_indices={"embed_tokens": [0]}))
    with pytest.raises(TargetError, match="emb"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["head"], trainable_token_indices={"emb": [0]}))


def test_combine_and_hot_swap_refuse_the_new_kinds(tmp_path):
    """combine and hot_swap work on plain B·A updates; an attention or parameter adapter is refused by name."""
    base = nn.Sequential(nn.MultiheadAttention(8, 2))
    net = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["0"]))
    lorakit.inject(net, lorakit.LoraConfig(r=2, target_modules=["0"]), adapter_name="b")
    with pytest.raises(lorakit.ConfigError, match="LoraMultiheadAttention"):
        lorakit.combine(net, {"default": 1.0, "b": 1.0}, "c")
    path = lorakit.save_adapter(net, tmp_path / "a", "b")
    with pytest.raises(lorakit.AdapterMismatchError, match="LoraMultiheadAttention"):
        lorakit.hot_swap(net, "default", path)


def test_peft_seq_cls_adapter_loads(ids, tmp_path):
    """The issue's case: PEFT's SEQ_CLS file lists modules_to_save ["classifier", "score"] on a BERT classifier."""
    peft = pytest.importorskip("peft")
    from tests.conftest import tiny_bert_classifier

    base = tiny_bert_classifier().eval()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], init_lora_weights=False)).eval()
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    assert {"classifier", "score"} <= set(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"])
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-5


def test_bdlora_block_diagonal_factors():
    """use_bdlora: A of lin0 is blockdiag(A_1, A_2) (stored (r, k/2)), B of lin1 blockdiag(B_1, B_2) (stored (d, r/2));
    the output is the plain LoRA of the expanded factors (float64), merge agrees, off-block entries never train."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 8)).double().eval()
    cfg = lorakit.LoraConfig(r=4, alpha=4, init="nonzero", target_modules=["0", "1"],
                             use_bdlora={"target_modules_bd_a": ["0"], "target_modules_bd_b": ["1"], "nblocks": 2})
    net = lorakit.inject(copy.deepcopy(base), cfg)
    A0, B1 = net[0].lora_A["default"], net[1].lora_B["default"]
    assert A0.shape == (4, 3) and B1.shape == (8, 2) and net[0].lora_B["default"].shape == (4, 4)
    A0_full = torch.zeros(4, 6, dtype=torch.float64)
    A0_full[:2, :3], A0_full[2:, 3:] = A0[:2], A0[2:]
    B1_full = torch.zeros(8, 4, dtype=torch.float64)
    B1_full[:4, :2], B1_full[4:, 2:] = B1[:4], B1[4:]
    x = torch.randn(5, 6, dtype=torch.float64)
    h = base[0](x) + x @ A0_full.t() @ net[0].lora_B["default"].t()
    want = base[1](h) + h @ net[1].lora_A["default"].t() @ B1_full.t()
    assert torch.allclose(net(x), want, atol=1e-12)
    with torch.no_grad():
        lorakit.merge(net)
        assert torch.allclose(net(x), want, atol=1e-12)
        lorakit.unmerge(net)
    net(x).sum().backward()
    assert A0.grad.shape == A0.shape and B1.grad.shape == B1.shape
    with pytest.raises(lorakit.ConfigError, match="both"):
        lorakit.inject(copy.deepcopy(base), cfg.replace(use_bdlora={"target_modules_bd_a": ["0"],
                                                                   "target_modules_bd_b": ["0"], "nblocks": 2}))
    with pytest.raises(UnsupportedModuleError, match="linear layers only"):
        lorakit.inject(nn.Sequential(nn.Conv1d(4, 4, 1)), lorakit.LoraConfig(
            r=2, target_modules=["0"], use_bdlora={"target_modules_bd_a": ["0"], "nblocks": 2}))


def test_a_module_with_parameter_adapters_is_not_also_a_module_target():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lorakit.inject(net, lorakit.LoraConfig(r=2, target_parameters=["1.weight"]))
    with pytest.raises(UnsupportedModuleError, match="target_parameters"):
        lorakit.inject(net, lorakit.LoraConfig(r=2, target_modules="all-linear"), adapter_name="b")
    assert lorakit.adapter_names(net) == ["default"] and isinstance(net[0], nn.Linear)
