"""Streaming quantisation of a local checkpoint (integrations.local_models.load_quantized, what
``lorakit train --quantize nf4`` loads with): the same NF4 model as loading whole then quantising, and
the full-precision model never whole in memory."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_bert, make_llama, with_renamed_weight
from torch import nn

import lorakit
import lorakit.nf4_linear
from lorakit.integrations.local_models import QuantizedLoad, load_model, load_quantized
from lorakit.quant import safetensors_files

CPU = QuantizedLoad("nf4", torch.device("cpu"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    return {"llama": make_llama(root / "llama", max_shard_size="40KB"), "bert": make_bert(root / "bert")}


def _assert_same(streamed: nn.Module, reference: nn.Module, skip: tuple[str, ...] = ()) -> None:
    a, b = streamed.state_dict(), reference.state_dict()
    assert sorted(a) == sorted(b)
    for key in b:
        if not key.startswith(skip):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for name, m in reference.named_modules():
        if isinstance(m, lorakit.NF4Linear):
            assert streamed.get_submodule(name).source_checksum == m.source_checksum  # adapters fingerprint the fp base


def test_streamed_causal_lm_equals_load_then_quantize(ckpts: dict[str, Path]) -> None:
    assert len(safetensors_files(ckpts["llama"])) == 3
    model, note = load_quantized(ckpts["llama"], "AutoModelForCausalLM", CPU)
    assert note == "streamed from 3 safetensors file(s), one tensor at a time"
    reference = lorakit.quantize_base(load_model(ckpts["llama"], "AutoModelForCausalLM"), "nf4")
    assert sum(isinstance(m, lorakit.NF4Linear) for m in model.modules()) == 14  # lm_head stays full precision
    assert type(model.lm_head) is nn.Linear
    _assert_same(model, reference)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ids = torch.tensor([[1, 10, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_bfloat16_checkpoint_is_quantised_from_the_dtype_the_trainer_keeps_the_base_in(
        ckpts: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.train.compute import base_dtype, cast_base

    AutoModelForCausalLM.from_pretrained(ckpts["llama"], dtype=torch.bfloat16).save_pretrained(tmp_path)
    model, _ = load_quantized(tmp_path, "AutoModelForCausalLM", CPU)
    reference = load_model(tmp_path, "AutoModelForCausalLM")  # what the trainer did: load, cast, quantise
    assert reference.model.embed_tokens.weight.dtype == torch.bfloat16
    cast_base(reference, base_dtype(reference, CPU.device, bf16=False))  # float32 on the CPU
    _assert_same(model, lorakit.quantize_base(reference, "nf4"))
    assert model.model.layers[0].mlp.up_proj.dtype == torch.float32


def test_streamed_encoder_from_a_headed_checkpoint_and_a_fresh_classification_head(ckpts: dict[str, Path]) -> None:
    # AutoModel out of a BertForSequenceClassification checkpoint: its keys lose the "bert." prefix
    model, note = load_quantized(ckpts["bert"], "AutoModel", CPU, dtype=None)
    assert note.startswith("streamed")
    _assert_same(model, lorakit.quantize_base(load_model(ckpts["bert"], "AutoModel", dtype=None), "nf4"))
    # three labels where the checkpoint has two: the head is made afresh (seeded), full precision
    options = dict(num_labels=3, ignore_mismatched_sizes=True)
    model, note = load_quantized(ckpts["bert"], "AutoModelForSequenceClassification", CPU, seed=3,
                                 keep=("classifier",), **options)
    assert note.endswith("; classifier freshly initialised")
    assert type(model.classifier) is nn.Linear and model.classifier.weight.shape == (3, 32)
    again, _ = load_quantized(ckpts["bert"], "AutoModelForSequenceClassification", CPU, seed=3,
                              keep=("classifier",), **options)
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # exact resume relies on it
    assert 0.005 < float(model.classifier.weight.detach().std()) < 0.05 and not model.classifier.bias.any()  # N(0, 0.02²), 0
    reference = load_model(ckpts["bert"], "AutoModelForSequenceClassification", **options)
    body = [n for n, m in reference.named_modules() if type(m) is nn.Linear and not n.startswith("classifier")]
    _assert_same(model, lorakit.quantize_base(reference, "nf4", modules=body), skip=("classifier.",))


def test_a_checkpoint_that_cannot_be_streamed_is_loaded_whole_and_says_why(ckpts: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    d = with_renamed_weight(ckpts["llama"], tmp_path / "renamed", "model.norm.weight", "model.final_norm.weight")
    model, note = load_quantized(d, "AutoModelForCausalLM", CPU)
    assert note == "loaded whole, then quantised (model.norm.weight is not in the checkpoint under that name or shape)"
    assert not any(isinstance(m, lorakit.NF4Linear) for m in model.modules())  # the trainer quantises it


def _linear_shapes(ckpt: Path) -> tuple[set[tuple[int, ...]], int]:
    """Shapes of the checkpoint's quantised linear weights, and the most bytes of them one shard holds."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    names = [k for k in index if k.endswith("proj.weight")]
    shapes, per_shard = set(), {}
    for f in safetensors_files(ckpt):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k in names:
                    t = sf.get_slice(k)
                    shapes.add(tuple(t.get_shape()))
                    per_shard[f] = per_shard.get(f, 0) + 4 * int(torch.Size(t.get_shape()).numel())
    return shapes, max(per_shard.values())


