"""Bad adapter files found by fuzzing (issue 14): each is refused with a typed error, and a failed load
leaves the model exactly as it was (state, module tree and requires_grad flags)."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import AdapterFileError, AdapterMismatchError, ConfigError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import tiny_llama


def _saved(tmp_path, **cfg):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], **cfg))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_()
    return lorakit.save_adapter(model, tmp_path / "adapter")


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _assert_unchanged(model, snap):
    state, names, flags = snap
    assert [n for n, _ in model.named_modules()] == names
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert lorakit.adapter_names(model) == []


def _refused(path, error, match):
    """read_adapter and load_adapter both refuse ``path`` with ``error``; the model is untouched."""
    with pytest.raises(error, match=match):
        lorakit.read_adapter(path)
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        lorakit.load_adapter(model, path)
    _assert_unchanged(model, snap)


def _rewrite(path, fn, metadata=None):
    tensors = load_file(path / WEIGHTS_NAME)
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    save_file(fn(tensors), str(path / WEIGHTS_NAME), metadata=meta if metadata is None else metadata)


def _write_raw(file, header: str, data: bytes) -> None:
    raw = header.encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps(config | changes))


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    path = _saved(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def poison(t):
        t[key][1, 3] = float("nan")
        return t

    _rewrite(path, poison)
    _refused(path, AdapterFileError, f"{WEIGHTS_NAME}: tensor '{key}' holds NaN")
    _rewrite(path, lambda t: t | {key: torch.full_like(t[key], float("inf"))})
    _refused(path, AdapterFileError, "holds NaN or infinite")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_non_float_lora_tensors_are_refused(tmp_path, dtype):
    path = _saved(tmp_path)
    _rewrite(path, lambda t: {k: (v * 3).to(dtype) if "lora_B" in k else v for k, v in t.items()})
    _refused(path, AdapterFileError, "must be floating point")


def test_all_int32_adapter_is_refused(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, lambda t: {k: v.round().to(torch.int32) for k, v in t.items()})
    _refused(path, AdapterFileError, r"stored as I32; LoRA tensors must be floating point")


def test_float4_header_is_refused_before_the_model_is_touched(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / WEIGHTS_NAME)
    header, data, offset = {}, b"", 0
    for key, t in sorted(tensors.items()):
        n = t.numel() // 2  # F4: two values per byte
        header[key] = {"dtype": "F4", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        data += bytes(n)
        offset += n
    _write_raw(path / WEIGHTS_NAME, json.dumps(header), data)
    _refused(path, AdapterFileError, "stored as F4")


def test_failure_after_inject_restores_requires_grad(tmp_path):
    # float64 values beyond float32's range pass the file checks and fail only when converted into the
    # injected float32 parameters; the model (every base parameter trainable) must come back as it was
    path = _saved(tmp_path)
    _rewrite(path, lambda t: {k: v.double() * (1e300 if "v_proj.lora_B" in k else 1) for k, v in t.items()})
    model = tiny_llama()
    assert all(p.requires_grad for p in model.parameters())
    snap = _snapshot(model)
    with pytest.raises(AdapterMismatchError, match="too large for torch.float32"):
        lorakit.load_adapter(model, path)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("text, match", [
    ("{", "metadata lorakit_base_fingerprint is not valid JSON"),
    ("[]", "is not a fingerprint"),
    ('{"modules": 5}', "is not a fingerprint"),
    ('{"modules": {"a": [1, "x"]}, "checksum": "0"}', "is not a fingerprint"),
    ('{"modules": {}, "checksum": 5}', "is not a fingerprint"),
    ('{"modules": {}, "checksum": "0", "checksum": "1"}', "appears twice"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
])
def test_corrupt_fingerprint_metadata(tmp_path, text, match):
    path = _saved(tmp_path)
    _rewrite(path, lambda t: t, metadata={"format": "pt", "lorakit_base_fingerprint": text})
    _refused(path, AdapterFileError, match)


@pytest.mark.parametrize("changes, error, match", [
    ({"target_modules": "@nested@"}, AdapterFileError, "nested too deeply"),
    ({"modules_to_save": 5}, ConfigError, "modules_to_save must be a list"),
    ({"target_modules": "x{99999999999}"}, ConfigError, "target_modules .* is not a valid regular expression"),
    ({"target_modules": "(q{1000}){1000}"}, ConfigError, "expands to over"),
    ({"rank_pattern": {"(?i)q_proj": 4}}, ConfigError, "rank_pattern key .*global flags.*must stand at the very start"),
    ({"alpha_pattern": {"(?i)q_proj": 4}}, ConfigError, "alpha_pattern key"),
    ({"rank_pattern": [["q_proj", 4]]}, ConfigError, "rank_pattern must be a JSON object"),
    ({"r": 10**30}, ConfigError, r"r must be an integer in \[1, 65536\]"),
    ({"lora_alpha": 10**400}, ConfigError, "alpha must be a finite number"),
    ({"peft_type": ["LORA"]}, ConfigError, "peft_type"),
    ({"task_type": {"a": 1}}, ConfigError, "task_type must be a string"),
    ({"layers_pattern": "x" * 10**5}, ConfigError, r"this adapter uses layers_pattern, which lorakit does not support$"),
])
def test_ill_typed_config_fields(tmp_path, changes, error, match):
    path = _saved(tmp_path)
    _edit_config(path, **changes)
    text = (path / CONFIG_NAME).read_text()  # a nesting json.dumps could not write itself
    (path / CONFIG_NAME).write_text(text.replace('"@nested@"', "[" * 2000 + "]" * 2000))
    _refused(path, error, match)
    with pytest.raises(error) as info:
        lorakit.read_adapter(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600 and CONFIG_NAME in str(info.value)


def test_huge_integer_in_config_is_refused(tmp_path):
    path = _saved(tmp_path)
    text = (path / CONFIG_NAME).read_text()
    (path / CONFIG_NAME).write_text(text.replace('"r": 2', '"r": ' + "9" * 5000))
    _refused(path, AdapterFileError, "not valid JSON: Exceeds the limit")


def test_duplicate_keys_are_refused(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    t = tensors[key].contiguous()
    n = t.numel() * 4
    entry = json.dumps({"dtype": "F32", "shape": list(t.shape), "data_offsets": [0, n]})
    entry2 = json.dumps({"dtype": "F32", "shape": list(t.shape), "data_offsets": [n, 2 * n]})
    _write_raw(path / WEIGHTS_NAME, f'{{"{key}": {entry}, "{key}": {entry2}}}', t.numpy().tobytes() * 2)
    _refused(path, AdapterFileError, f"key '{key}' appears twice")
    _saved(tmp_path)
    text = (path / CONFIG_NAME).read_text()
    (path / CONFIG_NAME).write_text(text.replace('"r": 2', '"r": 2, "r": 4'))
    _refused(path, AdapterFileError, f"{CONFIG_NAME}: key 'r' appears twice")


class _Named(nn.Module):
    """Modules with long, repetitive names: where a backtracking regex takes exponential time."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"a" * 40: nn.Linear(4, 4), "b": nn.Linear(4, 4)})

    def forward(self, x):
        return self.blocks["b"](self.blocks["a" * 40](x))


