import dataclasses
import json
import math

import pytest

from lorakit import ConfigError, LoraConfig


def test_defaults_and_scale():
    cfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj"])
    assert cfg.scale_for("model.layers.0.q_proj") == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale_for("x") == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=0), dict(r=2.5), dict(r=True), dict(alpha=0), dict(alpha=-1.0), dict(alpha=float("nan")),
        dict(dropout=1.0), dict(dropout=-0.1), dict(init="xavier"), dict(target_modules=[]),
        dict(target_modules="(unclosed"), dict(target_modules=[""]), dict(rank_pattern={"q": 0}),
        dict(alpha_pattern={"q": -2}), dict(use_rslora="yes"), dict(modules_to_save="classifier"),
    ],
)
def test_invalid_values_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        LoraConfig(**kwargs)


def test_error_names_the_field():
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig(dropout=2)


def test_frozen():
    cfg = LoraConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4  # type: ignore[misc]


def test_patterns_match_like_peft():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"down_proj": 2, r"layers\.0\.q_proj": 4}, alpha_pattern={"v_proj": 1})
    assert cfg.rank_for("model.layers.1.mlp.down_proj") == 2
    assert cfg.rank_for("model.layers.0.q_proj") == 4
    assert cfg.rank_for("model.layers.10.q_proj") == 8  # "layers.0" must not match "layers.10"
    assert cfg.scale_for("model.layers.0.self_attn.v_proj") == 1 / 8
    assert cfg.rank_for("model.layers.1.mlp.xdown_proj") == 8  # a suffix must start at a dot


def test_peft_json_round_trip():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q", "v"], init="gaussian", use_rslora=True,
                     rank_pattern={"q": 2}, modules_to_save=["head"], task_type="CAUSAL_LM")
    data = json.loads(json.dumps(cfg.to_peft_dict()))
    assert data["peft_type"] == "LORA" and data["lora_alpha"] == 8 and data["init_lora_weights"] == "gaussian"
    assert LoraConfig.from_peft_dict(data) == cfg


@pytest.mark.parametrize("extra", [{"peft_type": "IA3"}, {"use_qalora": True}, {"bias": "all"}, {"layers_to_transform": [0]}])
def test_unsupported_peft_configs_are_refused(extra):
    data = LoraConfig(target_modules=["q"]).to_peft_dict() | extra
    with pytest.raises(ConfigError, match=next(iter(extra))):
        LoraConfig.from_peft_dict(data)
