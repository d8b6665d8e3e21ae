"""lorakit.checkpointing on a tiny Llama with LoRA (dropout on; also on an NF4 base), shared inputs and fused
MLPs: "on" and "offload" give exactly the loss and adapter gradients of "off" (the layers really are recomputed, the
offload hooks really hold the layer inputs), and through ``lorakit train`` with grad accumulation and
--resume the adapters agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.layer_checkpointing import checkpointing_mode, compile_inside, decoder_layers, offload_stats
from tests.conftest import tiny_llama
from tiny_models import make_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(mode: str, dropout: float = 0.1, nf4: bool = False):
    model = lorakit.inject(tiny_llama(0), lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS))
    if nf4:  # QLoRA: the frozen linears in 4 bits
        lorakit.quantize_base(model, "nf4")
    torch.manual_seed(1)
    for _, layer in lorakit.lora_layers(model):
        for B in layer.lora_B.values():
            torch.nn.init.normal_(B, std=0.1)  # B ≠ 0: every branch reaches the loss
    assert lorakit.share_inputs(model) == 4 and lorakit.fuse_mlps(model) == 2
    assert lorakit.checkpointing(model, mode, min_offload_bytes=0) == (0 if mode == "off" else 2)
    return model.train()


def _step(model, steps: int = 1):
    """Loss and adapter gradients of ``steps`` micro-batches accumulated (dropout seeds from seed 5)."""
    torch.manual_seed(5)
    losses = []
    for k in range(steps):
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3 + k))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _count_mlp_calls(model) -> list[int]:
    """A counter of the MLPs' forward calls (a recomputed layer calls its MLP again)."""
    count = [0]
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("mode, nf4", [("on", False), ("offload", False), ("offload", True)])
def test_same_loss_and_adapter_gradients_as_off(mode: str, nf4: bool) -> None:
    model = _model("off", nf4=nf4)
    calls = _count_mlp_calls(model)
    loss0, grads0 = _step(model, steps=2)
    assert calls[0] == 4  # 2 micro-batches × 2 fused MLPs
    model = _model(mode, nf4=nf4)
    calls = _count_mlp_calls(model)
    loss, grads = _step(model, steps=2)
    assert calls[0] == 8  # each layer ran again in backward
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    for g, g0 in zip(grads, grads0, strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-6, atol=1e-7)
    assert checkpointing_mode(model) == mode
    if mode == "offload":  # each layer's input went through the hooks (2 layers × 2 micro-batches)
        assert offload_stats(model) == {"tensors": 4, "bytes": 4 * 2 * 10 * 32 * 4}


def test_not_in_eval_or_without_grad_and_off_restores() -> None:
    model = _model("on")
    calls = _count_mlp_calls(model)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids).logits.sum().backward()
    assert calls[0] == 4  # 2 forwards × 2 MLPs, no recomputation: nothing was checkpointed
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert lorakit.checkpointing(model, "off") == 0
    assert all("forward" not in m.__dict__ for m in layers) and checkpointing_mode(model) == "off"
    assert lorakit.checkpointing(model, "offload") == 2 and lorakit.checkpointing(model, "on") == 2  # switching
    assert checkpointing_mode(model) == "on" and offload_stats(model) is None


def test_bad_mode_and_no_layers_are_config_errors() -> None:
    from lorakit.train.config import TrainConfig

    with pytest.raises(lorakit.ConfigError, match="offload does not combine with --compile reduce-overhead"):
        TrainConfig(checkpointing="offload", compile="reduce-overhead")
    with pytest.raises(lorakit.ConfigError, match="one of"):
        lorakit.checkpointing(tiny_llama(), "sometimes")
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(lorakit.ConfigError, match="pass layers="):
        lorakit.checkpointing(seq, "on")
    assert lorakit.checkpointing(seq, "on", layers=list(seq)) == 2
    x = torch.randn(3, 4, requires_grad=True)
    seq.train()(x).sum().backward()  # runs checkpointed
    assert x.grad is not None


