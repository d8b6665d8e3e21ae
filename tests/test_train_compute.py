"""``lorakit train``'s compute settings: the frozen base's dtype vs the adapters', and ``--compile``."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.train.causal_lm import CausalLMTask
from lorakit.train.compute import (base_dtype, cast_base, compile_model, compile_options, compile_regions,
                                   optimizer_kernel, resolve_compile, trainable_to_float32)
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer
from tiny_models import make_llama

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compute")
    make_llama(root / "llama")
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(root / "llama", dtype=torch.bfloat16).save_pretrained(root / "llama_bf16")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / "llama" / f).exists():
            shutil.copy(root / "llama" / f, root / "llama_bf16" / f)
    lm = [{"prompt": f"add {i} and {i % 3}:", "completion": f" {i + i % 3}"} for i in range(16)]
    (root / "lm.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lm))
    return {"llama": root / "llama", "llama_bf16": root / "llama_bf16", "lm": root / "lm.jsonl"}


def test_base_dtype_policy(files: dict[str, Path]) -> None:
    from transformers import LlamaForCausalLM

    bf16 = LlamaForCausalLM.from_pretrained(files["llama_bf16"], dtype="auto")
    fp32 = LlamaForCausalLM.from_pretrained(files["llama"], dtype="auto")
    assert next(bf16.parameters()).dtype == torch.bfloat16  # the checkpoint's dtype is what loads
    assert base_dtype(bf16, CUDA, bf16=False) == torch.bfloat16  # the checkpoint's dtype on a GPU
    assert base_dtype(fp32, CUDA, bf16=False) == torch.float32
    assert base_dtype(fp32, CUDA, bf16=True) == torch.bfloat16  # --bf16
    assert base_dtype(bf16, CPU, bf16=False) == torch.float32  # the CPU trains in float32
    assert resolve_compile("auto", CPU) == "off" and resolve_compile("default", CPU) == "default"


def test_frozen_base_bf16_adapters_and_optimizer_state_float32(files: dict[str, Path]) -> None:
    """What the trainer does on a GPU with a bf16 checkpoint, run on the CPU: base bf16, everything
    trained (LoRA factors and a modules_to_save copy) float32, AdamW's moments float32."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(files["llama_bf16"], dtype="auto")
    dtype = base_dtype(model, CUDA, bf16=False)
    cast_base(model, dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear", exclude_modules=["lm_head"],
                                             modules_to_save=["lm_head"]))
    trainable_to_float32(model)
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert any("lora_A" in n for n in trained) and any("lm_head" in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 60, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    states = [s for s in opt.state.values()]
    assert len(states) == len(trained)
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_trainer_on_cpu_trains_a_bf16_checkpoint_in_float32(files: dict[str, Path], tmp_path: Path) -> None:
    task = CausalLMTask(files["llama_bf16"], files["lm"], max_length=32)
    assert next(task.model.parameters()).dtype == torch.bfloat16  # loaded as stored
    trainer = Trainer(task, lorakit.LoraConfig(r=4, target_modules="all-linear"), TrainConfig(max_steps=1),
                      tmp_path, device="cpu")
    assert {p.dtype for p in trainer.base.parameters()} == {torch.float32}
    assert trainer.amp_dtype is None and trainer.compile_mode == "off" and trainer.compiled_regions == 0
    assert not trainer.optimizer.defaults["fused"]  # torch's default implementation off CUDA


def test_optimizer_kernel_is_fused_on_cuda_and_its_state_loads_from_the_default_one() -> None:
    assert optimizer_kernel(CUDA) == {"fused": True} and optimizer_kernel(CPU) == {}
    # A checkpoint written by the default (foreach / for-loop) AdamW loads into a fused one and steps the
    # same: fused AdamW runs on the CPU too, so the state conversion is checked here.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    plain = torch.optim.AdamW(params, lr=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        plain.step()
    fused_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = torch.optim.AdamW(fused_params, lr=0.1, fused=True)
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))  # (a state dict shares its tensors)
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, fused_params, grads):
        p.grad, q.grad = g, g.clone()
    plain.step()
    fused.step()
    for p, q in zip(params, fused_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_compile_regions_are_the_decoder_layers(files: dict[str, Path]) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(files["llama"])
    regions = compile_regions(model)
    assert [type(m).__name__ for m in regions] == ["LlamaDecoderLayer"] * 2
    assert compile_regions(torch.nn.Sequential(torch.nn.Linear(2, 2)))[0].__class__ is torch.nn.Sequential


def test_compiled_run_equals_eager_and_resumes(files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--compile default trains the same adapter as eager (dropout, grad accumulation, shared inputs and fused
    MLPs on), saves plain names, and a compiled --resume continues an eager checkpoint exactly as eager would."""
    common = ["train", "--task", "causal-lm", "--model", str(files["llama"]), "--data", str(files["lm"]), "-r", "4",
              "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1", "--lr", "1e-2", "--max-length", "32",
              "--save-every", "2", "--keep", "0", "--max-steps", "3"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main([*common, "--out", str(eager), "--compile", "off"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(compiled), "--compile", "default"]) == 0
    err = capsys.readouterr().err
    assert "torch.compile (mode default): 2 layer(s)" in err and "compilation included" in err
    a = load_file(eager / "adapter" / "adapter_model.safetensors")
    b = load_file(compiled / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)
    names = list(load_file(compiled / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert names == list(load_file(eager / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert not any("_orig_mod" in n for n in names)
    # resume the eager run's step-2 checkpoint compiled; it must land on the eager run's adapter
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(eager / "checkpoints" / "step-00000002", part / "checkpoints" / "step-00000002")
    assert main(["train", "--resume", "--out", str(part), "--compile", "default"]) == 0
    c = load_file(part / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("checkpointing", ["on", "offload"])
def test_compiled_checkpointed_run_compiles_and_equals_eager(files: dict[str, Path], tmp_path: Path,
                                                            checkpointing: str) -> None:
    """--checkpointing on|offload --compile default really compiles the layers, without a graph break, and trains
    the eager run's adapter (dropout on).  Both failed silently before, the layers running eagerly: "offload"
    compiled whole (Dynamo cannot trace its hooks; now compiled inside the checkpoint), "on" with transformers ≥
    5.25 (its attention forward's context-variable side effect made Dynamo give up on the checkpoint)."""
    from torch._dynamo.utils import counters

    from lorakit.layer_checkpointing import checkpointing_mode

    def run(compile_mode: str) -> Trainer:
        task = CausalLMTask(files["llama"], files["lm"], max_length=32)
        trainer = Trainer(task, lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"),
                          TrainConfig(max_steps=2, batch_size=2, lr=1e-2, checkpointing=checkpointing,
                                      compile=compile_mode), tmp_path / compile_mode, device="cpu")
        trainer.fit()
        assert checkpointing_mode(trainer.base) == checkpointing
        return trainer

    run("off")
    torch._dynamo.reset()
    counters.clear()
    compiled = run("default")
    assert counters["frames"]["ok"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    if checkpointing == "offload":
        assert counters["stats"]["calls_captured"] > 50
        assert all(region.forward.keywords["compiled"] is None for region in compile_regions(compiled.base))
    a = load_file(tmp_path / "off" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "default" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)


def test_compile_options_drop_only_module_guards() -> None:
    """The run's compile options: reduce-overhead as Inductor's CUDA-graph option, and (torch ≥ 2.8) a guard
    filter that drops the checks on module attributes; checks on inputs (shapes, grad mode) stay, so a compiled
    layer still recompiles for what changes between its calls in a run."""
    assert compile_options("reduce-overhead").get("triton.cudagraphs") is True
    assert "triton.cudagraphs" not in compile_options("default")
    if not hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):
        pytest.skip("this torch has no guard filter")
    assert compile_options("default")["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    from tests.conftest import tiny_llama

    model = lorakit.inject(tiny_llama(1), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for _, layer in lorakit.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"], std=0.1)
    torch._dynamo.reset()
    reference = copy.deepcopy(model)
    assert compile_model(model, "default") == 2
    for batch, length, grad in [(1, 5, True), (2, 7, True), (3, 4, False), (1, 9, True)]:
        ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(batch * length))
        with torch.set_grad_enabled(grad):
            got, want = model(ids).logits, reference(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert compile_model(model, "off") == 0
    assert all(region._compiled_call_impl is None for region in compile_regions(model))


def test_fit_leaves_no_compiled_layers(files: dict[str, Path], tmp_path: Path) -> None:
    """A model handed back after a compiled run runs eagerly: its layers' compiled code does not check module
    attributes, so switching adapters on it afterwards must not reach that code."""
    task = CausalLMTask(files["llama"], files["lm"], max_length=32)
    trainer = Trainer(task, lorakit.LoraConfig(r=4, target_modules="all-linear"),
                      TrainConfig(max_steps=1, batch_size=2, compile="default"), tmp_path, device="cpu")
    assert trainer.compiled_regions == 2
    trainer.fit()
    assert all(getattr(region, "_compiled_call_impl", None) is None for region in compile_regions(trainer.base))


def test_padding_for_cuda_graphs_keeps_the_loss(files: dict[str, Path]) -> None:
    from lorakit.train.compute import pad_for_graphs

    task = CausalLMTask(files["llama"], files["lm"], max_length=32)
    batch = task.collate(task.train_examples[:3])
    padded = pad_for_graphs(batch, task.tokenizer.pad_token_id, multiple=64)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert int(padded["attention_mask"].sum()) == int(batch["attention_mask"].sum())
    model = task.model.float()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).loss, model(**batch).loss, rtol=1e-6, atol=1e-6)
    assert pad_for_graphs(padded, 0, multiple=64) is padded and pad_for_graphs([1], 0) == [1]


def test_fused_adamw_steps_fsdp2_style_dtensor_parameters() -> None:
    """FSDP2 shards parameters as DTensors; the fused AdamW that CUDA runs must accept them (here on one CPU rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        full = torch.randn(6, 4)
        grad = torch.randn(6, 4)
        sharded = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        plain = torch.nn.Parameter(full.clone())
        opt_sharded = torch.optim.AdamW([sharded], lr=0.1, fused=True)
        opt_plain = torch.optim.AdamW([plain], lr=0.1)
        for _ in range(2):
            sharded.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            plain.grad = grad.clone()
            opt_sharded.step()
            opt_plain.step()
        torch.testing.assert_close(sharded.full_tensor(), plain.detach(), rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()
