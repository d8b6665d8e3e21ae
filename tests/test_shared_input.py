"""share_inputs: q/k/v and gate/up of a tiny Llama computed as groups, with unchanged results.

The reference is the same model without groups (and, for the values themselves, the ordinary
per-layer path, which test_layers / test_peft_compat check against float64 math and PEFT).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.ops import lora_group
from lorakit.shared_input import InputGroup

transformers = pytest.importorskip("transformers")


def tiny_llama(dropout: float = 0.0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():  # B ≠ 0, so every adapter changes the output
        for _, layer in lorakit.lora_layers(model):
            for B in layer.lora_B.values():
                B.normal_(0, 0.2)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.fixture
def count_group_calls(monkeypatch):
    calls = []
    real = lora_group.lora_linear_group

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr("lorakit.shared_input.lora_linear_group", counting)
    return calls


def test_groups_found_in_llama():
    model = tiny_llama()
    assert lorakit.share_inputs(model) == 4  # (q, k, v) and (gate, up) in each of 2 layers
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.input_group is attn.k_proj.input_group is attn.v_proj.input_group
    assert attn.o_proj.input_group is None
    assert lorakit.unshare_inputs(model) == 10
    assert attn.q_proj.input_group is None


def test_same_loss_and_gradients_as_separate_layers(count_group_calls):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    plain = tiny_llama()
    shared = copy.deepcopy(plain)
    lorakit.share_inputs(shared)
    ref_loss, ref_grads = loss_and_grads(plain, ids)
    for _ in range(2):
        loss, grads = loss_and_grads(shared, ids)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(count_group_calls) == [2, 2, 2, 2, 3, 3, 3, 3]  # 2 forwards × (q,k,v + gate,up) × 2 layers


def test_generate_is_unchanged():
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    lorakit.share_inputs(model)
    for _ in range(2):
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("state", ["dropout_training", "merged", "disabled", "two_active", "mixed_batch"])
def test_members_not_in_the_plain_state_compute_alone(state, count_group_calls):
    model = tiny_llama(dropout=0.1 if state == "dropout_training" else 0.0)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    if state == "two_active":
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules="all-linear"), adapter_name="b")
        lorakit.set_adapter(model, ["default", "b"])
    if state == "merged":
        lorakit.merge(model)
    model.train(state == "dropout_training")
    reference = copy.deepcopy(model)
    lorakit.share_inputs(model)

    def run(m):
        if state == "dropout_training":
            torch.manual_seed(7)  # dropout seeds come from the global generator
        if state == "disabled":
            with lorakit.disable_adapters(m):
                return m(input_ids=ids).logits
        if state == "mixed_batch":
            with lorakit.batch_adapters(m, ["default", None]):
                return m(input_ids=ids).logits
        return m(input_ids=ids).logits

    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(run(model), run(reference), rtol=1e-6, atol=1e-6)
    assert count_group_calls == []


def test_outputs_are_only_handed_out_for_the_tensor_they_came_from(count_group_calls):
    model = tiny_llama().eval()
    attn = model.model.layers[0].self_attn
    unshared = copy.deepcopy(attn)
    group = InputGroup([attn.q_proj, attn.k_proj])
    attn.q_proj.input_group = attn.k_proj.input_group = group
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn.q_proj(x), unshared.q_proj(x))  # grouped: k's output for x is pending
        y = x.clone()
        torch.testing.assert_close(attn.k_proj(y), unshared.k_proj(y))  # another tensor: computed for y
        attn.q_proj(x)  # (q's output for x is pending again after k's call for y ... now k's for x)
        x.add_(1.0)  # same object, new version: nothing computed for the old values may be used
        torch.testing.assert_close(attn.k_proj(x), unshared.k_proj(x))
    assert count_group_calls == [2, 2, 2, 2]


def test_inference_mode_tensors_are_computed_alone(count_group_calls):
    model = tiny_llama().eval()
    reference = copy.deepcopy(model)
    lorakit.share_inputs(model)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert count_group_calls == []


def test_a_shared_model_pickles_and_copies_after_a_forward():
    import io
    import pickle

    model = tiny_llama().eval()
    lorakit.share_inputs(model)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.model.layers[0].self_attn.q_proj(torch.randn(3, 32))  # leaves k's and v's outputs pending
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            group = clone.model.layers[0].self_attn.q_proj.input_group
            assert group is clone.model.layers[0].self_attn.k_proj.input_group and not group._pending
            torch.testing.assert_close(clone(input_ids=ids).logits, expected)
        buffer = io.BytesIO()
        torch.save(model, buffer)  # whole-module save, as some users do
        assert buffer.tell() > 0


def test_cross_attention_is_not_grouped():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8) for n in ("q_proj", "k_proj", "v_proj")})
            self.encoder_attn = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8) for n in ("q_proj", "k_proj", "v_proj")})

    model = lorakit.inject(Block(), lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert lorakit.share_inputs(model) == 1
    assert model.encoder_attn["q_proj"].input_group is None


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    plain = tiny_llama()
    shared = copy.deepcopy(plain)
    lorakit.share_inputs(shared)
    shared.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shared.config.use_cache = False
    ref_loss, ref_grads = loss_and_grads(plain, ids)
    for _ in range(3):
        loss, grads = loss_and_grads(shared, ids)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
