"""lorakit.integrations.hf: transformers' Trainer, TRL's SFTTrainer and Accelerate save, resume and load
lorakit adapters in PEFT's layout; the speed paths train through the Trainer with the plain path's results."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

import lorakit
from lorakit.integrations import hf
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from lorakit.peft_keys import PREFIX
from tiny_models import make_llama

transformers = pytest.importorskip("transformers")

CFG = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared machine extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("hf") / "llama")


def base(path: Path):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def lora(path: Path, **kw):
    model = base(path)
    torch.manual_seed(1)  # the adapter's init
    return hf.get_lora_model(model, CFG, **kw)


def token_data(n: int = 12, seq: int = 20) -> list[dict]:
    ids = torch.randint(6, 90, (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer_args(out: Path, steps: int, **kw):
    return transformers.TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, **kw,
    )


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return lorakit.read_adapter(path).tensors


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def run_trainer(llama: Path, out: Path, steps: int, resume: Path | None = None, args: dict | None = None, **kw):
    model = lora(llama, **kw)
    trainer = transformers.Trainer(model=model, args=trainer_args(out, steps, **(args or {})), train_dataset=token_data())
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


def test_trainer_saves_peft_layout_resumes_exactly_and_loads_in_lorakit_and_peft(llama, tmp_path):
    trainer = run_trainer(llama, tmp_path / "run", 4)
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {CONFIG_NAME, WEIGHTS_NAME, hf.TRAINER_WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"pytorch_model.bin", "config.json"}
    assert (ckpt / hf.TRAINER_WEIGHTS_NAME).read_bytes() == (ckpt / WEIGHTS_NAME).read_bytes()
    keys = set(tensors(ckpt))
    assert PREFIX + "model.layers.0.mlp.down_proj.lora_A.weight" in keys and PREFIX + "lm_head.weight" in keys
    assert all(k.startswith(PREFIX) and "base_layer" not in k and ".default" not in k for k in keys)

    # the final save is what lorakit.save_adapter writes: same tensors bit for bit, same config and metadata
    trainer.save_model(str(tmp_path / "final"))
    lorakit.save_adapter(trainer.model, tmp_path / "reference")
    assert_same_adapter(tmp_path / "final", tmp_path / "reference")
    final, ref = lorakit.read_adapter(tmp_path / "final"), lorakit.read_adapter(tmp_path / "reference")
    assert final.raw_config == ref.raw_config and final.metadata == ref.metadata
    assert not torch.equal(tensors(ckpt)[PREFIX + "lm_head.weight"], final.tensors[PREFIX + "lm_head.weight"])

    # resuming from step 2 (adapter, optimizer, scheduler, RNG, data position) lands where the full run did
    resumed = run_trainer(llama, tmp_path / "run2", 4, resume=ckpt)
    assert resumed.state.global_step == 4
    resumed.save_model(str(tmp_path / "final2"))
    assert_same_adapter(tmp_path / "final", tmp_path / "final2")

    # the result loads with lorakit and with PEFT and computes what the trained model computes
    peft = pytest.importorskip("peft")
    ids = torch.randint(6, 90, (2, 12), generator=torch.Generator().manual_seed(5))
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(ids).logits
        ours = lorakit.load_adapter(base(llama), tmp_path / "final").eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(base(llama), str(tmp_path / "final")).eval()(ids).logits
        # transformers' own PEFT integration: from_pretrained(adapter dir) loads the base it names + the adapter
        auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()(ids).logits
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto, want, rtol=1e-5, atol=1e-5)

    # merged into plain modules, the model saves whole again, through its class's save_pretrained
    merged = lorakit.merge_and_unload(trainer.model)
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(llama, tmp_path):
    model = lora(llama)
    # the "best" checkpoint is the one with the highest eval loss: the first, not the last (lr 1e-2)
    args = trainer_args(tmp_path / "run", 4, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                        metric_for_best_model="loss", greater_is_better=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_data(), eval_dataset=token_data(4))
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = tensors(Path(trainer.state.best_model_checkpoint))
    now = lorakit.io.adapter_state(trainer.model, "default")
    assert best.keys() == now.keys() and all(torch.equal(best[k], now[k]) for k in best)
    last = tensors(tmp_path / "run" / "checkpoint-4")
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_readme_example_runs(llama, tmp_path, monkeypatch):
    """The README's diff, its lorakit side run as written (model, args and ds supplied)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```diff\n", 1)[1].split("```", 1)[0]
    code = "\n".join(line[1:] for line in block.splitlines() if line[:1] in "+ ")
    assert "get_lora_model" in code and "trainer.save_model" in code
    monkeypatch.chdir(tmp_path)
    namespace = {"model": base(llama), "args": trainer_args(tmp_path / "run", 2), "ds": token_data(4),
                 "Trainer": transformers.Trainer}
    exec(compile(code, "README.md", "exec"), namespace)
    assert os.listdir(tmp_path / "run" / "checkpoint-2")
    loaded = lorakit.load_adapter(base(llama), tmp_path / "out" / "adapter")
    assert lorakit.trainable_parameters(loaded).per_layer


