"""NF4 bases (QLoRA): bitsandbytes-exact values, the LoRA linear over them, models, checkpoints, adapters."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.ops.nf4 import (
    NF4Tensors,
    bits_per_weight,
    dequantize_nf4_reference,
    dynamic_map,
    nf4_lora_linear,
    quantize_nf4,
)
from lorakit.nf4_linear import NF4Linear
from lorakit.quant import QuantizationError, empty_weights, quantize_base, quantize_checkpoint


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::97] *= 8  # outliers, so blocks differ in scale
    return w.to(dtype)


# -- the format, against bitsandbytes --------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype", [((64, 128), torch.float32), ((256, 384), torch.bfloat16),
                                         ((300, 130), torch.float16), ((33, 70), torch.float32),
                                         ((128, 16448), torch.bfloat16)])
def test_nf4_equals_bitsandbytes(shape, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    W = _weight(shape, dtype)
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    t = quantize_nf4(W)
    assert torch.equal(t.packed, q.view(-1))  # same codes, same nibble order
    assert torch.equal(t.absmax, state.absmax) and torch.equal(t.nested_absmax, state.state2.absmax)
    assert t.offset.item() == state.offset.item()
    assert torch.equal(dequantize_nf4_reference(t, dtype), F.dequantize_4bit(q, state))
    assert torch.equal(dynamic_map(), state.state2.code) and torch.equal(lorakit.ops.nf4.nf4_map(), state.code)


def test_nested_indices_near_midpoints_follow_bitsandbytes():
    # Values within 2⁻¹⁶ of a midpoint of the dynamic map are where a nearest-code rule and bitsandbytes'
    # table disagree; the absmaxes here are built to fall there.
    F = pytest.importorskip("bitsandbytes.functional")
    code = dynamic_map()
    mids = 0.5 * (code[:-1] + code[1:])
    target = torch.cat([mids[100:140] + d for d in (-2e-5, -5e-6, 0.0, 5e-6, 2e-5)])
    absmax = torch.cat([torch.ones(1), target.abs() + 0.5])  # block maxima → nested values spread over codes
    W = (torch.rand(absmax.numel(), 64, generator=torch.Generator().manual_seed(1)) * 2 - 1) * absmax[:, None]
    W[:, 0] = absmax
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    t = quantize_nf4(W)
    assert torch.equal(t.absmax, state.absmax)
    assert torch.equal(dequantize_nf4_reference(t), F.dequantize_4bit(q, state))


def test_storage_is_under_4_2_bits_per_weight():
    t = quantize_nf4(_weight((512, 1024), torch.bfloat16))
    assert bits_per_weight(t) <= 4.2
    layer = NF4Linear.from_weight(_weight((512, 1024), torch.bfloat16), None)
    assert layer.storage_bits() <= 4.2
    assert abs(layer.storage_bits() - (4 + 8 / 64 + 32 / (64 * 256) + 32 / (512 * 1024))) < 1e-9


def test_dequantized_error_is_bounded_by_the_code_spacing():
    W = _weight((64, 256), torch.float32)
    t = quantize_nf4(W)
    Wq = dequantize_nf4_reference(t)
    m = W.view(-1, 64).abs().amax(1, keepdim=True)
    m_hat = lorakit.ops.nf4.absmax_of(t)[:, None]
    # |ŵ - w| ≤ |c·m - w| + |c|·|m̂ - m|: the largest gap between NF4 values is -0.6962 - (-1) = 0.304, so the
    # code's error is at most half of it; the rest is the absmax's own 8-bit rounding
    assert ((Wq - W).view(-1, 64).abs() <= 0.152 * m + (m_hat - m).abs() + 1e-5).all()
    assert ((m_hat - m).abs() <= 0.0071 * (m - m.mean()).abs().max()).all()  # the 8-bit map's steps near ±1: 0.0141


# -- the linear ------------------------------------------------------------------------------------------

def _nf4(d, k, seed=0, dtype=torch.float64):
    W = _weight((d, k), torch.float32, seed)
    t = quantize_nf4(W)
    return t, dequantize_nf4_reference(t, dtype)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nf4_lora_linear_matches_the_dequantized_reference(p):
    torch.manual_seed(0)
    t, Wd = _nf4(24, 64)
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    B = torch.randn(24, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    h = nf4_lora_linear(x, t, b, A, B, 0.5, p, seed=7)
    ref = lorakit.ops.lora_linear(x, Wd, b, A, B, 0.5, p, 7)  # the same dropout mask for the same seed
    assert torch.allclose(h, ref, atol=1e-12)
    g = torch.randn_like(h)
    grads = torch.autograd.grad(h, (x, A, B, b), g)
    refs = torch.autograd.grad(ref, (x, A, B, b), g)
    for a, r in zip(grads, refs):
        assert torch.allclose(a, r, atol=1e-12)


def test_nf4_lora_linear_inference_equals_the_training_route():
    torch.manual_seed(0)
    t, Wd = _nf4(24, 64)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    A, B, b = torch.randn(4, 64, dtype=torch.float64), torch.randn(24, 4, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    with torch.no_grad():
        h = nf4_lora_linear(x, t, b, A, B, 0.5)
    ref = nf4_lora_linear(x.requires_grad_(), t, b, A, B, 0.5)
    assert ref.requires_grad and not h.requires_grad
    assert torch.allclose(h, ref.detach(), atol=1e-12)
    assert torch.allclose(h, x.detach() @ Wd.T + b + 0.5 * x.detach() @ A.T @ B.T, atol=1e-10)


def test_nf4_lora_linear_gradcheck():
    torch.manual_seed(0)
    t, _ = _nf4(4, 64)
    x = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B, b: nf4_lora_linear(x, t, b, A, B, 0.7, 0.2, 3), (x, A, B, b),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, b: nf4_lora_linear(x, t, b), (x, b), fast_mode=True)


def test_backward_does_not_keep_the_dequantized_weight():
    t, _ = _nf4(256, 512)
    x = torch.randn(4, 512, requires_grad=True)
    A = torch.randn(4, 512, requires_grad=True)
    B = torch.zeros(256, 4, requires_grad=True)
    kept = []

    def pack(tensor):
        kept.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nf4_lora_linear(x, t, None, A, B, 1.0).sum().backward()
    assert (256, 512) not in kept and kept  # x, A, B, u are kept; never the (d, k) weight
    assert x.grad is not None and A.grad is not None and B.grad is not None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiled_nf4_lora_linear_keeps_no_dense_weight(p):
    """Under torch.compile the NF4 linear is whole in the graph (fullgraph: a graph break is an error), equals the
    eager op, and the forward graph saves no (d, k) tensor: the compiled backward dequantises again."""
    from saved_by_compile import recording_backend  # tests/ is on the path

    t, _ = _nf4(48, 64, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=gen, requires_grad=True)
    A = torch.randn(4, 64, generator=gen, requires_grad=True)
    B = torch.randn(48, 4, generator=gen, requires_grad=True)
    backend, saved = recording_backend()
    runs = []
    for fn in (nf4_lora_linear, torch.compile(nf4_lora_linear, backend=backend, fullgraph=True)):
        torch._dynamo.reset()
        h = fn(x, t, None, A, B, 0.5, p, 7)
        h.square().sum().backward()
        runs.append([h.detach()] + [v.grad.clone() for v in (x, A, B)])
        for v in (x, A, B):
            v.grad = None
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert saved and (48, 64) not in saved, saved


# -- models ----------------------------------------------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_quantize_base_then_inject_trains_and_saves_for_the_full_precision_base(tmp_path):
    model = _tiny_llama()
    full = _tiny_llama()
    quantize_base(model, "nf4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    lorakit.inject(model, cfg)
    assert all(layer.quantized() for _, layer in lorakit.lora_layers(model))
    ids = torch.randint(0, 64, (2, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not isinstance(p, torch.Tensor) or not p.requires_grad for n, p in model.named_buffers())
    out = lorakit.save_adapter(model, tmp_path / "a")
    meta = lorakit.read_adapter(out).metadata
    assert meta["lorakit_base_quantization"] == "nf4"
    # the adapter loads onto the full-precision base (same fingerprint: the NF4 layers remember the source)
    lorakit.load_adapter(full, out)
    # and onto a freshly quantised base, where it gives the trained model's outputs
    again = lorakit.load_adapter(quantize_base(_tiny_llama(), "nf4"), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits)


def _activation_bytes_and_grads(model, ids):
    """(bytes autograd keeps that are not the model's own parameters or buffers, loss, adapter gradients)."""
    own = {id(t) for t in [*model.parameters(), *model.buffers()]}
    kept = []

    def pack(t):
        kept.append(0 if id(t) in own else t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return sum(kept), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_shared_inputs_and_fused_mlps_on_an_nf4_base_keep_what_a_full_precision_base_keeps():
    """QLoRA with ``share_inputs`` and ``fuse_mlps``: the groups and the fused MLP compute over the 4-bit
    weights (same loss and gradients as the layers one by one), and autograd keeps exactly the activations
    it keeps over a full-precision base: one x per group, gate and up instead of the MLP's product."""
    ids = torch.randint(0, 64, (2, 24))

    def build(quantize, fuse):
        model = _tiny_llama()
        if quantize:
            quantize_base(model, "nf4")
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        for _, layer in lorakit.lora_layers(model):
            nn.init.normal_(layer.lora_B["default"], std=0.1)
        if fuse:
            assert (lorakit.share_inputs(model), lorakit.fuse_mlps(model)) == (4, 2)
        return model

    alone, loss, grads = _activation_bytes_and_grads(build(True, False), ids)
    fused, fused_loss, fused_grads = _activation_bytes_and_grads(build(True, True), ids)
    full, _, _ = _activation_bytes_and_grads(build(False, True), ids)
    torch.testing.assert_close(fused_loss, loss)
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6)
    assert fused == full < 0.75 * alone, (fused, full, alone)


def test_inject_then_quantize_base_matches_and_merge_and_unload_dequantizes():
    model = _tiny_llama().to(torch.bfloat16)
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    lorakit.inject(model, cfg)
    for _, layer in lorakit.lora_layers(model):
        nn.init.normal_(layer.lora_B["default"], std=0.1)
    quantize_base(model, "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, NF4Linear) and layer.base_layer.dtype == torch.bfloat16
    with pytest.raises(lorakit.MergeError, match="4-bit"):
        layer.merge()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
    merged = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        after = merged(ids).logits
    assert torch.allclose(before.float(), after.float(), atol=0.1)


def test_state_dict_round_trip_uses_bitsandbytes_keys():
    model = quantize_base(_tiny_llama(), "nf4")
    sd = model.state_dict()
    prefix = "model.layers.0.mlp.down_proj.weight"
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                   ".quant_state.bitsandbytes__nf4"):
        assert prefix + suffix in sd
    other = quantize_base(_tiny_llama(), "nf4", modules=[])  # same structure, untouched weights
    other = quantize_base(other, "nf4")
    other.load_state_dict(sd)
    a, b = model.model.layers[0].mlp.down_proj, other.model.layers[0].mlp.down_proj
    assert torch.equal(a.dequantize(), b.dequantize())


def test_a_full_precision_state_dict_loads_into_an_nf4_model():
    src = _tiny_llama()
    model = quantize_base(_tiny_llama().requires_grad_(False), "nf4")
    nn.init.zeros_(model.model.embed_tokens.weight)
    model.load_state_dict(src.state_dict())
    ref = quantize_base(src, "nf4")
    a, b = model.model.layers[1].self_attn.o_proj, ref.model.layers[1].self_attn.o_proj
    assert torch.equal(a.dequantize(), b.dequantize()) and a.source_checksum == b.source_checksum
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_loads_a_bitsandbytes_state_without_bitsandbytes_code(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    src = _tiny_llama()
    tensors = {}
    for name, p in src.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and isinstance(src.get_submodule(module), nn.Linear) and module != "lm_head":
            q, state = F.quantize_4bit(p, blocksize=64, quant_type="nf4", compress_statistics=True)
            tensors[name] = q
            for key, value in state.as_dict(packed=True).items():
                tensors[f"{name}.{key}"] = value
        else:
            tensors[name] = p.contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with empty_weights():
        model = type(src)(src.config)
    quantize_checkpoint(model, [tmp_path / "model.safetensors"])
    layer = model.model.layers[1].self_attn.k_proj
    W = src.model.layers[1].self_attn.k_proj.weight
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.dequantize(), F.dequantize_4bit(q, state))


def test_streaming_quantization_equals_quantize_base(tmp_path):
    from safetensors.torch import save_file

    src = _tiny_llama()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    half = len(sd) // 2
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "b.safetensors"))
    with empty_weights():
        model = type(src)(src.config)
    quantize_checkpoint(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    ref = quantize_base(src, "nf4")
    for name, m in ref.named_modules():
        if isinstance(m, NF4Linear):
            assert torch.equal(model.get_submodule(name).dequantize(), m.dequantize())
            assert model.get_submodule(name).source_checksum == m.source_checksum
    assert not any(p.is_meta for p in model.parameters())
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits)


def test_bad_inputs_raise_specific_errors(tmp_path):
    with pytest.raises(QuantizationError, match="quant_type 'int4'"):
        quantize_base(_tiny_llama(), "int4")
    with pytest.raises(QuantizationError, match="not plain nn.Linear"):
        quantize_base(_tiny_llama(), "nf4", modules=["model.nope"])
    meta = {"quant_type": "fp4", "blocksize": 64, "shape": [2, 64], "dtype": "float32"}
    packed = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(QuantizationError, match="lorakit reads nf4"):
        lorakit.quant.nf4_from_bnb({"quant_state.bitsandbytes__nf4": packed, "absmax": torch.zeros(2)},
                                   torch.zeros(64, 1, dtype=torch.uint8), "layer.x")


def test_model_to_dtype_does_not_round_the_quantisation_state():
    layer = NF4Linear.from_weight(_weight((64, 128), torch.float32), torch.zeros(64))
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_nf4tensors_is_plain_data():
    t = quantize_nf4(torch.randn(8, 64))
    assert isinstance(t, NF4Tensors) and t.shape == (8, 64) and t.packed.dtype == torch.uint8