def test_catastrophic_regex_is_stopped_with_a_typed_error():
    model = _Named()
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=r"took over .* s to match module 'blocks.aaaa"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=r"blocks\.(a|a)+\d"))
    _assert_unchanged(model, snap)
    with pytest.raises(ConfigError, match="rank_pattern key"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["b"], rank_pattern={r"(a|a)+\d": 4})
                       .replace(target_modules=r"blocks\..*"))
    # the pattern, which made `re` backtrack for over 10 s on these names, is answered at once
    with pytest.raises(lorakit.TargetError, match="matches no adaptable module"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=r"(.+)+\d\d\d\d"))


def test_integer_buffers_of_modules_to_save_still_load(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    model = build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    path = lorakit.save_adapter(model, tmp_path / "bn")
    assert load_file(path / WEIGHTS_NAME)["base_model.model.1.num_batches_tracked"].dtype == torch.int64
    lorakit.load_adapter(build(), path)
    _rewrite(path, lambda t: t | {"base_model.model.1.num_batches_tracked": torch.tensor(0, dtype=torch.int32)})
    with pytest.raises(AdapterMismatchError, match="num_batches_tracked is stored as torch.int32"):
        lorakit.load_adapter(build(), path)


def test_hot_swap_refuses_empty_factors(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["0", "1"]))
    path = lorakit.save_adapter(model, tmp_path / "a")
    adapter = lorakit.read_adapter(path)  # read_adapter refuses such a file; an AdapterFile built in memory
    adapter.tensors = {k: (v[:0] if "lora_A" in k else v[:, :0]) for k, v in adapter.tensors.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=r"has A \(0, 8\) / B \(8, 0\); LoRA factors are non-empty"):
        lorakit.hot_swap(model, "default", adapter, strict=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("shape", [[], [4], [0, 32], [2, 0]])
def test_lora_factors_must_be_non_empty_matrices(tmp_path, shape):
    path = _saved(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(path, lambda t: t | {key: torch.zeros(shape)})
    _refused(path, AdapterFileError, r"LoRA factors are non-empty matrices")


def test_without_the_regex_package_a_regex_needs_it_by_name(monkeypatch):
    import sys

    from lorakit import patterns

    patterns._compiled.cache_clear()
    monkeypatch.setitem(sys.modules, "regex", None)  # import regex now raises ImportError
    try:
        model = _Named()
        with pytest.raises(ConfigError, match=r"needs the `regex` package .*pip install regex, or give module names as a list"):
            lorakit.inject(model, lorakit.LoraConfig(target_modules=r"blocks\.b"))
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["b"]))  # plain names never need it
    finally:
        patterns._compiled.cache_clear()


def test_cli_reports_a_file_system_error_in_one_line(tmp_path, capsys):
    from lorakit.cli import main

    path = _saved(tmp_path)
    assert main(["analyze", str(path), "--json", "/proc/lorakit-test/x.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit analyze: error: [Errno 2] No such file or directory: '/proc/lorakit-test'")
    assert "Traceback" not in err and err.count("\n") == 1
