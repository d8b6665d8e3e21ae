"""lorakit.fused_kernels.apply on tiny models: what it replaces, on this instance only (transformers is left as
it was for every other model), nothing on CPU or for an unsupported architecture, composition with
share_inputs / fuse_mlps (also on liger's own SwiGLU class), and — through Triton's interpreter on the
CPU — the same loss and adapter gradients as the unfused model for the kernels the interpreter can run
(RoPE and the fused linear cross-entropy; liger's RMSNorm and SwiGLU kernels use scalar ``.to`` calls
the interpreter rejects, so their numerics are checked on the GPU: benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.conftest, in the subprocess too

import lorakit  # noqa: E402
from lorakit import fused_kernels  # noqa: E402
from lorakit.fused_mlp import is_fused  # noqa: E402
from tests.conftest import tiny_gpt2, tiny_llama  # noqa: E402
from tests.triton_interpret import interpreted, report  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, targets=TARGETS, seed: int = 1):
    torch.manual_seed(seed)  # A's init
    model = lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets))
    torch.manual_seed(seed)
    for _, layer in lorakit.lora_layers(model):
        for B in layer.lora_B.values():
            torch.nn.init.normal_(B, std=0.1)  # B ≠ 0: every adapter reaches the loss
    return model


def _globals():
    from transformers.models.llama import modeling_llama as ml

    return (ml.apply_rotary_pos_emb, ml.LlamaRMSNorm, ml.LlamaMLP, ml.LlamaForCausalLM.__dict__["forward"],
            torch.nn.functional.cross_entropy)


def _instance_forwards(model) -> dict[str, object]:
    return {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}


def test_cpu_changes_nothing_and_says_why() -> None:
    model = tiny_llama()
    rep = fused_kernels.apply(model)
    assert not rep.applied and "runs on cpu" in str(rep) and "CUDA" in str(rep)
    assert _instance_forwards(model) == {} and fused_kernels.applied(model) is None


def test_unsupported_architecture_changes_nothing() -> None:
    model = tiny_gpt2()
    rep = fused_kernels.apply(model, device="cuda")
    assert not rep.applied and "no kernels for model type 'gpt2'" in str(rep)
    assert _instance_forwards(model) == {}


def test_replaces_on_this_instance_only() -> None:
    before = _globals()
    model = _lora(tiny_llama())
    rep = fused_kernels.apply(model, device="cuda")  # applied, not run: the kernels need a GPU
    assert rep.applied and rep.model_type == "llama"
    assert rep.replaced == {"LigerRMSNorm": 5, "LigerSwiGLUMLP": 2, "fused linear cross-entropy": 1, "RoPE": 2}
    assert _globals() == before  # transformers (and torch's cross_entropy) as they were
    assert _instance_forwards(tiny_llama()) == {}  # a model built afterwards is untouched
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    attn = model.model.layers[0].self_attn
    assert inspect.unwrap(attn.forward.__func__).__globals__["apply_rotary_pos_emb"] is liger_rotary_pos_emb
    assert fused_kernels.apply(model, device="cuda") is rep  # idempotent
    assert fused_kernels.applied(model) is rep


def test_an_architecture_without_the_fused_loss_keeps_the_other_kernels(monkeypatch) -> None:
    """liger raises NotImplementedError for the fused loss on some architectures (e.g. granite): apply undoes
    that attempt, applies the rest and says so in the report."""
    import functools

    from liger_kernel.transformers import monkey_patch

    real = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN["llama"]

    @functools.wraps(real)  # the same signature: apply reads its parameters
    def no_fused_loss(*args, **kwargs):
        if kwargs.get("fused_linear_cross_entropy"):
            raise NotImplementedError("no fused linear cross-entropy for this model")
        return real(*args, **kwargs)

    monkeypatch.setitem(monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN, "llama", no_fused_loss)
    before = _globals()
    model = _lora(tiny_llama())
    rep = fused_kernels.apply(model, device="cuda")
    assert rep.applied and rep.replaced == {"LigerRMSNorm": 5, "LigerSwiGLUMLP": 2, "RoPE": 2}
    assert "fused linear cross-entropy not available for llama" in str(rep)
    assert "forward" not in model.__dict__  # the causal LM keeps its own forward (and loss)
    assert _globals() == before


def test_loss_only_for_causal_lms() -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=2, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg)
    rep = fused_kernels.apply(model, device="cuda")
    assert rep.applied and "fused linear cross-entropy" not in rep.replaced
    assert "not a causal language model" in str(rep) and "forward" not in model.__dict__


def test_fuse_mlps_composes_with_liger_in_either_order() -> None:
    model = _lora(tiny_llama())
    fused_kernels.apply(model, device="cuda")
    assert lorakit.share_inputs(model) == 4 and lorakit.fuse_mlps(model) == 2  # replaces liger's SwiGLU forward
    mlp = model.model.layers[0].mlp
    assert lorakit.unfuse_mlps(model) == 2 and mlp.forward.__func__.__qualname__ == "LigerSwiGLUMLP.forward"

    model = _lora(tiny_llama())
    assert lorakit.fuse_mlps(model) == 2
    rep = fused_kernels.apply(model, device="cuda")
    assert rep.replaced["lorakit fused MLP kept"] == 2 and "LigerSwiGLUMLP" not in rep.replaced
    assert all(is_fused(layer.mlp) for layer in model.model.layers)


def test_fuse_mlps_on_liger_swiglu_class_same_loss_and_gradients() -> None:
    """A model built with liger's SwiGLU class (no act_fn; e.g. after liger patched transformers globally):
    fuse_mlps fuses it, and the fused forward (which runs no liger kernel) gives the HF model's results."""
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    results = []
    for liger in (False, True):
        base = tiny_llama()
        if liger:
            for layer in base.model.layers:
                mlp = LigerSwiGLUMLP(base.config)
                mlp.load_state_dict(layer.mlp.state_dict())
                layer.mlp = mlp
        model = _lora(base)
        assert lorakit.fuse_mlps(model) == 2
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_interpreted_rope_and_fused_loss_equal_unfused() -> None:
    out = interpreted(__file__)
    assert out == {"train": "", "eval": "", "lora_head_falls_back": ""}, out


