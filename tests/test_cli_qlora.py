"""``lorakit train --quantize nf4`` (QLoRA) end to end on CPU: tiny models, every task, inspect, merge, PEFT.
The base is streamed from its safetensors shards (tests/test_quant_streaming.py checks how)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_bert, make_llama, with_renamed_weight

import lorakit
from lorakit.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    make_llama(root / "llama", max_shard_size="40KB")  # 3 shards
    make_bert(root / "bert")
    lm = [{"prompt": f"add {i} and 1:", "completion": f" {i + 1}"} for i in range(16)]
    (root / "lm.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lm))
    cls = [{"text": ("good " if i % 2 else "bad ") * 2 + str(i), "label": "pos" if i % 2 else "neg"} for i in range(16)]
    (root / "cls.jsonl").write_text("".join(json.dumps(x) + "\n" for x in cls))
    pairs = [{"query": f"return the {w} of a list", "positive": f"stats.{w}(values)"}
             for w in ("sum", "mean", "median", "max", "min", "length", "first item", "last item")]
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    return {"llama": root / "llama", "bert": root / "bert", "lm": root / "lm.jsonl", "cls": root / "cls.jsonl",
            "pairs": root / "pairs.jsonl"}


def test_causal_lm_qlora_learns_and_its_adapter_serves_the_full_precision_base(
        files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--task", "causal-lm", "--model", str(files["llama"]), "--data", str(files["lm"]),
               "--eval-data", str(files["lm"]), "--quantize", "nf4", "--max-steps", "12", "--batch-size", "8",
               "--dropout", "0", "-r", "8", "--lr", "2e-2", "--warmup", "0", "--schedule", "constant", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "base quantised to nf4: 14 linear layer(s)" in captured.err  # 2 layers × 7 projections; lm_head stays
    assert "streamed from 3 safetensors file(s), one tensor at a time" in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["train"]["quantize"] == "nf4"
    assert metrics["after"]["loss"] < 0.95 * metrics["before"]["loss"], (metrics["before"], metrics["after"])

    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "trained on a quantized base: yes (nf4" in report and "PEFT: yes" in report

    # The adapter applies to the full-precision base: PEFT and lorakit give the same model there.
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(files["llama"]), out / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["llama"]), out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(files["llama"]).eval()
        assert not torch.allclose(base(ids).logits, ours(ids).logits)

    merged = tmp_path / "merged"
    assert main(["merge", str(files["llama"]), str(out / "adapter"), str(merged)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits,
                                   ours(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["classification", "embedding"])
def test_other_tasks_train_on_an_nf4_base(task: str, files: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / task
    data = files["cls"] if task == "classification" else files["pairs"]
    rc = main(["train", "--task", task, "--model", str(files["bert"]), "--data", str(data), "--quantize", "nf4",
               "--max-steps", "2", "--batch-size", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "base quantised to nf4" in captured.err and "streamed from 1 safetensors file(s)" in captured.err
    adapter = lorakit.read_adapter(out / "adapter")
    assert adapter.metadata["lorakit_base_quantization"] == "nf4"
    if task == "classification":  # the trained head is saved in full precision, as a modules_to_save copy
        assert adapter.tensors["base_model.model.classifier.weight"].dtype == torch.float32


def test_a_base_that_cannot_be_streamed_is_loaded_whole_and_the_run_says_so(
        files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # transformers loads it, initialising model.norm; lorakit cannot stream a weight it finds under no name
    base = with_renamed_weight(files["llama"], tmp_path / "renamed", "model.norm.weight", "model.final_norm.weight")
    rc = main(["train", "--task", "causal-lm", "--model", str(base), "--data", str(files["lm"]), "--quantize", "nf4",
               "--max-steps", "1", "--batch-size", "4", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert ("base quantised to nf4: 14 linear layer(s), 4.13 bits a weight; loaded whole, then quantised "
            "(model.norm.weight is not in the checkpoint under that name or shape)") in captured.err


def test_quantize_option_is_checked(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--task", "causal-lm", "--model", str(files["llama"]), "--data", str(files["lm"]),
              "--quantize", "int3"])
    assert "--quantize" in capsys.readouterr().err


def test_compiled_qlora_run_equals_eager(files: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--quantize nf4 --compile default` trains the adapter an eager run trains (dropout, grad accumulation, shared
    inputs and fused MLPs on): the NF4 linears compile as custom ops, no graph break."""
    from safetensors.torch import load_file

    common = ["train", "--task", "causal-lm", "--model", str(files["llama"]), "--data", str(files["lm"]),
              "--quantize", "nf4", "-r", "4", "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1",
              "--lr", "1e-2", "--max-length", "32", "--max-steps", "3"]
    for mode in ("off", "default"):
        assert main([*common, "--out", str(tmp_path / mode), "--compile", mode]) == 0
    assert "torch.compile (mode default): 2 layer(s)" in capsys.readouterr().err
    eager = load_file(tmp_path / "off" / "adapter" / "adapter_model.safetensors")
    compiled = load_file(tmp_path / "default" / "adapter" / "adapter_model.safetensors")
    assert eager.keys() == compiled.keys() and len(eager) == 2 * 7 * 2
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-4, msg=key)