@pytest.mark.parametrize("mode, nf4", [("on", False), ("offload", False), ("offload", True)])
def test_torch_compile_with_checkpointing(mode: str, nf4: bool) -> None:
    """Compiled layers give the eager loss and gradients, and really are compiled: "on" by compiling the
    layer (checkpoint included), "offload" inside its checkpoint (compile_inside)."""
    from torch._dynamo.utils import counters

    loss0, grads0 = _step(_model("off", dropout=0.0, nf4=nf4))
    model = _model(mode, dropout=0.0, nf4=nf4)
    torch._dynamo.reset()
    counters.clear()
    for layer in decoder_layers(model):
        if not compile_inside(layer, lambda forward: torch.compile(forward, backend="aot_eager", dynamic=True)):
            assert mode == "on"
            layer.compile(backend="aot_eager", dynamic=True)
    loss, grads = _step(model)
    assert counters["frames"]["ok"] >= 1 and not counters["graph_break"]  # (an offloaded layer compiled whole: 0)
    if mode == "offload":  # the hooks ran around the compiled layers' saved inputs
        assert offload_stats(model)["tensors"] >= 2
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(grads, grads0, strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


def test_compile_inside_only_takes_offloaded_layers_and_undoes() -> None:
    """compile_inside refuses (False) a layer checkpointed with "on" or not at all; with None it puts the
    layer's own forward back, and switching checkpointing off afterwards leaves the plain layer."""
    model = _model("on", dropout=0.0)
    assert not any(compile_inside(layer, torch.compile) for layer in decoder_layers(model))
    model = _model("offload", dropout=0.0)
    loss0, _ = _step(model)
    seen = []
    for layer in decoder_layers(model):
        assert compile_inside(layer, lambda forward: seen.append(forward) or forward)
    assert len(seen) == 2 and checkpointing_mode(model) == "offload"
    torch.testing.assert_close(_step(model)[0], loss0)
    for layer in decoder_layers(model):
        assert compile_inside(layer, None)
    torch.testing.assert_close(_step(model)[0], loss0)
    lorakit.checkpointing(model, "off")
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


def test_lorakit_train_checkpointing_modes_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """off, on and offload (the last resumed from off's checkpoint) train the same adapter; on CPU the
    fused kernels are skipped with a note and the MLPs are fused."""
    model = make_llama(tmp_path / "llama")
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} and 1:", "completion": f" {i + 1}"}) + "\n" for i in range(16)))
    common = ["train", "--task", "causal-lm", "--model", str(model), "--data", str(data), "-r", "4", "--batch-size", "2",
              "--grad-accum", "2", "--dropout", "0.1", "--lr", "1e-2", "--max-steps", "4", "--save-every", "2", "--keep", "0"]
    assert main([*common, "--out", str(tmp_path / "off")]) == 0
    err = capsys.readouterr().err
    assert "fused kernels: none applied (the model runs on cpu" in err and "fused SwiGLU MLPs: 2" in err
    assert main([*common, "--out", str(tmp_path / "on"), "--checkpointing", "on"]) == 0
    assert "activation checkpointing (on): 2 layer(s)" in capsys.readouterr().err
    part = tmp_path / "offload"
    shutil.copytree(tmp_path / "off" / "checkpoints" / "step-00000002", part / "checkpoints" / "step-00000002")
    assert main(["train", "--resume", "--out", str(part), "--checkpointing", "offload"]) == 0
    assert "activation checkpointing (offload): 2 layer(s)" in capsys.readouterr().err
    assert json.loads((part / "metrics.json").read_text())["config"]["train"]["checkpointing"] == "offload"
    off = load_file(tmp_path / "off" / "adapter" / "adapter_model.safetensors")
    for run in ("on", "offload"):
        other = load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")
        assert other.keys() == off.keys()
        for key in off:
            torch.testing.assert_close(other[key], off[key], rtol=1e-5, atol=1e-7, msg=f"{run} {key}")
