"""lorakit sweep: the run grid, the train command lines, collecting metrics.json, the knee, the plot."""

from __future__ import annotations

import json
import sys

import pytest

from lorakit.analysis import AnalysisError, collect_runs, run_sweep, sweep_grid
from lorakit.analysis.plots import plot_sweep
from lorakit.analysis.sweep import lower_is_better, train_command
from lorakit.cli import main

# eval_loss per rank: the knee is r=8 (within 1 % of r=32's 1.000 with 4× fewer parameters)
LOSS = {2: 1.30, 4: 1.10, 8: 1.008, 16: 1.002, 32: 1.000}


def fake_run(out, r, alpha, d_plus_k=100):
    """What `lorakit train --out out` leaves behind (metrics.json only; see Trainer.write_outputs)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"task": "toy", "trainable_parameters": r * d_plus_k, "before": {"eval_loss": 2.0},
               "after": {"eval_loss": LOSS[r], "accuracy": 1 - LOSS[r] / 4}, "config": {"lora": {"r": r, "lora_alpha": alpha}}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_grid():
    assert sweep_grid([2, 4]) == [(2, None), (4, None)]
    assert sweep_grid([2, 4], alphas=[8, 16]) == [(2, 8), (2, 16), (4, 8), (4, 16)]
    assert sweep_grid([2, 4], alpha_ratio=2) == [(2, 4), (4, 8)]
    with pytest.raises(AnalysisError, match="≥ 1"):
        sweep_grid([0, 4])


def test_train_command_passes_shared_args_then_rank_alpha_out(tmp_path):
    cmd = train_command(["--task", "toy", "--max-steps", "5"], 8, 16.0, tmp_path / "r8")
    assert cmd[:4] == [sys.executable, "-m", "lorakit", "train"]
    assert cmd[4:] == ["--task", "toy", "--max-steps", "5", "-r", "8", "--alpha", "16", "--out", str(tmp_path / "r8")]
    assert "--alpha" not in train_command([], 8, None, tmp_path)


def test_collect_and_knee(tmp_path):
    dirs = [fake_run(tmp_path / f"r{r}", r, 2.0 * r) for r in LOSS]
    result = collect_runs(dirs, metric="eval_loss")
    assert result.lower_is_better and result.best().r == 32
    knee = result.knee()
    assert (knee.r, knee.alpha, knee.trainable_parameters) == (8, 16.0, 800)
    assert "r=8, α=16 reaches eval_loss 1.008" in result.conclusion() and "4.0× fewer" in result.conclusion()
    higher = collect_runs(dirs, metric="accuracy")
    assert not higher.lower_is_better and higher.best().r == 32 and higher.knee().r == 8
    assert lower_is_better("val_perplexity") and not lower_is_better("f1")
    png = plot_sweep(result, tmp_path / "plots" / "sweep.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_missing_metric_lists_what_is_there(tmp_path):
    run = fake_run(tmp_path / "r2", 2, 4.0)
    with pytest.raises(AnalysisError, match="available: .*accuracy.*eval_loss"):
        collect_runs([run], metric="bleu")
    with pytest.raises(AnalysisError, match="no metrics.json"):
        collect_runs([tmp_path], metric="eval_loss")


def test_run_sweep_trains_missing_runs_and_reuses_finished_ones(tmp_path):
    calls = []

    def runner(cmd, log_path):
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        r, alpha = int(cmd[cmd.index("-r") + 1]), float(cmd[cmd.index("--alpha") + 1])
        fake_run(tmp_path / "sweep" / out.rsplit("/", 1)[1], r, alpha)
        log_path.write_text("ok\n")
        return 0

    fake_run(tmp_path / "sweep" / "r2-a4", 2, 4.0)  # finished earlier
    result = run_sweep(["--task", "toy"], sweep_grid([2, 4, 8], alpha_ratio=2), tmp_path / "sweep", metric="eval_loss",
                       runner=runner, log=lambda line: None)
    assert [c[c.index("-r") + 1] for c in calls] == ["4", "8"]
    assert sorted(run.r for run in result.runs) == [2, 4, 8]
    assert (tmp_path / "sweep" / "r4-a8" / "train.log").read_text() == "ok\n"


def test_failed_run_names_its_log(tmp_path):
    with pytest.raises(AnalysisError, match=r"r=4 .*failed \(exit 3\); see .*r4/train.log"):
        run_sweep(["--task", "toy"], [(4, None)], tmp_path, metric="eval_loss", runner=lambda cmd, log: 3,
                  log=lambda line: None)


def test_cli_sweep_collect(tmp_path, capsys):
    dirs = [str(fake_run(tmp_path / f"r{r}", r, 16.0)) for r in (2, 8, 32)]
    code = main(["sweep", "--collect", *dirs, "--metric", "eval_loss", "--plots", str(tmp_path / "p"),
                 "--json", str(tmp_path / "s.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "r=8, α=16 reaches eval_loss" in out
    assert (tmp_path / "p" / "sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "s.json").read_text())["knee"] == {"r": 8, "alpha": 16.0}


def test_cli_sweep_needs_ranks_and_train_args(tmp_path, capsys):
    assert main(["sweep", "--metric", "eval_loss", "--out", str(tmp_path)]) == 2
    assert "needs --ranks and --out" in capsys.readouterr().err
    assert main(["sweep", "--ranks", "2", "--metric", "eval_loss", "--out", str(tmp_path)]) == 2
    assert "after --" in capsys.readouterr().err


def test_no_knee_when_the_largest_run_is_clearly_best(tmp_path):
    dirs = [fake_run(tmp_path / f"r{r}", r, 2.0 * r) for r in (2, 4)]
    result = collect_runs(dirs, metric="eval_loss")
    assert result.knee().r == 4 and result.conclusion().startswith("no knee within the sweep")