def test_speed_paths_and_torch_compile_train_through_the_trainer_like_the_plain_path(llama, tmp_path):
    from lorakit import shared_input as share

    calls = {"group": 0}
    group = share.lora_linear_group

    def counting_group(*args, **kwargs):
        calls["group"] += 1
        return group(*args, **kwargs)

    with mock.patch.object(share, "lora_linear_group", counting_group):
        fast = run_trainer(llama, tmp_path / "fast", 3)
    assert calls["group"] > 0
    assert sum(lorakit.fused_mlp.is_fused(m) for m in fast.model.modules()) == 2
    # TrainingArguments(torch_compile=True) compiles the prepared model; aot_eager traces forward and
    # backward through dynamo and AOTAutograd like inductor does, without compiling C++ (test time)
    compiled = run_trainer(llama, tmp_path / "compiled", 3, args={"torch_compile": True,
                                                                 "torch_compile_backend": "aot_eager"})
    assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert hf.TRAINER_WEIGHTS_NAME in os.listdir(tmp_path / "compiled" / "checkpoint-2")
    plain = run_trainer(llama, tmp_path / "plain", 3, share=False, fuse=False)
    assert not any(lorakit.fused_mlp.is_fused(m) for m in plain.model.modules())
    want = lorakit.io.adapter_state(plain.model, "default")
    for trainer in (fast, compiled):
        got = lorakit.io.adapter_state(trainer.model, "default")
        assert got.keys() == want.keys()
        moved = 0
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
            moved += "lora_B" in key and bool(got[key].abs().max() > 1e-4)
        assert moved > 0  # the updates are not trivially equal (B started at zero)