def _check(name: str) -> str:
    """Run in a subprocess with TRITON_INTERPRET=1 (see tests/triton_interpret.py)."""
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    targets = TARGETS + (["lm_head"] if name == "lora_head_falls_back" else [])

    def run(kernels: bool):
        model = _lora(tiny_llama(), targets)
        if kernels:  # RMSNorm and SwiGLU kernels do not run under the interpreter (see the module docstring)
            rep = fused_kernels.apply(model, device="cuda", norms=False, mlp=False)
            assert rep.replaced.get("RoPE") == 2, rep
        lorakit.share_inputs(model)
        lorakit.fuse_mlps(model)
        model.train(name != "eval")
        with torch.set_grad_enabled(name != "eval"):
            out = model(input_ids=ids, labels=ids)
        if name != "eval":
            out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        return out, grads

    ref, g_ref = run(False)
    got, g = run(True)
    if name == "lora_head_falls_back":
        if got.logits is None:
            return "the fused loss ran with a LoRA lm_head"
    elif got.logits is not None:
        return "logits were built"
    if not torch.allclose(got.loss, ref.loss, rtol=1e-5, atol=1e-6):
        return f"loss {got.loss.item()} vs {ref.loss.item()}"
    if len(g) != len(g_ref) or (name != "eval" and not g):
        return f"{len(g)} gradients vs {len(g_ref)}"
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(g, g_ref)) if g else 0.0
    return "" if worst < 1e-4 else f"adapter gradients differ by {worst:.2e} (relative)"


def test_rope_that_cannot_be_put_on_is_reported(monkeypatch) -> None:
    """A RoPE global the rebinding does not recognise (as transformers 5.25 + kernels once made it) is never skipped
    silently: the other kernels go on and the report names RoPE."""
    monkeypatch.setattr(fused_kernels, "_plain_callable", lambda value: False)
    model = _lora(tiny_llama())
    before = _globals()
    rep = fused_kernels.apply(model, device="cuda")
    assert rep.applied and "RoPE" not in rep.replaced and rep.replaced["LigerRMSNorm"] == 5
    assert "RoPE: no rotary-embedding kernel could be put on" in str(rep)
    assert _globals() == before


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is already in the environment
    report(["train", "eval", "lora_head_falls_back"], _check)

