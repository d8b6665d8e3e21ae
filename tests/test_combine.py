"""Adapter arithmetic: exact methods by algebra, svd against a dense SVD, linear/cat/svd against PEFT,
ties/dare against an independent dense implementation, and save → load of the result."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.combine import combine
from lorakit.errors import AdapterNameError, ConfigError
from tests.conftest import tiny_llama
from tests.test_mixed_batch import randomize

TARGETS = ["q_proj", "v_proj"]


def two_adapters(rank_b: int = 4, seed: int = 0, v_rank_b: int = 2):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=rank_b, alpha=3, target_modules=TARGETS, rank_pattern={"v_proj": v_rank_b}), "b")
    randomize(model, seed)
    return model


def dw(layer, name):
    return layer.delta_weight(name).detach().double()


def weighted_delta(layer, weights):
    return sum(w * dw(layer, n) for n, w in weights.items())


W = {"a": 0.7, "b": -0.3}


def test_cat_is_exact_and_svd_at_full_rank_too():
    model = two_adapters()
    rep_cat = combine(model, W, "cat", method="cat")
    rep_svd = combine(model, W, "svd_full", method="svd", rank=8)
    for q, layer in lorakit.lora_layers(model):
        ref = weighted_delta(layer, W)
        torch.testing.assert_close(dw(layer, "cat"), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw(layer, "svd_full"), ref, rtol=1e-5, atol=1e-6)
        assert rep_cat.ranks[q] == (8 if "q_proj" in q else 6)
    assert rep_cat.discarded_energy == {} and rep_svd.max_discarded_energy < 1e-12


def test_svd_is_the_best_low_rank_approximation_and_reports_energy():
    model = two_adapters()
    rep = combine(model, W, "low", method="svd", rank=3)
    for q, layer in lorakit.lora_layers(model):
        ref = weighted_delta(layer, W)
        U, S, Vh = torch.linalg.svd(ref)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        torch.testing.assert_close(dw(layer, "low"), best, rtol=1e-4, atol=1e-6)
        assert rep.ranks[q] == 3
        assert rep.discarded_energy[q] == pytest.approx(float((S[3:] ** 2).sum() / (S**2).sum()), rel=1e-6)
        assert 0 < rep.discarded_energy[q] < 1


def test_linear_hand_rule_and_equal_ranks():
    model = two_adapters(v_rank_b=4)
    combine(model, W, "lin", method="linear")
    for q, layer in lorakit.lora_layers(model):
        ca, cb = 0.7 * layer.scaling["a"], -0.3 * layer.scaling["b"]
        A = ca**0.5 * layer.lora_A["a"] + abs(cb) ** 0.5 * layer.lora_A["b"]
        B = ca**0.5 * layer.lora_B["a"] - abs(cb) ** 0.5 * layer.lora_B["b"]
        torch.testing.assert_close(dw(layer, "lin"), (B @ A).detach().double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="equal ranks"):
        combine(two_adapters(rank_b=6), W, "lin", method="linear")


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_against_peft_add_weighted_adapter(method, tmp_path):
    peft = pytest.importorskip("peft")
    ours = two_adapters(v_rank_b=4)
    weights = {"a": 0.6, "b": 0.4}  # PEFT takes square roots of w·s: positive weights
    for n in weights:  # the same adapters into a PEFT model, through the files
        lorakit.save_adapter(ours, tmp_path / n, n)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    kw = {"svd_rank": 3} if method == "svd" else {}
    theirs.add_weighted_adapter(["a", "b"], list(weights.values()), "ab", combination_type=method, **kw)
    combine(ours, weights, "ab", method=method, **({"rank": 3} if method == "svd" else {}))
    peft_layers = {n: m for n, m in theirs.base_model.model.named_modules() if hasattr(m, "get_delta_weight")}
    for q, layer in lorakit.lora_layers(ours):
        torch.testing.assert_close(dw(layer, "ab"), peft_layers[q].get_delta_weight("ab").detach().double(), rtol=1e-4,
                                   atol=1e-5)


def _ties_reference(deltas, weights, density):
    """TIES written elementwise-independently with numpy: trim, elect, disjoint mean."""
    import numpy as np

    taus = [d.numpy() for d in deltas]
    trimmed = []
    for t, w in zip(taus, weights):
        k = int(round(density * t.size))
        cut = np.sort(np.abs(t).ravel())[::-1][k - 1]
        trimmed.append(np.where(np.abs(t) >= cut, t, 0.0) * w)
    trimmed = np.stack(trimmed)
    elected = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    return torch.from_numpy((trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1))


def test_ties_and_dare():
    model = two_adapters()
    rep = combine(model, W, "ties", method="ties", density=0.3, rank=32)  # rank 32 = hidden: no truncation
    for q, layer in lorakit.lora_layers(model):
        deltas = [dw(layer, n) for n in W]
        ref = _ties_reference(deltas, list(W.values()), 0.3)
        torch.testing.assert_close(dw(layer, "ties"), ref, rtol=1e-4, atol=1e-6)
        assert rep.discarded_energy[q] < 1e-10
    # dare at density 1 keeps everything: the weighted sum; below 1 it is a seeded, rescaled drop
    combine(model, W, "dare1", method="dare", density=1.0, rank=32)
    r1 = combine(model, W, "dareA", method="dare", density=0.5, rank=4, seed=3)
    combine(model, W, "dareB", method="dare", density=0.5, rank=4, seed=3)
    for q, layer in lorakit.lora_layers(model):
        torch.testing.assert_close(dw(layer, "dare1"), weighted_delta(layer, W), rtol=1e-4, atol=1e-6)
        assert torch.equal(dw(layer, "dareA"), dw(layer, "dareB"))
        assert r1.discarded_energy[q] > 0


def test_combined_adapter_saves_and_loads(tmp_path):
    model = two_adapters()
    combine(model, W, "ab", method="cat")  # different ranks per layer: rank_pattern in the file
    lorakit.set_adapter(model, "ab")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    path = lorakit.save_adapter(model, tmp_path / "ab", "ab")
    loaded = lorakit.load_adapter(tiny_llama(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_errors():
    model = two_adapters()
    with pytest.raises(AdapterNameError, match="'zz'"):
        combine(model, {"zz": 1.0}, "x")
    with pytest.raises(AdapterNameError, match="'a'"):
        combine(model, W, "a")
    with pytest.raises(ConfigError, match="method"):
        combine(model, W, "x", method="mean")
    with pytest.raises(ConfigError, match="density"):
        combine(model, W, "x", method="dare", density=0.0)
