"""torch.compile (Inductor, on the CPU) of a tiny Llama with lorakit's whole training set-up — inject,
share_inputs, fuse_mlps, with and without dropout — against the same model run eagerly: no graph break, the
same loss and the same adapter gradients, and an optimizer step that agrees too; the same set-up on an NF4 base
(no graph break either), compiled layer by layer; and generation with the whole forward compiled (fullgraph, static KV cache), as
transformers compiles it for decode, gives the eager tokens."""

from __future__ import annotations

import pytest
import torch

import lorakit
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(dropout: float):
    model = lorakit.inject(tiny_llama(3), lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS))
    torch.manual_seed(4)
    for _, layer in lorakit.lora_layers(model):
        for B in layer.lora_B.values():
            torch.nn.init.normal_(B, std=0.1)  # B ≠ 0, so every branch changes the loss
    assert lorakit.share_inputs(model) == 4 and lorakit.fuse_mlps(model) == 2
    return model.train()


def _step(model, step, ids, opt):
    torch.manual_seed(11)  # the layers draw their dropout seeds from the CPU generator
    loss = step(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    opt.zero_grad(set_to_none=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, params


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_llama_matches_eager(dropout: float) -> None:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    runs = []
    for compiled in (False, True):
        model = _model(dropout)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        step = model
        if compiled:
            torch._dynamo.reset()
            assert torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count == 0
            step = torch.compile(model)
        # Random ops in the compiled graph draw from torch's generator as eager ones do, so the layers draw the
        # same dropout seeds in both runs (Inductor's own RNG would give other, equally valid masks).
        with torch._inductor.config.patch(fallback_random=True):
            runs.append([_step(model, step, ids, opt) for _ in range(2)])  # the second sees updated adapters
    for (loss_e, grads_e, params_e), (loss_c, grads_c, params_c) in zip(*runs):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
        assert grads_e.keys() == grads_c.keys() and len(grads_e) == 2 * 7 * 2
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-4, msg=name)
            torch.testing.assert_close(params_c[name], params_e[name], rtol=1e-4, atol=1e-4, msg=name)
    if dropout:  # the masks matter: the same model without dropout gives another first loss
        with torch.no_grad():
            assert not torch.allclose(_model(dropout).eval()(input_ids=ids, labels=ids).loss, runs[0][0][0])


@pytest.mark.parametrize("nf4", [False, True])
def test_compiled_generation_matches_eager(nf4: bool) -> None:
    """Decode with the forward compiled whole (fullgraph: a graph break is an error) and a static KV cache, the
    set-up of ``torch.compile(model.forward, mode="reduce-overhead")`` on a GPU, with the adapters unmerged; on a
    full-precision and on an NF4 base."""
    model = _model(0.0).eval()
    if nf4:
        lorakit.quantize_base(model, "nf4")
        assert all(layer.quantized() for _, layer in lorakit.lora_layers(model))
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static",
              disable_compile=True)  # this test compiles; transformers must not do it again
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, fullgraph=True)
        compiled = model.generate(ids, **kw)
    assert compiled.shape == (1, 12)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compiled_qlora_layers_match_eager() -> None:
    """QLoRA (NF4 base) with share_inputs and fuse_mlps, each decoder layer compiled as ``lorakit train --compile``
    does: the 4-bit linears and the fused MLP's 4-bit down-projection are custom ops in the graph (no graph
    break), and loss and adapter gradients equal the eager model's."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    runs = []
    for compiled in (False, True):
        model = lorakit.inject(lorakit.quantize_base(tiny_llama(3), "nf4"),
                               lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
        torch.manual_seed(4)
        for _, layer in lorakit.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B["default"], std=0.1)
        assert lorakit.share_inputs(model) == 4 and lorakit.fuse_mlps(model) == 2
        if compiled:
            torch._dynamo.reset()
            assert torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count == 0
            torch._dynamo.reset()
            for block in model.model.layers:
                block.compile()
        loss = model.train()(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_e, grads_e), (loss_c, grads_c) = runs
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == 2 * 7 * 2
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-4, msg=name)
