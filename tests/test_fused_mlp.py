"""fuse_mlps on a tiny Llama: the same loss and gradients as the unfused model (dropout too), the original
expression whenever down_proj is not one plain LoRA linear, clean unfusing, torch.compile without graph
breaks, and — the point of it — fewer bytes kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit import fused_mlp as fuse
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(dropout: float = 0.0, targets=TARGETS, seed: int = 0):
    model = lorakit.inject(tiny_llama(seed), lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets))
    torch.manual_seed(seed + 1)
    for _, layer in lorakit.lora_layers(model):
        for B in layer.lora_B.values():
            torch.nn.init.normal_(B, std=0.1)  # B ≠ 0, so every branch changes the output
    return model


def _ids(batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(123))


@pytest.fixture
def calls(monkeypatch):
    """How many times the fused function ran (a fused MLP that fell back does not count)."""
    count = [0]
    original = fuse.swiglu_lora_down

    def counting(*args):
        count[0] += 1
        return original(*args)

    monkeypatch.setattr(fuse, "swiglu_lora_down", counting)
    return count


def _loss_and_grads(model, ids, seed: int = 5):
    torch.manual_seed(seed)  # the layers draw their dropout seeds from the CPU generator
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_fuses_every_llama_mlp_and_unfuses() -> None:
    model = _llama()
    assert lorakit.fuse_mlps(model) == 2
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(fuse.is_fused(m) for m in mlps)
    assert lorakit.fuse_mlps(model) == 2  # idempotent
    assert not fuse.is_fused(model.model.layers[0].self_attn)
    assert lorakit.unfuse_mlps(model) == 2
    assert not any(fuse.is_fused(m) or "forward" in m.__dict__ for m in mlps)
    assert lorakit.unfuse_mlps(model) == 0


def test_needs_a_lora_down_proj_and_silu() -> None:
    assert lorakit.fuse_mlps(_llama(targets=["q_proj", "gate_proj"])) == 0  # down_proj is plain
    gelu = _llama()
    for layer in gelu.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
        layer.mlp.config = None
    assert lorakit.fuse_mlps(gelu) == 0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_loss_and_gradients_as_unfused(dropout: float, calls) -> None:
    model = _llama(dropout)
    model.train()
    ids = _ids()
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert lorakit.fuse_mlps(model) == 2
    loss, grads = _loss_and_grads(model, ids)
    assert calls[0] == 2
    assert len(grads) == 2 * 7 * 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    if dropout:  # the masks matter: another seed changes the gradients (so the test can fail)
        _, other = _loss_and_grads(model, ids, seed=6)
        assert not torch.allclose(other[-1], grads[-1])


def test_fused_with_shared_inputs_same_loss_and_gradients(calls) -> None:
    """share_inputs groups gate_proj/up_proj; the fused forward calls them with one x, as the original does."""
    model = _llama()
    model.train()
    ids = _ids()
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert lorakit.share_inputs(model) == 4 and lorakit.fuse_mlps(model) == 2
    loss, grads = _loss_and_grads(model, ids)
    assert calls[0] == 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _two_active(model):
    model2 = lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=TARGETS), adapter_name="other")
    for _, layer in lorakit.lora_layers(model2):
        torch.nn.init.normal_(layer.lora_B["other"], std=0.1)
    lorakit.set_adapter(model2, ["default", "other"])
    return model2


@pytest.mark.parametrize("state,fused_calls", [
    ("two_active", 0), ("disabled", 0), ("merged", 0), ("batch_adapters", 0), ("one_of_two_merged", 2),
])
def test_other_states_compute_the_unfused_model(state: str, fused_calls: int, calls) -> None:
    model = _llama()
    ids = _ids(batch=3)
    if state in ("two_active", "one_of_two_merged", "batch_adapters"):
        model = _two_active(model)
    if state == "merged":
        lorakit.merge(model)
    if state == "one_of_two_merged":
        lorakit.merge(model, ["other"])  # default stays the one unmerged adapter: the fused route applies

    def run():
        if state == "disabled":
            with lorakit.disable_adapters(model):
                return _outputs(model, ids)
        if state == "batch_adapters":
            with lorakit.batch_adapters(model, ["default", None, "other"]):
                return _outputs(model, ids)
        return _outputs(model, ids)

    expected = run()
    assert lorakit.fuse_mlps(model) == 2
    got = run()
    assert calls[0] == fused_calls
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if state != "disabled":  # and the state did matter: not the base model's output
        with lorakit.disable_adapters(model):
            assert not torch.allclose(_outputs(model, ids), got, atol=1e-4)


def test_merge_and_unload_gives_the_same_model() -> None:
    model = _llama()
    ids = _ids()
    expected = _outputs(model, ids)
    assert lorakit.fuse_mlps(model) == 2
    plain = lorakit.merge_and_unload(model)
    assert not list(lorakit.lora_layers(plain))
    assert isinstance(plain.model.layers[0].mlp.down_proj, torch.nn.Linear)
    torch.testing.assert_close(_outputs(plain, ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_leaves_no_fused_forward() -> None:
    model = _llama()
    lorakit.fuse_mlps(model)
    plain = lorakit.merge_and_unload(model)
    assert not any(fuse.is_fused(m) for m in plain.modules())


def test_compiled_fused_mlp_has_no_graph_break() -> None:
    torch._dynamo.reset()
    model = _llama()
    model.train()
    lorakit.fuse_mlps(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, requires_grad=True)
    ref = mlp(x)
    ref.square().sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    compiled = torch.compile(mlp, fullgraph=True)  # fullgraph: a graph break is an error
    got = compiled(x)
    got.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_llama_traces_as_one_graph(dropout: float) -> None:
    torch._dynamo.reset()
    model = _llama(dropout)  # with dropout the layers' seeds are drawn as tensors: still no break
    model.train()
    lorakit.fuse_mlps(model)
    ids = _ids()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    code = explained.graphs[0].code
    # both MLPs fused: h = silu(gate)·up in a region the partitioner must recompute, then the LoRA op on it
    assert code.count("torch.ops.higher_order.tag_activation_checkpoint(") == 2, code


def _saved_bytes(module, x) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct non-parameter storages autograd keeps for one forward, and the tensors."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in storages.items() if ptr not in params), saved


def test_fused_mlp_keeps_less_for_backward() -> None:
    model = _llama()
    model.train()
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 16, 32, requires_grad=True)
    unfused, _ = _saved_bytes(mlp, x)
    lorakit.fuse_mlps(model)
    fused, saved = _saved_bytes(mlp, x)
    with torch.no_grad():
        h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    # unfused keeps x, gate, silu(gate), up, h and three (N, r) u; fused: x, gate, up and the u's
    assert unfused - fused >= 2 * h.numel() * h.element_size()
    assert not any(t.shape == h.shape and torch.equal(t, h) for t in saved)


def test_fused_model_pickles_and_deep_copies() -> None:
    import copy
    import pickle

    model = _llama()
    lorakit.fuse_mlps(model)
    ids = _ids()
    expected = _outputs(model, ids)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        mlp = clone.model.layers[0].mlp
        assert fuse.is_fused(mlp) and mlp.forward.args[0] is mlp  # bound to the copy, not the original
        torch.testing.assert_close(_outputs(clone, ids), expected)

