"""lorakit.analysis on adapter directories: analyze, suggest, compare, plots, CLI, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lorakit import AdapterFileError, LoraConfig, LorakitError
from lorakit.analysis import AnalysisError, analyze_adapter, compare_adapters, suggest_ranks
from lorakit.analysis.groups import group_modules, module_depth
from lorakit.cli import main

LAYERS = 2
SHAPES = {"self_attn.q_proj": (24, 16), "self_attn.v_proj": (8, 16), "mlp.down_proj": (16, 40)}  # (d, k)


def write_adapter(path, factors, *, r, alpha=16.0, extra_config=None):
    """An adapter directory in PEFT's layout from {module: (A, B)}, written without lorakit.io."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.float().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, **(extra_config or {})}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def factors_of_rank(true_rank, r, seed, ranks=None):
    """{module: (A (r, k), B (d, r))} with ΔW = U Vᵀ of exact rank m = true_rank (per type via
    ``ranks``) and equal singular values, so m directions are needed for any energy > (m-1)/m."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(LAYERS):
        for kind, (d, k) in SHAPES.items():
            m = (ranks or {}).get(kind, true_rank)
            U = torch.linalg.qr(torch.randn(d, m, generator=g))[0]
            V = torch.linalg.qr(torch.randn(k, m, generator=g))[0]
            A = torch.zeros(r, k)
            A[:m] = V.T                                      # rows past m unused: rank(BA) = m
            B = torch.randn(d, r, generator=g)
            B[:, :m] = U
            out[f"model.layers.{layer}.{kind}"] = (A, B)
    return out


def random_factors(r, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{layer}.{kind}": (torch.randn(r, k, generator=g), torch.randn(d, r, generator=g))
            for layer in range(LAYERS) for kind, (d, k) in SHAPES.items()}


def test_known_rank_three_adapter(tmp_path):
    path = write_adapter(tmp_path / "a", factors_of_rank(3, 8, 0), r=8)
    analysis = analyze_adapter(path)
    assert len(analysis.modules) == LAYERS * len(SHAPES)
    for m in analysis.modules:
        assert [m.effective_rank(e) for e in (0.90, 0.95, 0.99)] == [m.effective_rank(0.90), 3, 3]
        assert m.scale == 2.0 and m.r == 8
    assert [g.label for g in analysis.groups] == ["down_proj", "q_proj", "v_proj"]
    suggestion = suggest_ranks(analysis)
    assert {t.label: t.suggested_r for t in suggestion.types} == {"q_proj": 3, "v_proj": 3, "down_proj": 3}
    assert suggestion.r == 3 and suggestion.rank_pattern == {}
    assert suggestion.alpha == 6.0  # keeps s = 16/8 = 2 at r = 3
    assert suggestion.params_after * 8 == suggestion.params_before * 3
    assert len(suggestion.types) == 3 and all(t.energy_kept == pytest.approx(1.0) for t in suggestion.types)


def test_spectrum_from_file_equals_full_product(tmp_path):
    factors = random_factors(8, 1)
    analysis = analyze_adapter(write_adapter(tmp_path / "a", factors, r=8, alpha=4.0))
    for m in analysis.modules:
        A, B = factors[m.name]
        full = torch.linalg.svdvals(0.5 * B.double() @ A.double())[:8]
        torch.testing.assert_close(m.sigma, full, rtol=1e-9, atol=1e-12)
        assert m.norm == pytest.approx(float(torch.linalg.matrix_norm(0.5 * B.double() @ A.double())))


def test_suggestion_per_type_and_rank_pattern_hits_exactly_those_modules(tmp_path):
    ranks = {"self_attn.q_proj": 2, "self_attn.v_proj": 2, "mlp.down_proj": 6}
    path = write_adapter(tmp_path / "a", factors_of_rank(0, 8, 2, ranks), r=8, extra_config={"use_rslora": True})
    suggestion = suggest_ranks(path)
    assert suggestion.r == 2 and suggestion.rank_pattern == {"down_proj": 6}
    # rsLoRA: s = 16/√8; α' = s·√r' keeps it
    s = 16 / math.sqrt(8)
    assert suggestion.alpha == pytest.approx(s * math.sqrt(2), rel=1e-5)
    assert suggestion.alpha_pattern["down_proj"] == pytest.approx(s * math.sqrt(6), rel=1e-5)
    new = suggestion.apply(LoraConfig(r=8, alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name in factors_of_rank(0, 8, 2, ranks):
        want = next(v for k, v in ranks.items() if name.endswith(k))
        assert new.rank_for(name) == want
        assert new.scale_for(name) == pytest.approx(s, rel=1e-5)


def test_at_ceiling_when_every_direction_is_used(tmp_path):
    suggestion = suggest_ranks(write_adapter(tmp_path / "a", factors_of_rank(4, 4, 3), r=4))
    assert suggestion.types and all(t.at_ceiling and t.suggested_r == 4 for t in suggestion.types)


def test_zero_update_is_reported_not_suggested(tmp_path):
    factors = factors_of_rank(3, 8, 4)
    for name in factors:
        if "v_proj" in name:
            factors[name] = (factors[name][0], torch.zeros_like(factors[name][1]))
    analysis = analyze_adapter(write_adapter(tmp_path / "a", factors, r=8))
    assert any("ΔW = 0" in n for n in analysis.notes)
    by_label = {t.label: t for t in suggest_ranks(analysis).types}
    assert by_label["v_proj"].suggested_r is None and by_label["q_proj"].suggested_r == 3


def test_peft_adapter_linear_embedding_conv_match_peft_delta_weight(tmp_path):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 12)
            self.conv = nn.Conv2d(3, 10, 3)
            self.lin = nn.Linear(12, 9)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["emb", "conv", "lin"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_()
    model.save_pretrained(str(tmp_path / "peft"))
    analysis = analyze_adapter(tmp_path / "peft")
    kinds = {m.name: m.kind for m in analysis.modules}
    assert kinds == {"emb": "embedding", "conv": "conv", "lin": "linear"}
    for m in analysis.modules:
        delta = model.base_model.model.get_submodule(m.name).get_delta_weight("default").double()
        full = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[: m.r]
        torch.testing.assert_close(m.sigma, full, rtol=1e-5, atol=1e-7)
        assert m.scale == 3.0


def test_base_model_norms(tmp_path):
    factors = factors_of_rank(3, 8, 5)
    g = torch.Generator().manual_seed(9)
    # a checkpoint without the adapter's leading "model." prefix, as some bare-backbone checkpoints are
    weights = {name.removeprefix("model.") + ".weight": torch.randn(*SHAPES[name.split(".", 3)[3]], generator=g)
               for name in factors}
    (tmp_path / "base").mkdir()
    save_file(weights, str(tmp_path / "base" / "model.safetensors"))
    analysis = analyze_adapter(write_adapter(tmp_path / "a", factors, r=8), base=tmp_path / "base")
    for m in analysis.modules:
        A, B = factors[m.name]
        delta = 2.0 * B.double() @ A.double()
        W = weights[m.name.removeprefix("model.") + ".weight"].double()
        assert m.relative_norm == pytest.approx(float(delta.norm() / W.norm()), rel=1e-5)
        U, S, Vh = torch.linalg.svd(delta)
        inside = torch.linalg.matrix_norm(U[:, :3].T @ W @ Vh[:3].T)
        assert m.amplification == pytest.approx(float(delta.norm() / inside), rel=1e-4)


def test_base_model_of_another_shape_is_refused(tmp_path):
    factors = factors_of_rank(3, 8, 6)
    (tmp_path / "base").mkdir()
    save_file({f"{n}.weight": torch.zeros(5, 5) for n in factors}, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(AnalysisError, match="different model"):
        analyze_adapter(write_adapter(tmp_path / "a", factors, r=8), base=tmp_path / "base")


def _nested_pair(tmp_path, seed=7, sigma=(10.0, 8.0, 0.5, 0.4, 0.3, 0.2)):
    """A rank-2 adapter and a rank-6 one whose top two directions are the rank-2 adapter's."""
    g = torch.Generator().manual_seed(seed)
    small, large = {}, {}
    for name, (_, _) in factors_of_rank(1, 2, 0).items():
        d, k = SHAPES[name.split(".", 3)[3]]
        U = torch.linalg.qr(torch.randn(d, 6, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(k, 6, generator=g, dtype=torch.float64))[0]
        sig = torch.tensor(sigma, dtype=torch.float64)
        large[name] = (V.T, U * sig)              # ΔW = U diag(σ) Vᵀ (s = 1: α = r)
        small[name] = (V[:, :2].T, U[:, :2] * sig[:2])
    a = write_adapter(tmp_path / "r2", small, r=2, alpha=2.0)
    b = write_adapter(tmp_path / "r6", large, r=6, alpha=6.0)
    return a, b


def test_compare_nested_adapters(tmp_path):
    a, b = _nested_pair(tmp_path)
    comparison = compare_adapters(a, b)
    for m in comparison.modules:
        assert m.grid.shape == (2, 6)
        torch.testing.assert_close(m.grid[:, 1:], torch.ones(2, 5, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert m.captured == pytest.approx(m.best, rel=1e-5)
    assert [t.verdict for t in comparison.types] == ["captured"] * 3
    assert comparison.conclusions()[0].startswith("rank 2 already captures the top directions of rank 6 in down_proj/q_proj/v_proj")
    # symmetric: swapping the adapters transposes every grid
    swapped = compare_adapters(b, a)
    for m, n in zip(comparison.modules, swapped.modules):
        torch.testing.assert_close(m.grid, n.grid.T)
    output_side = compare_adapters(a, b, side="output")
    assert output_side.types and all(t.verdict == "captured" for t in output_side.types)


def test_compare_unrelated_adapters(tmp_path):
    a = write_adapter(tmp_path / "a", random_factors(2, 11), r=2)
    b = write_adapter(tmp_path / "b", random_factors(8, 12), r=8)
    comparison = compare_adapters(a, b)
    assert comparison.types and all(t.verdict == "different directions" for t in comparison.types)
    assert comparison.modules and all(m.captured < 0.5 * m.best for m in comparison.modules)
    assert "learned different directions" in comparison.conclusions()[0]


def test_compare_same_top_directions_but_large_rank_spreads_further(tmp_path):
    a, b = _nested_pair(tmp_path, sigma=(1.0,) * 6)
    comparison = compare_adapters(a, b)
    assert comparison.types and all(t.verdict == "needs more rank" for t in comparison.types)
    assert comparison.modules and all(m.best == pytest.approx(2 / 6) and m.captured == pytest.approx(2 / 6) for m in comparison.modules)
    assert comparison.conclusions() == ["down_proj/q_proj/v_proj need more than rank 2: the rank-6 update keeps only "
                                        "33.3% of its energy in its top 2 directions."]


def test_mismatched_adapters_are_refused(tmp_path):
    a = write_adapter(tmp_path / "a", factors_of_rank(2, 4, 0), r=4)
    other = {f"model.blocks.{i}.attn": (torch.randn(4, 8), torch.randn(8, 4)) for i in range(2)}
    with pytest.raises(AnalysisError, match="no module in common"):
        compare_adapters(a, write_adapter(tmp_path / "b", other, r=4))
    resized = {name: (A[:, :5], B) for name, (A, B) in factors_of_rank(2, 4, 0).items()}
    with pytest.raises(AnalysisError, match="different models"):
        compare_adapters(a, write_adapter(tmp_path / "c", resized, r=4))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(AdapterFileError, match="not a directory"):
        analyze_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        analyze_adapter(tmp_path / "empty")
    with pytest.raises(AnalysisError, match="no LoRA tensors"):
        analyze_adapter({"classifier.weight": torch.zeros(2, 2)})
    with pytest.raises(AnalysisError, match="has no lora_B"):
        analyze_adapter({"base_model.model.fc.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(AnalysisError, match="do not form a product"):
        analyze_adapter({"base_model.model.fc.lora_A.weight": torch.zeros(2, 4),
                         "base_model.model.fc.lora_B.weight": torch.zeros(4, 3)})
    assert issubclass(AnalysisError, LorakitError)


def test_group_labels_are_unique_rank_pattern_keys():
    names = [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in
             ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]
    groups = group_modules(names)
    assert [g.label for g in groups] == ["query", "attention.output.dense", "intermediate.dense", "*.output.dense"]
    assert [g.family for g in groups] == ["attention", "attention", "mlp", "mlp"]
    config = LoraConfig(rank_pattern={g.pattern: i + 1 for i, g in enumerate(groups)})
    for i, g in enumerate(groups):
        assert g.names and all(config.rank_for(n) == i + 1 for n in g.names)
    assert module_depth("model.layers.11.mlp.up_proj") == 11 and module_depth("lm_head") is None


def _is_png(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_analyze_writes_report_plots_and_json(tmp_path, capsys):
    a, b = _nested_pair(tmp_path)
    assert main(["analyze", str(b), "--plots", str(tmp_path / "p1"), "--json", str(tmp_path / "one.json")]) == 0
    text = capsys.readouterr().out
    assert "per module type" in text and "rank suggestion" in text and '"rank_pattern"' in text
    assert _is_png(tmp_path / "p1" / "spectra.png") and _is_png(tmp_path / "p1" / "energy.png")
    data = json.loads((tmp_path / "one.json").read_text())
    assert data["adapters"][0]["suggestion"]["config"]["r"] == 2  # 164/164.54 ≥ 95 % in the top 2 directions
    assert main(["analyze", str(a), str(b), "--plots", str(tmp_path / "p2"), "--json", str(tmp_path / "two.json")]) == 0
    text = capsys.readouterr().out
    assert "rank 2 already captures the top directions of rank 6" in text
    assert _is_png(tmp_path / "p2" / "similarity.png")
    assert json.loads((tmp_path / "two.json").read_text())["comparison"]["types"][0]["verdict"] == "captured"


def test_cli_analyze_bad_directory_exits_2_with_message(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lorakit analyze: error:" in err and "adapter_config.json" in err


def _randomize_B(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_()


def test_lorakit_adapter_round_trip_matches_layer_delta_weight(tmp_path):
    import lorakit

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv, self.lin, self.head = nn.Embedding(20, 12), nn.Conv2d(3, 10, 3), nn.Linear(12, 9), nn.Linear(9, 2)

    torch.manual_seed(0)
    model = lorakit.inject(Net(), LoraConfig(r=4, alpha=8, target_modules=["emb", "conv", "lin"], modules_to_save=["head"]))
    _randomize_B(model)
    lorakit.save_adapter(model, tmp_path / "ad")
    analysis = analyze_adapter(tmp_path / "ad")
    assert {m.name: m.kind for m in analysis.modules} == {"conv": "conv", "emb": "embedding", "lin": "linear"}
    assert any("modules_to_save" in note for note in analysis.notes)
    for m in analysis.modules:
        delta = model.get_submodule(m.name).delta_weight("default").double()
        torch.testing.assert_close(m.sigma, torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[:4], rtol=1e-5, atol=1e-7)


def test_gpt2_conv1d_with_base_checkpoint(tmp_path):
    import lorakit
    from tests.conftest import tiny_gpt2
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    model.save_pretrained(str(tmp_path / "base"))  # keys "transformer.h.0.attn.c_proj.weight", stored (k, d)
    model = lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"]))
    _randomize_B(model)
    lorakit.save_adapter(model, tmp_path / "ad")
    analysis = analyze_adapter(tmp_path / "ad", base=tmp_path / "base")
    assert len(analysis.modules) == 6
    for m in analysis.modules:
        layer = model.get_submodule(m.name)
        assert isinstance(layer.base_layer, Conv1D)
        W = layer.base_layer.weight.detach().double().T            # HF Conv1D stores (k, d)
        delta = layer.scaling["default"] * layer.lora_B["default"].detach().double() @ layer.lora_A["default"].detach().double()
        assert m.relative_norm == pytest.approx(float(delta.norm() / W.norm()), rel=1e-5)
        U, _, Vh = torch.linalg.svd(delta)
        # orientation matters for the square attn.c_proj: UᵀWV uses W as (d, k), not as stored
        assert m.amplification == pytest.approx(float(delta.norm() / torch.linalg.matrix_norm(U[:, :4].T @ W @ Vh[:4].T)), rel=1e-4)


def test_base_model_without_the_adapted_weight_is_named(tmp_path):
    factors = factors_of_rank(2, 4, 8)
    (tmp_path / "base").mkdir()
    save_file({"unrelated.weight": torch.zeros(2, 2)}, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(AnalysisError, match="no weight for adapted module model.layers.0.mlp.down_proj"):
        analyze_adapter(write_adapter(tmp_path / "a", factors, r=4), base=tmp_path / "base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no \\*.safetensors"):
        analyze_adapter(tmp_path / "a", base=tmp_path / "empty")


def test_energy_must_be_a_share(tmp_path):
    with pytest.raises(AnalysisError, match=r"energy must be in \(0, 1\]"):
        suggest_ranks(write_adapter(tmp_path / "a", factors_of_rank(2, 4, 8), r=4), energy=95)


def test_cli_analyze_takes_a_train_output_directory(tmp_path, capsys):
    write_adapter(tmp_path / "run" / "adapter", factors_of_rank(3, 8, 0), r=8)
    assert main(["analyze", str(tmp_path / "run"), "--brief"]) == 0
    assert '"r": 3' in capsys.readouterr().out
