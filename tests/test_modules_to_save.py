"""lorakit.modules_to_save on its own: a whole copy per adapter (ModulesToSave) and chosen embedding rows per
adapter (TrainableTokens), against hand-built expectations.  Their use through inject / save / load is tested in
test_peft_features.py and test_io_hardening.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.errors import AdapterNameError, UnsupportedModuleError
from lorakit.modules_to_save import ModulesToSave, TrainableTokens


def test_a_copy_per_adapter_and_the_original_when_none_is_active() -> None:
    torch.manual_seed(0)
    head = nn.Linear(3, 2)
    wrapped = ModulesToSave(head)
    wrapped.add_adapter("a")
    wrapped.add_adapter("b")
    with torch.no_grad():
        wrapped.copies["a"].weight.add_(1.0)
        wrapped.copies["b"].weight.sub_(1.0)
    x = torch.randn(4, 3)
    assert torch.equal(wrapped(x), head(x))  # nothing active yet
    wrapped.active_adapters = ["b", "a"]  # the first active adapter's copy
    assert torch.equal(wrapped(x), x @ (head.weight - 1.0).T + head.bias)
    wrapped.disabled = True
    assert torch.equal(wrapped(x), head(x))
    assert wrapped.out_features == 2 and wrapped.copies["a"] is not head  # attributes read through; real copies
    with pytest.raises(AdapterNameError, match="'a' already has a copy"):
        wrapped.add_adapter("a")


def test_trainable_tokens_replace_rows_in_adapter_order_and_merge() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(5, 2, dtype=torch.bfloat16)
    tokens = TrainableTokens(emb)
    tokens.add_adapter("a", (1, 3))
    tokens.add_adapter("b", (3,))
    assert tokens.copies["a"].dtype == torch.float32  # trained in float32 over a bf16 table
    with torch.no_grad():
        tokens.copies["a"].copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tokens.copies["b"].copy_(torch.tensor([[5.0, 6.0]]))
    ids = torch.tensor([0, 1, 3, 4])
    tokens.active_adapters = ["a", "b"]  # b is written after a: row 3 is b's
    want = emb.weight.detach().clone()
    want[1], want[3] = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])
    assert torch.equal(tokens(ids), want[ids])
    tokens.disabled = True
    assert torch.equal(tokens(ids), emb(ids))
    tokens.disabled = False
    merged = tokens.merged_module()
    assert merged is emb and torch.equal(emb.weight, want)


def test_trainable_tokens_refuse_what_is_not_a_row() -> None:
    with pytest.raises(UnsupportedModuleError, match="need an nn.Embedding, got a Linear"):
        TrainableTokens(nn.Linear(2, 2))
    tokens = TrainableTokens(nn.Embedding(4, 2))
    with pytest.raises(UnsupportedModuleError, match=r"\[4, -1\] are not rows of this embedding \(4 rows\)"):
        tokens.add_adapter("a", (0, 4, -1))
    with pytest.raises(UnsupportedModuleError, match=r"\[\] are not rows"):
        tokens.add_adapter("a", ())
    tokens.add_adapter("a", (2,))
    with pytest.raises(AdapterNameError, match="'a' already has trainable tokens"):
        tokens.add_adapter("a", (1,))
