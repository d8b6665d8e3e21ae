"""fingerprint.py: the base-model fingerprint stored with an adapter."""

import json

import torch

from lorakit.fingerprint import describe_mismatch, dumps, fingerprint, weight_checksum


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.q": torch.randn(8, 16, generator=g), "a.v": torch.randn(8, 16, generator=g)}


def test_same_base_in_bfloat16_has_the_same_fingerprint():
    w = _weights()
    assert fingerprint(w) == fingerprint({n: t.to(torch.bfloat16) for n, t in w.items()})
    assert weight_checksum(w["a.q"]) == weight_checksum(w["a.q"].to(torch.bfloat16))


def test_a_float16_copy_is_another_rounding():
    # float32 → float16 → bfloat16 double-rounds some values: documented as a different base.
    w = _weights()
    assert weight_checksum(w["a.q"]) != weight_checksum(w["a.q"].half())


def test_fingerprint_lists_names_and_shapes():
    fp = fingerprint(_weights())
    assert fp["modules"] == {"a.q": [8, 16], "a.v": [8, 16]}
    assert json.loads(dumps(fp)) == fp


def test_each_kind_of_mismatch_is_described():
    w = _weights()
    saved = fingerprint(w)
    assert describe_mismatch(saved, fingerprint(w)) is None
    assert "no module 'a.v'" in describe_mismatch(saved, fingerprint({"a.q": w["a.q"]}))
    other_shape = dict(w, **{"a.v": torch.zeros(4, 16)})
    assert "shape (4, 16)" in describe_mismatch(saved, fingerprint(other_shape))
    other_values = {n: t + 1 for n, t in w.items()}
    assert "different values" in describe_mismatch(saved, fingerprint(other_values))
