"""Mixed-adapter batches (forward, generate, multi-tenant training) and hot swap, on tiny transformers."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.errors import AdapterMismatchError, AdapterNameError, MergeError
from lorakit.mixed_batch import batch_adapters, hot_swap
from tests.conftest import tiny_gpt2, tiny_llama

NAMES = ["a", None, "c", "a", "b"]  # c adapts fewer layers; sample 1 is the base model


def randomize(model, seed: int) -> None:
    """Give every adapter a non-zero B (fresh adapters are exactly the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for name in layer.lora_B:
                layer.lora_A[name].copy_(torch.randn(layer.lora_A[name].shape, generator=g) * 0.3)
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.3)


def three_adapters(build, targets, seed=0):
    model = build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, rank_pattern={targets[-1]: 2}), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=6, alpha=3, target_modules=targets), "b")
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5, use_rslora=True, target_modules=targets[:1]), "c")
    randomize(model, seed)
    return model


def per_sample_logits(model, ids, names):
    rows = []
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    rows.append(model(input_ids=ids[i : i + 1]).logits)
            else:
                lorakit.set_adapter(model, name)
                rows.append(model(input_ids=ids[i : i + 1]).logits)
    return torch.cat(rows)


CASES = {
    "llama": (tiny_llama, ["v_proj", "q_proj", "embed_tokens", "down_proj"]),  # c: v_proj only
    "gpt2": (tiny_gpt2, ["c_attn", "wte", "c_proj"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_batch_equals_each_sample_with_its_adapter(case):
    build, targets = CASES[case]
    model = three_adapters(build, targets)
    ids = torch.randint(0, 64, (len(NAMES), 7), generator=torch.Generator().manual_seed(1))
    lorakit.set_adapter(model, "b")
    with torch.no_grad(), batch_adapters(model, NAMES):
        mixed = model(input_ids=ids).logits
        again = model(input_ids=ids).logits  # the second forward uses the cached stacks
    assert lorakit.active_adapters(model) == ["b"]  # restored after the block
    ref = per_sample_logits(model, ids, NAMES)
    torch.testing.assert_close(mixed, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, mixed, rtol=0, atol=0)
    # the mixed batch really differs per sample: the base row and adapter rows are not all equal
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(input_ids=ids).logits
    assert torch.equal(mixed[1], base[1]) and not torch.allclose(mixed[0], base[0], atol=1e-3)


def test_generate_per_sample_adapters():
    model = three_adapters(tiny_llama, ["v_proj", "q_proj", "down_proj"])
    ids = torch.randint(0, 64, (len(NAMES), 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), batch_adapters(model, NAMES):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        beams = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, num_return_sequences=2, **kw)
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            if name is None:
                ctx = lorakit.disable_adapters(model)
            else:
                lorakit.set_adapter(model, name)
                ctx = torch.no_grad()
            with ctx:
                one = model.generate(ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kw)
                one_beams = model.generate(ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), num_beams=2,
                                           num_return_sequences=2, **kw)
        assert torch.equal(mixed[i], one[0]), (i, name)
        assert torch.equal(beams[2 * i : 2 * i + 2], one_beams), (i, name)


def _loss(logits, ids):
    # a per-sample sum, so each adapter's gradient is the sum over its own samples
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def test_multi_tenant_training_equals_training_each_adapter_separately():
    targets = ["v_proj", "q_proj", "embed_tokens", "down_proj"]
    names = ["a", "b", "a", "c", None, "b"]
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(3))
    together = three_adapters(tiny_llama, targets)
    separate = copy.deepcopy(together)

    lorakit.set_adapter(together, ["a", "b", "c"])  # all three trainable
    together.train()
    opt = torch.optim.SGD([p for p in together.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        with batch_adapters(together, names):
            _loss(together(input_ids=ids).logits, ids).backward()
        opt.step()

    separate.train()
    for name in ("a", "b", "c"):
        lorakit.set_adapter(separate, name)
        rows = [i for i, n in enumerate(names) if n == name]
        opt = torch.optim.SGD([p for p in separate.parameters() if p.requires_grad], lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            _loss(separate(input_ids=ids[rows]).logits, ids[rows]).backward()
            opt.step()

    sep_layers = dict(lorakit.lora_layers(separate))
    for qualified, layer in lorakit.lora_layers(together):
        for name in layer.lora_A:
            for table in ("lora_A", "lora_B"):
                got, want = getattr(layer, table)[name], getattr(sep_layers[qualified], table)[name]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{qualified} {name} {table}")
    base_sd = {k: v for k, v in together.state_dict().items() if "lora_" not in k}
    for k, v in base_sd.items():  # the frozen base did not move
        torch.testing.assert_close(v, separate.state_dict()[k], rtol=0, atol=0)


def test_errors():
    model = three_adapters(tiny_llama, ["v_proj", "q_proj", "down_proj"])
    ids = torch.randint(0, 64, (3, 4))
    with pytest.raises(AdapterNameError, match="'zz'"):
        with batch_adapters(model, ["a", "zz", None]):
            pass
    with pytest.raises(AdapterMismatchError, match="multiple of 2"):
        with torch.no_grad(), batch_adapters(model, ["a", "b"]):
            model(input_ids=ids)
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(MergeError, match="unmerge"):
        with batch_adapters(model, ["a", "b", None]):
            pass


# -- hot swap ----------------------------------------------------------------------------------

def _saved(tmp_path, name, r, alpha, seed, targets):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=targets), "default")
    randomize(model, seed)
    return lorakit.save_adapter(model, tmp_path / name, "default")


def _reference(path, ids):
    model = lorakit.load_adapter(tiny_llama(), path)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hot_swap_matches_loading_and_does_not_recompile(tmp_path):
    targets = ["q_proj", "v_proj"]
    x = _saved(tmp_path, "x", 4, 8, 1, targets)
    y = _saved(tmp_path, "y", 8, 4, 2, targets)
    z = _saved(tmp_path, "z", 2, 2, 3, ["q_proj"])  # leaves v_proj alone
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))

    served = tiny_llama()
    lorakit.inject(served, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets), "slot")  # declared max rank 8
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    compiled = torch.compile(served, backend=backend)
    for path in (x, y, z, x):
        hot_swap(served, "slot", path)
        with torch.no_grad():
            got = compiled(input_ids=ids).logits
        torch.testing.assert_close(got, _reference(path, ids), rtol=1e-5, atol=1e-5)
    assert len(compiles) == 1, "a hot swap must not recompile"
    layer = dict(lorakit.lora_layers(served))["model.layers.0.self_attn.q_proj"]
    assert layer.scaling["slot"] == 2.0 and layer.lora_A["slot"].shape == (8, 32)


