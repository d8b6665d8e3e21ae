"""train/outputs.py: the end-of-run summary (hand-written expected lines) and the crash-temporaries cleanup."""

from __future__ import annotations

from pathlib import Path

from lorakit.train.outputs import TrainResult, clean_stale_outputs, summary_lines


def result(**kw) -> TrainResult:
    fields = {"steps": 12, "skipped": 0, "before": {"step": 0, "mse": 1.5}, "after": {"step": 12, "mse": 0.25},
              "history": {"train": [], "eval": []}, "trainable": 1234, "total": 100_000, "seconds": 75.0,
              "examples_per_s": 6.4, "tokens_per_s": 1234.5}
    return TrainResult(**{**fields, **kw})


def test_summary_lines_hand_written() -> None:
    assert summary_lines(result()) == [
        "trained 12 steps in 1:15 (6.4 examples/s)",
        "  trainable parameters: 1,234 of 100,000 (1.234%)",
        "  held-out metrics, before → after:",
        "    mse: 1.5000 → 0.2500 (-1.2500)",
    ]
    lines = summary_lines(result(skipped=2, before={"step": 0}, after={"step": 12}), peak_gib=1.5)
    assert lines[0].endswith("; 2 skipped (non-finite)")
    assert lines[2:] == ["  (no held-out examples to evaluate)", "  1,234 tokens/s, peak GPU memory 1.50 GiB"]


def test_clean_stale_outputs_removes_only_temporaries(tmp_path: Path) -> None:
    (tmp_path / ".adapter.tmp-123").mkdir()
    (tmp_path / ".adapter.tmp-123" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / ".metrics.json.tmp-9").write_text("{")
    (tmp_path / ".training.tmp.png").write_bytes(b"p")
    kept = [tmp_path / "adapter", tmp_path / "metrics.json", tmp_path / "training.png"]
    kept[0].mkdir()
    kept[1].write_text("{}")
    kept[2].write_bytes(b"png")
    removed = clean_stale_outputs(tmp_path)
    assert sorted(p.name for p in removed) == [".adapter.tmp-123", ".metrics.json.tmp-9", ".training.tmp.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "metrics.json", "training.png"]