def _peak_full_precision_bytes(monkeypatch: pytest.MonkeyPatch, shapes: set[tuple[int, ...]], load) -> int:
    """The most bytes of full-precision linear weights made by ``load`` alive at once, seen at each
    quantisation (tensors of these shapes that other tests keep alive are counted out)."""
    quantize_nf4 = lorakit.nf4_linear.quantize_nf4

    def alive() -> dict[int, int]:
        gc.collect()
        storages = {}
        for o in gc.get_objects():
            if not issubclass(type(o), torch.Tensor) or o.is_meta or not o.is_floating_point():
                continue
            if not all(type(n) is int for n in o.shape):  # symbolic sizes: a fake tensor left by a compile test
                continue
            if tuple(o.shape) in shapes:
                s = o.untyped_storage()
                try:
                    storages[s.data_ptr()] = s.nbytes()
                except RuntimeError:  # a fake tensor left by an earlier torch.compile test: it owns no memory
                    continue
        return storages

    before = alive()
    peaks: list[int] = []

    def spy(weight: torch.Tensor):
        peaks.append(sum(n for ptr, n in alive().items() if ptr not in before))
        return quantize_nf4(weight)

    monkeypatch.setattr(lorakit.nf4_linear, "quantize_nf4", spy)
    load()
    monkeypatch.undo()
    assert len(peaks) == 14
    return max(peaks)


def test_the_full_precision_model_is_never_whole_in_memory(ckpts: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    shapes, shard_bytes = _linear_shapes(ckpts["llama"])
    whole = _peak_full_precision_bytes(
        monkeypatch, shapes, lambda: lorakit.quantize_base(load_model(ckpts["llama"], "AutoModelForCausalLM"), "nf4"))
    assert whole == 2 * 36864 > shard_bytes  # load-then-quantize holds every linear (2 layers × 36 KiB) at once
    streamed = _peak_full_precision_bytes(monkeypatch, shapes,
                                          lambda: load_quantized(ckpts["llama"], "AutoModelForCausalLM", CPU))
    assert streamed <= shard_bytes, (streamed, shard_bytes)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory maps (Linux)")
def test_no_shard_stays_mapped_once_loaded(ckpts: dict[str, Path]) -> None:
    # safetensors may hand out views of the memory-mapped file: a norm weight kept as such a view would
    # keep its whole shard mapped, and every page of it read so far resident, for the model's lifetime
    model, _ = load_quantized(ckpts["llama"], "AutoModelForCausalLM", CPU)
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(ckpts["llama"]) in line]
    assert mapped == [] and model is not None