def test_hot_swap_inside_a_mixed_batch_refreshes_the_stacks(tmp_path):
    x = _saved(tmp_path, "x", 4, 8, 1, ["q_proj", "v_proj"])
    y = _saved(tmp_path, "y", 2, 8, 2, ["q_proj", "v_proj"])
    served = tiny_llama()
    lorakit.inject(served, lorakit.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"]), "slot")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad(), batch_adapters(served, ["slot", None]):
        hot_swap(served, "slot", x)
        first = served(input_ids=ids).logits
        hot_swap(served, "slot", y)
        second = served(input_ids=ids).logits
    torch.testing.assert_close(first[0], _reference(x, ids)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[0], _reference(y, ids)[0], rtol=1e-5, atol=1e-5)


def test_hot_swap_refuses_what_does_not_fit(tmp_path):
    big = _saved(tmp_path, "big", 8, 8, 1, ["q_proj"])
    other = _saved(tmp_path, "other", 2, 8, 1, ["q_proj", "k_proj"])
    served = tiny_llama()
    lorakit.inject(served, lorakit.LoraConfig(r=4, alpha=4, target_modules=["q_proj"]), "slot")
    before = {k: v.clone() for k, v in served.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="r ≥ 8"):
        hot_swap(served, "slot", big)
    with pytest.raises(AdapterMismatchError, match="k_proj"):
        hot_swap(served, "slot", other)
    for k, v in served.state_dict().items():  # nothing was written
        assert torch.equal(v, before[k]), k
    with pytest.raises(AdapterNameError):
        hot_swap(served, "nope", big)


def test_training_with_dropout_keeps_gradients_to_own_samples():
    model = tiny_llama()
    for name in ("a", "b", "c"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.2, target_modules=["q_proj", "v_proj"]), name)
    randomize(model, 0)
    lorakit.set_adapter(model, ["a", "b", "c"])
    model.train()
    ids = torch.randint(0, 64, (3, 6))
    with batch_adapters(model, ["a", None, "b"]):
        _loss(model(input_ids=ids).logits, ids).backward()
    for _, layer in lorakit.lora_layers(model):
        assert layer.lora_A["a"].grad.abs().sum() > 0 and layer.lora_B["b"].grad.abs().sum() > 0
        assert layer.lora_A["c"].grad is None or not layer.lora_A["c"].grad.any()  # c has no sample
    lorakit.delete_adapter(model, "c")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"]), "c")
    with pytest.raises(lorakit.LorakitError, match="dropout"):
        with batch_adapters(model, ["a", "c", None]):
            model(input_ids=ids)
