"""Adapter files: bit-exact round trip, strict and safe loading, atomic saving."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterFileError, AdapterMismatchError, ConfigError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import tiny_llama


def _trained(tmp_path, **cfg):
    model = tiny_llama()
    base = copy.deepcopy(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], **cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g))
    path = lorakit.save_adapter(model, tmp_path / "adapter")
    return model, base, path


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_modules()]


def _assert_unchanged(model, snap):
    state, names = snap
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_round_trip_is_bit_exact(tmp_path, ids):
    model, base, path = _trained(tmp_path)
    loaded = lorakit.load_adapter(base, path)
    for (n1, l1), (n2, l2) in zip(lorakit.lora_layers(model), lorakit.lora_layers(loaded)):
        assert n1 == n2
        assert torch.equal(l1.lora_A["default"], l2.lora_A["default"]) and torch.equal(l1.lora_B["default"], l2.lora_B["default"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default


def test_file_layout_is_peft(tmp_path):
    _, _, path = _trained(tmp_path)
    keys = set(load_file(path / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 2
    config = json.loads((path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    for key in ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                "modules_to_save", "base_model_name_or_path", "task_type"):
        assert key in config


def _corrupt_keys(path, fn):
    tensors = load_file(path / WEIGHTS_NAME)
    from safetensors import safe_open

    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    save_file(fn(tensors), str(path / WEIGHTS_NAME), metadata=meta)


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.v_proj.lora_B" not in k}, AdapterMismatchError, "missing key"),
        (lambda t: t | {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 32)}, AdapterMismatchError, "unexpected key"),
        (lambda t: {k: (v[:1] if "lora_A" in k else v) for k, v in t.items()}, AdapterMismatchError, "shape"),
    ],
)
def test_bad_keys_and_shapes(tmp_path, damage, error, match):
    _, base, path = _trained(tmp_path)
    _corrupt_keys(path, damage)
    snap = _snapshot(base)
    with pytest.raises(error, match=match):
        lorakit.load_adapter(base, path)
    _assert_unchanged(base, snap)


def test_truncated_file_and_bad_json(tmp_path):
    _, base, path = _trained(tmp_path)
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        lorakit.load_adapter(base, path)
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(base, path)


def test_unknown_peft_type_and_target_matching_nothing(tmp_path):
    _, base, path = _trained(tmp_path)
    config = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps(config | {"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ConfigError, match="PREFIX_TUNING"):
        lorakit.load_adapter(base, path)
    (path / CONFIG_NAME).write_text(json.dumps(config | {"target_modules": ["nope"]}))
    snap = _snapshot(base)
    with pytest.raises(AdapterMismatchError, match="nope"):
        lorakit.load_adapter(base, path)
    _assert_unchanged(base, snap)


def test_file_entries_matching_nothing_are_ignored_as_peft_does(tmp_path):
    """A file's target_modules / modules_to_save entries that match nothing load as in PEFT (SEQ_CLS files list
    ["classifier", "score"] whatever the model has); the same config written by a user is still a typo error."""
    model, base, path = _trained(tmp_path)
    config = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps(config | {"target_modules": ["q_proj", "v_proj", "nope"]}))
    ids = torch.randint(0, 64, (2, 5))
    loaded = lorakit.load_adapter(copy.deepcopy(base), path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(lorakit.TargetError, match="nope"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["q_proj", "nope"]))


def test_pickle_is_refused_and_missing_dir(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / CONFIG_NAME).write_text("{}")
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFileError, match="pickle"):
        lorakit.read_adapter(tmp_path / "p")
    with pytest.raises(AdapterFileError, match="not a directory"):
        lorakit.read_adapter(tmp_path / "nowhere")


def test_other_base_model_is_refused_unless_allowed(tmp_path, ids):
    model, _, path = _trained(tmp_path)
    other = tiny_llama(seed=1)
    snap = _snapshot(other)
    with pytest.raises(AdapterMismatchError, match="another base model"):
        lorakit.load_adapter(other, path)
    _assert_unchanged(other, snap)
    lorakit.load_adapter(other, path, allow_base_mismatch=True)
    # the same base in another dtype is still the same base
    same_in_bf16 = copy.deepcopy(tiny_llama()).to(torch.bfloat16)
    lorakit.load_adapter(same_in_bf16, path)


def test_crash_during_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model, base, path = _trained(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        next(iter(lorakit.lora_layers(model)))[1].lora_B["default"].add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", crash)  # fails after the weights were written to the temp dir
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind
    lorakit.save_adapter(model, path)  # and a good save replaces it
    assert {p.name: p.read_bytes() for p in path.iterdir()} != before


def test_saving_non_finite_is_refused(tmp_path):
    model, _, path = _trained(tmp_path)
    with torch.no_grad():
        next(iter(lorakit.lora_layers(model)))[1].lora_A["default"][0, 0] = float("nan")
    with pytest.raises(AdapterMismatchError, match="non-finite"):
        lorakit.save_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
