"""benchmarks/gpu_trainer.py --tiny: the Trainer benchmark runs end to end on the CPU and writes its JSON and table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_trainer.py"


def test_tiny_run_writes_json_and_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_trainer", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--tiny", "--batches", "2", "--contenders", "peft", "lorakit"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "gpu_trainer.json").read_text())
    rows = {row["contender"]: row for row in result["rows"]}
    assert set(rows) == {"peft", "lorakit"} and not result["skipped"] and not result["failed"]
    for row in rows.values():
        assert row["batch"] == 2 and row["seq"] == 32 and row["tokens_per_s"] > 0 and row["trainable"] > 0
    # same base, same LoRA targets and rank: both train the same number of parameters
    assert rows["peft"]["trainable"] == rows["lorakit"]["trainable"]
    table = (tmp_path / "gpu_trainer.txt").read_text()
    assert "| 2×32 | lorakit |" in table and "× PEFT" in table