def test_sft_trainer_saves_resumes_and_matches_save_adapter(llama, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    tok.pad_token = tok.eos_token
    texts = [f"def f{i}(x): return x * {i} + {i % 3}" for i in range(12)]
    data = datasets.Dataset.from_list([{"text": t} for t in texts])

    def run(out: Path, resume: Path | None = None):
        args = trl.SFTConfig(
            str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, save_steps=2,
            logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, bf16=False, max_length=32,
        )  # gradient checkpointing stays on: SFTConfig's default
        trainer = trl.SFTTrainer(model=lora(llama), args=args, train_dataset=data, processing_class=tok)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return trainer

    trainer = run(tmp_path / "sft")
    ckpt = tmp_path / "sft" / "checkpoint-2"
    assert "config.json" not in os.listdir(ckpt)
    trainer.save_model(str(tmp_path / "final"))
    lorakit.save_adapter(trainer.model, tmp_path / "reference")
    assert_same_adapter(tmp_path / "final", tmp_path / "reference")
    assert json.loads((tmp_path / "final" / CONFIG_NAME).read_text()) == json.loads(
        (tmp_path / "reference" / CONFIG_NAME).read_text())
    resumed = run(tmp_path / "sft2", resume=ckpt)
    resumed.save_model(str(tmp_path / "final2"))
    assert_same_adapter(tmp_path / "final", tmp_path / "final2")


def test_accelerate_save_state_writes_the_adapter_and_load_state_restores_it(llama, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    hf.register_accelerate_hooks(accelerator)
    model = lora(llama)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    ids = torch.randint(6, 90, (2, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        accelerator.backward(model(ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    accelerator.save_state(str(tmp_path / "state"))
    assert not list((tmp_path / "state").glob("model*.safetensors"))
    saved = lorakit.io.adapter_state(model, "default")
    reference = lorakit.save_adapter(model, tmp_path / "reference")
    assert_same_adapter(tmp_path / "state" / hf.ACCELERATE_DIR, reference)
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    accelerator.backward(model(ids, labels=ids).loss)
    opt.step()
    accelerator.load_state(str(tmp_path / "state"))
    for key, value in lorakit.io.adapter_state(model, "default").items():
        assert torch.equal(value, saved[key]), key
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(value, moments[key]), key


def test_resume_hook_checks_the_file_and_leaves_other_state_dicts_alone(llama, tmp_path):
    model = lora(llama)
    hf.save_pretrained(model, tmp_path / "ckpt")
    # a model's own state dict (lorakit's internal keys) loads as usual
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not model.load_state_dict(before, strict=True).missing_keys
    # the adapter file loads through the hook, bit for bit, everything else untouched
    other = lora(llama)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    peft_keyed = tensors(tmp_path / "ckpt")
    result = other.load_state_dict(peft_keyed, strict=True)  # an adapter file is complete without base keys
    assert not result.unexpected_keys and not result.missing_keys
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a file short of one tensor, or with a wrong shape, is refused
    short = dict(peft_keyed)
    short.pop(PREFIX + "model.layers.1.self_attn.v_proj.lora_B.weight")
    with pytest.raises(lorakit.AdapterMismatchError, match="v_proj.lora_B"):
        other.load_state_dict(short, strict=False)
    wrong = dict(peft_keyed)
    wrong[PREFIX + "model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(3, 32)
    with pytest.raises(lorakit.AdapterMismatchError, match=r"up_proj.lora_A.weight has shape \(3, 32\)"):
        other.load_state_dict(wrong, strict=False)
    # after those failed loads, a partial state dict of lorakit's own keys still reports its missing keys
    partial = {k: v for k, v in before.items() if "lora_" in k}
    assert len(other.load_state_dict(partial, strict=False).missing_keys) == len(before) - len(partial)


@pytest.mark.parametrize("options", [{"init": "pissa"}, {"init": "olora"}, {"use_dora": True}], ids=["pissa", "olora", "dora"])
def test_checkpoints_of_pissa_olora_and_dora_adapters_round_trip(llama, tmp_path, options):
    config = CFG.replace(**options)

    def prepared(model=None):
        torch.manual_seed(1)
        return hf.get_lora_model(model if model is not None else base(llama), config)

    model = prepared()
    with torch.no_grad():  # "training": every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    hf.save_pretrained(model, tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "from-state-dict", state_dict=model.state_dict())
    lorakit.save_adapter(model, tmp_path / "reference")
    assert_same_adapter(tmp_path / "ckpt", tmp_path / "reference")
    assert_same_adapter(tmp_path / "from-state-dict", tmp_path / "reference")
    fresh = prepared()
    fresh.load_state_dict(tensors(tmp_path / "ckpt"), strict=False)
    want = model.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, want[key]), key
    if "init" in options:  # the file's initial factors must be this model's: another base's are refused
        config_of_base = base(llama).config
        torch.manual_seed(7)
        other = prepared(transformers.AutoModelForCausalLM.from_config(config_of_base))
        with pytest.raises(lorakit.AdapterMismatchError, match="another initial factor"):
            other.load_state_dict(tensors(tmp_path / "ckpt"), strict=False)


def test_save_pretrained_keeps_other_files_and_takes_values_from_a_given_state_dict(llama, tmp_path):
    model = lora(llama)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "model.layers.0.self_attn.q_proj.lora_B.default"
    state[key] = torch.full_like(state[key], 0.5)
    model.save_pretrained(out, state_dict=state, is_main_process=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not [p for p in out.iterdir() if p.name.startswith(".lorakit-save-")]
    saved = tensors(out)
    assert torch.equal(saved[PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"], state[key])
    assert (out / hf.TRAINER_WEIGHTS_NAME).read_bytes() == (out / WEIGHTS_NAME).read_bytes()
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    # what the Trainer passes when it was handed a torch.compile'd model: refused, nothing written
    with pytest.raises(hf.TrainerSetupError, match=r"torch_compile=True"):
        model.save_pretrained(tmp_path / "compiled", state_dict=torch.compile(model).state_dict())
    assert not (tmp_path / "compiled").exists()


def test_get_lora_model_takes_a_peft_config(llama):
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    model = hf.get_lora_model(base(llama), theirs)
    config = lorakit.adapters.state_of(model).configs["default"]
    assert (config.r, config.alpha, config.dropout, config.modules_to_save) == (4, 8.0, 0.1, ("lm_head",))
    assert sorted(config.target_modules) == ["q_proj", "v_proj"] and config.task_type == "CAUSAL_LM"
    assert {name.rsplit(".", 1)[-1] for name, _ in lorakit.lora_layers(model)} == {"q_proj", "v_proj"}
    with pytest.raises(lorakit.ConfigError, match="layers_to_transform"):
        hf.get_lora_model(base(llama), peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))
    with pytest.raises(lorakit.ConfigError, match="lorakit.LoraConfig or a peft.LoraConfig"):
        hf.get_lora_model(base(llama), {"r": 4})


def test_enable_disable_and_errors(llama, tmp_path):
    plain = base(llama)
    with pytest.raises(lorakit.AdapterNameError, match="inject one first"):
        hf.enable_peft_checkpoints(plain)
    model = lora(llama)
    with pytest.raises(lorakit.AdapterNameError, match="'nope'"):
        hf.enable_peft_checkpoints(model, "nope")
    hf.enable_peft_checkpoints(model)  # again: still one hook
    assert len(model._load_state_dict_pre_hooks) == 1
    assert hf.disable_peft_checkpoints(model) and not hf.disable_peft_checkpoints(model)
    assert "save_pretrained" not in model.__dict__ and not model._load_state_dict_pre_hooks
    # load_adapter_weights refuses an adapter trained on another base model, and changes nothing
    config = base(llama).config
    torch.manual_seed(7)  # not make_llama's seed: other values
    other_base = transformers.AutoModelForCausalLM.from_config(config)
    torch.manual_seed(1)
    foreign = hf.get_lora_model(other_base, CFG)
    lorakit.save_adapter(foreign, tmp_path / "foreign")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.AdapterMismatchError, match="another base model"):
        hf.load_adapter_weights(model, tmp_path / "foreign")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
