"""PEFT's training-only LoRA variants, VeLoRA and MonteCLoRA: their files load as plain LoRA with PEFT's outputs
and a warning naming the variant, their extra tensors are accepted only under PEFT's names and shapes, and
lorakit writes them back as plain LoRA adapters that PEFT loads with the same outputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.errors import AdapterMismatchError, ConfigError, PlainLoraVariantWarning, UnsupportedFeatureError

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(10, 13), nn.Linear(13, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.lin1(torch.relu(self.lin0(x))))


# num_groups=3: VeLoRA's projection has ⌈10/3⌉ = 4 entries on lin0, ⌈13/3⌉ = 5 on lin1;
# MonteCLoRA's sampler is sized by each module's rank (4, and 2 on lin1) and num_samples=3.
VARIANTS = {
    "VeLoRA": {"velora_config": {"num_groups": 3, "init_type": "random"}},
    "MonteCLoRA": {"monteclora_config": {"num_samples": 3}, "rank_pattern": {"lin1": 2}},
}
EXTRA = {
    "VeLoRA": {"lin0.lora_velora_embed": (4,), "lin1.lora_velora_embed": (5,)},
    "MonteCLoRA": {"lin0.lora_monteclora_sampler.std_prior": (4,), "lin1.lora_monteclora_sampler.std_prior": (2,),
                   "lin1.lora_monteclora_sampler.gaussian_var_prior": (2, 2),
                   "lin1.lora_monteclora_sampler.expert_weights": (3,)},
}


def _peft_config(variant: str):
    kw = dict(VARIANTS[variant])
    for key, cls in (("velora_config", "VeloraConfig"), ("monteclora_config", "MontecloraConfig")):
        if key in kw:
            if not hasattr(peft, cls):
                pytest.skip(f"PEFT {peft.__version__} has no {cls}")
            kw[key] = getattr(peft, cls)(**kw[key])
    return peft.LoraConfig(r=4, lora_alpha=6, target_modules=["lin0", "lin1"], init_lora_weights=False, **kw)


def _peft_file(variant: str, path):
    """PEFT's adapter for ``variant`` on Net, saved at ``path``; (base model, PEFT model in eval mode)."""
    torch.manual_seed(0)
    base = Net().eval()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(variant)).eval()
    theirs.save_pretrained(path)
    return base, theirs


