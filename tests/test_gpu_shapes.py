"""benchmarks/gpu_shapes.py on the CPU with a tiny model, so the GPU benchmark cannot rot between device runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_shapes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_shapes"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_in_process(bench, tmp_path):
    argv = ["--tiny", "--in-process", "--modes", "eager", "--shapes", "1x16,2x8", "--warmup", "1", "--steps", "2",
            "--new-tokens", "2", "--prompt", "4", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    res = json.loads((tmp_path / "gpu_shapes.json").read_text())
    check = res["check"]["check"]
    assert check["ok"] and check["adapters"] == 14  # 2 layers × 7 projections, lorakit vs PEFT
    assert check["adapter_effect_on_loss"] > 0
    assert set(res["contenders"]) == {"frozen", "peft", "lorakit"}
    for name, row in res["contenders"].items():
        assert not row["errors"], (name, row["errors"])
        assert set(row["train"]) == {"eager/1x16", "eager/2x8"}
        for cell in row["train"].values():
            assert cell["tokens_per_s"] > 0 and cell["GFLOP"] > 0 and cell["host_ms"] <= cell["step_ms"]
        assert row["decode"]["eager/1x4+2"]["new_tokens"] == 2
    assert res["contenders"]["frozen"]["trainable"] == 0
    # r (k + d) per LoRA linear, 7 linears per layer
    shape = bench.TINY
    assert res["contenders"]["lorakit"]["trainable"] == shape.layers * sum(16 * (k + d) for k, d in shape.linears())
    assert res["contenders"]["peft"]["trainable"] == res["contenders"]["lorakit"]["trainable"]
    text = (tmp_path / "gpu_shapes.txt").read_text()
    assert "| lorakit | eager |" in text and "decode tokens/s" in text


def test_registry_adds_a_row(bench, tmp_path):
    @bench.contender("frozen_again", default=False)
    def build(ctx):
        return bench.build_frozen(ctx)

    try:
        assert "frozen_again" not in bench.DEFAULT_CONTENDERS
        argv = ["--tiny", "--in-process", "--no-check", "--no-decode", "--contenders", "frozen_again", "--shapes", "1x8",
                "--modes", "eager", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)]
        assert bench.main(argv) == 0
        res = json.loads((tmp_path / "gpu_shapes.json").read_text())
        assert res["contenders"]["frozen_again"]["train"]["eager/1x8"]["tokens_per_s"] > 0
        with pytest.raises(ValueError, match="registered twice"):
            bench.contender("frozen_again")(build)
        with pytest.raises(SystemExit):
            bench.parse_args(["--contenders", "nope"])
    finally:
        bench.CONTENDERS.pop("frozen_again", None)


def test_issue21_rows_run_on_cpu(bench, tmp_path):
    """The fused-kernel / checkpointing contenders build and train (on the CPU the kernels are skipped with a note)."""
    names = ["frozen-liger", "peft-liger", "lorakit-liger", "lorakit-liger-ckpt", "lorakit-liger-offload",
             "qlora-liger-offload"]
    argv = ["--tiny", "--in-process", "--no-check", "--no-decode", "--contenders", ",".join(names), "--shapes", "1x8",
            "--modes", "eager", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "gpu_shapes.json").read_text())["contenders"]
    for name in names:
        assert rows[name]["train"]["eager/1x8"]["tokens_per_s"] > 0 and not rows[name]["errors"], name
        assert any("runs on cpu" in note for note in rows[name]["notes"]), name
    assert any("checkpointing offload on 2 layers" in note for note in rows["lorakit-liger-offload"]["notes"])
    assert bench.model_shape(bench.parse_args(["--model", "8b"])).params() > 8e9


def test_counts_match_the_model(bench):
    """ModelShape.params() against the transformers model it describes; FLOPs against a hand count."""
    shape = bench.TINY
    model = bench.llama(shape, torch.device("cpu"), torch.float32)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    # one token, no LoRA: forward 2 · (linear params), backward to the input the same again, attention 2·1·1·h per layer · 3
    linear = shape.layers * sum(k * d for k, d in shape.linears()) + shape.hidden * shape.vocab
    assert bench.step_flops(shape, 1, 1, 0) == 4 * linear + 3 * 2 * shape.hidden * shape.layers
    assert bench.step_flops(shape, 1, 1, 4) - bench.step_flops(shape, 1, 1, 0) == \
        3 * 2 * 4 * shape.layers * sum(k + d for k, d in shape.linears())


def test_offloaded_layers_really_compile(bench, tmp_path):
    """In compile mode an offloaded contender's layers are compiled inside their checkpoint (compiled whole,
    they would run eagerly and the row would time eager code under the compile label)."""
    from torch._dynamo.utils import counters

    counters.clear()
    argv = ["--tiny", "--in-process", "--no-check", "--no-decode", "--contenders", "lorakit-liger-offload",
            "--shapes", "1x8", "--modes", "compile", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    row = json.loads((tmp_path / "gpu_shapes.json").read_text())["contenders"]["lorakit-liger-offload"]
    assert row["train"]["compile/1x8"]["tokens_per_s"] > 0 and not row["errors"]
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["calls_captured"] > 50
