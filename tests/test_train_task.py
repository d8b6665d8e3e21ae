"""train/task.py's batch helpers: moving a collated batch to a device, counting its real tokens (hand-counted)."""

from __future__ import annotations

import torch

from lorakit.train.task import batch_to, count_tokens


def test_count_tokens_reads_the_mask_or_packed_lengths() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": mask}) == 5
    # the embedding task packs its sides: each side's *_lengths, nested dicts included
    packed = {"query": {"input_ids": torch.zeros(7), "query_lengths": torch.tensor([3, 4])},
              "doc_lengths": torch.tensor([2, 2, 5])}
    assert count_tokens(packed) == 16
    assert count_tokens(torch.zeros(3, 4)) == 0  # a bare tensor has no mask: no token count


def test_batch_to_moves_every_tensor_and_keeps_the_rest() -> None:
    batch = {"x": torch.ones(2, dtype=torch.float64), "inner": {"y": torch.arange(3)}, "name": "a"}
    moved = batch_to(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["inner"]["y"].device.type == "meta"
    assert moved["name"] == "a" and moved.keys() == batch.keys()