def _load_quietly(model: nn.Module, path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlainLoraVariantWarning)
        return lorakit.load_adapter(model, path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_as_plain_lora_with_one_warning_and_saves_a_plain_lora_peft_loads(variant, tmp_path):
    base, theirs = _peft_file(variant, tmp_path / "peft")
    saved = load_file(str(tmp_path / "peft" / WEIGHTS))
    for key, shape in EXTRA[variant].items():  # PEFT's extra state is in the file, as lorakit expects it
        assert tuple(saved["base_model.model." + key].shape) == shape
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ours_warnings = [w for w in caught if issubclass(w.category, PlainLoraVariantWarning)]
    assert len(ours_warnings) == 1
    message = str(ours_warnings[0].message)
    assert variant in message and "same outputs" in message and "trains it further as plain LoRA" in message
    x = torch.randn(7, 10)
    with torch.no_grad():
        want = theirs(x)
        assert (ours(x) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
        assert not torch.allclose(ours(x), base(x))
        lorakit.merge(ours)  # PEFT merges these variants as plain LoRA too
        assert (ours(x) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
        lorakit.unmerge(ours)

    lorakit.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG).read_text())
    assert "velora_config" not in config and "monteclora_config" not in config
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in load_file(str(tmp_path / "ours" / WEIGHTS)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlainLoraVariantWarning)  # lorakit's own file is plain LoRA: no warning
        lorakit.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert back.peft_config["default"].velora_config is None and back.peft_config["default"].monteclora_config is None
    with torch.no_grad():
        assert (back(x) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_velora_changes_only_the_backward():
    """The claim lorakit rests on, checked on PEFT itself: VeLoRA's training forward equals plain LoRA's (only A's
    gradient is approximated), so the eval outputs of the saved A and B are plain LoRA's in any mode."""
    torch.manual_seed(0)
    base = Net()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config("VeLoRA")).train()
    x = torch.randn(7, 10)
    with torch.no_grad():
        want = theirs(x)
    out = theirs(x)  # training mode, grad enabled: VeloraFunction
    assert torch.allclose(out, want, atol=1e-6)


def _rewrite(path, rename: dict[str, str] | None = None, config: dict | None = None, values: dict | None = None) -> None:
    tensors = load_file(str(path / WEIGHTS))
    tensors = {(rename or {}).get(k, k): v for k, v in tensors.items()} | (values or {})
    save_file(tensors, str(path / WEIGHTS))
    if config is not None:
        (path / CONFIG).write_text(json.dumps(json.loads((path / CONFIG).read_text()) | config))


@pytest.mark.parametrize(
    ("variant", "change", "words"),
    [
        ("VeLoRA", {"rename": {"lin0.lora_velora_embed": "lin0.lora_velora_embedding"}}, "unexpected key"),
        ("VeLoRA", {"rename": {"lin0.lora_velora_embed": "head.lora_velora_embed"}}, "unexpected key"),
        ("VeLoRA", {"config": {"velora_config": None}}, "unexpected key .*lora_velora_embed"),
        ("VeLoRA", {"values": {"lin1.lora_velora_embed": torch.ones(4)}}, r"lora_velora_embed has shape \(4,\)"),
        ("MonteCLoRA", {"rename": {"lin1.lora_monteclora_sampler.std_prior": "lin1.lora_monteclora_sampler.std"}},
         "unexpected key"),
        ("MonteCLoRA", {"values": {"lin0.lora_monteclora_sampler.expert_weights": torch.ones(2)}},
         r"expert_weights has shape \(2,\)"),
    ],
)
def test_variant_state_is_accepted_only_under_peft_names_and_shapes(variant, change, words, tmp_path):
    base, _ = _peft_file(variant, tmp_path / "peft")
    prefix = "base_model.model."
    _rewrite(tmp_path / "peft", rename={prefix + k: prefix + v for k, v in change.get("rename", {}).items()},
             config=change.get("config"), values={prefix + k: v for k, v in change.get("values", {}).items()})
    model = copy.deepcopy(base)
    with pytest.raises(AdapterMismatchError, match=words):
        _load_quietly(model, tmp_path / "peft")
    assert lorakit.adapter_names(model) == [] and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_files_without_the_variant_state_still_load(tmp_path):
    """The extra tensors do not enter the outputs: a file without them loads the same adapter."""
    base, theirs = _peft_file("MonteCLoRA", tmp_path / "peft")
    tensors = {k: v for k, v in load_file(str(tmp_path / "peft" / WEIGHTS)).items() if "monteclora" not in k}
    save_file(tensors, str(tmp_path / "peft" / WEIGHTS))
    ours = _load_quietly(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "error", "words"),
    [
        ({"velora_config": {"num_groups": 2}, "use_dora": True}, UnsupportedFeatureError, "VeLoRA .*with DoRA"),
        ({"monteclora_config": {}, "velora_config": {}}, UnsupportedFeatureError, "VeLoRA .*with MonteCLoRA"),
        ({"monteclora_config": {}, "init_lora_weights": "mica"}, UnsupportedFeatureError, "MonteCLoRA .*with MiCA"),
        ({"velora_config": 2}, ConfigError, "velora_config must be a JSON object"),
        ({"velora_config": {"num_groups": 0}}, ConfigError, r"velora_config.num_groups must be an integer ≥ 1"),
        ({"monteclora_config": {"num_samples": "8"}}, ConfigError, "monteclora_config.num_samples"),
    ],
)
def test_variant_configs_peft_would_not_build_are_refused(extra, error, words):
    data = lorakit.LoraConfig(target_modules=["lin0"]).to_peft_dict() | extra
    with pytest.raises(error, match=words):
        lorakit.LoraConfig.from_peft_dict(data)


def test_a_peft_config_object_with_the_variant_warns_too():
    """lorakit.integrations.hf builds from a peft.LoraConfig through the same reader: training then is plain LoRA."""
    with pytest.warns(PlainLoraVariantWarning, match="MonteCLoRA"):
        config = lorakit.LoraConfig.from_peft_dict(_peft_config("MonteCLoRA").to_dict())
    assert config.rank_for("lin1") == 2 and not hasattr(config, "monteclora_config")


@pytest.mark.parametrize("variant", VARIANTS)
def test_hot_swap_takes_the_variant_as_plain_lora(variant, tmp_path):
    """A served slot swaps in a VeLoRA / MonteCLoRA file as the plain LoRA it computes; a misplaced key still fails."""
    base, theirs = _peft_file(variant, tmp_path / "peft")
    served = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["lin0", "lin1"]), "slot")
    with pytest.warns(PlainLoraVariantWarning, match=variant):
        lorakit.hot_swap(served, "slot", tmp_path / "peft")
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert torch.allclose(served(x), theirs(x), atol=1e-5)
    key = next(iter(EXTRA[variant]))
    _rewrite(tmp_path / "peft", rename={"base_model.model." + key: "base_model.model.head." + key.split(".", 1)[1]})
    with pytest.raises(AdapterMismatchError, match="head.lora_"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlainLoraVariantWarning)
            lorakit.hot_swap(served, "slot", tmp_path / "peft")
