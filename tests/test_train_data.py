"""Training data: JSONL errors that name file:line and the fix, skipping, splits, and the tasks' token labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.train.causal_lm import IGNORE, CausalLMTask
from lorakit.train.classification import ClassificationTask
from lorakit.train.data import DataError, load_train_eval, read_jsonl, require, split_holdout
from lorakit.integrations.local_models import ModelError, model_dir
from tiny_models import make_llama


def write(path: Path, *lines: object) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def text_label(obj: dict) -> tuple[str, str]:
    return require(obj, "text"), require(obj, "label", (str, int))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama") / "m", chat_template=True)


def test_errors_name_file_line_and_fix(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", {"text": "a", "label": "x"}, "", '{"text": "b", "label": ', {"text": "c", "label": "y"})
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON .*--skip-bad-lines"):
        read_jsonl(f, text_label)
    write(f, {"text": "a", "label": "x"}, {"txt": "b", "label": "y"})
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'text' \(fields present: label, txt\); add a 'text' field"):
        read_jsonl(f, text_label)
    write(f, {"text": "a", "label": [1]})
    with pytest.raises(DataError, match=r":1: field 'label' should be a str or int, got list"):
        read_jsonl(f, text_label)
    f.write_bytes(b'{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 2}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte 14 of the line\); save the file as UTF-8"):
        read_jsonl(f, text_label)
    write(f, ["not", "an", "object"])
    with pytest.raises(DataError, match=r":1: expected a JSON object, got list"):
        read_jsonl(f, text_label)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "nope.jsonl", text_label)
    with pytest.raises(DataError, match="it has no examples"):
        read_jsonl(write(tmp_path / "e.jsonl", "", "  "), text_label)
    with pytest.raises(DataError, match="all 2 non-blank lines were bad"):
        read_jsonl(write(tmp_path / "b.jsonl", "{", "[}"), text_label, skip_bad_lines=True)


def test_bom_and_crlf_are_fine(tmp_path: Path) -> None:
    f = tmp_path / "w.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 1}\r\n{"text": "b", "label": 2}\r\n')
    assert read_jsonl(f, text_label).examples == [("a", 1), ("b", 2)]


def test_skip_bad_lines_counts_and_keeps_line_numbers(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", {"text": "a", "label": 1}, "{oops", {"label": 2}, "", {"text": "d", "label": 3})
    loaded = read_jsonl(f, text_label, skip_bad_lines=True)
    assert loaded.examples == [("a", 1), ("d", 3)] and loaded.lines == [1, 5] and loaded.skipped == 2


def test_holdout_split_is_deterministic_and_keeps_every_group_in_training() -> None:
    groups = ["a"] * 8 + ["b"] + ["c"] * 3
    train, held = split_holdout(len(groups), 0.25, seed=3, groups=groups)
    assert (train, held) == split_holdout(len(groups), 0.25, seed=3, groups=groups)
    assert sorted(train + held) == list(range(12)) and len(held) == 3
    assert {groups[i] for i in train} == {"a", "b", "c"}
    assert split_holdout(1, 0.5, 0) == ([0], [])
    assert len(split_holdout(2, 0.9, 0)[0]) == 1  # at least one example stays for training


def test_load_train_eval_holds_out_a_seeded_split_or_reads_the_eval_file(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)] + ["{broken"]
    data = write(tmp_path / "d.jsonl", *rows)
    split = load_train_eval(data, None, text_label, skip_bad_lines=True, seed=3, eval_fraction=0.25,
                            group=lambda e: e[1])
    train_idx, held_idx = split_holdout(20, 0.25, 3, groups=["ab"[i % 2] for i in range(20)])
    assert split.train == [(f"t{i}", "ab"[i % 2]) for i in train_idx]
    assert split.eval == [(f"t{i}", "ab"[i % 2]) for i in held_idx] and len(split.eval) == 5
    assert split.skipped == 1 and split.eval_file is None and len(split.train_file.examples) == 20
    held = write(tmp_path / "e.jsonl", {"text": "x", "label": "a"}, "[1]")
    seen: list[tuple[int, int]] = []
    split = load_train_eval(data, held, text_label, skip_bad_lines=True,
                            check_eval=lambda tr, ev: seen.append((len(tr.examples), len(ev.examples))))
    assert split.train == [(f"t{i}", "ab"[i % 2]) for i in range(20)] and split.eval == [("x", "a")]
    assert split.skipped == 2 and seen == [(20, 1)]


def test_load_train_eval_checks_the_training_file_before_reading_the_eval_file(tmp_path: Path) -> None:
    data = write(tmp_path / "d.jsonl", {"text": "a", "label": "x"})

    def refuse(loaded: object) -> None:
        raise DataError("one label")

    with pytest.raises(DataError, match="one label"):
        load_train_eval(data, tmp_path / "missing.jsonl", text_label, check_train=refuse)


def test_label_unseen_in_training_is_an_error_naming_its_line(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", {"text": "a", "label": "spam"}, {"text": "b", "label": "ham"})
    held = write(tmp_path / "eval.jsonl", {"text": "c", "label": "ham"}, {"text": "d", "label": "eggs"})
    with pytest.raises(DataError, match=r"eval\.jsonl:2: label 'eggs' does not appear in the training data .*labels: ham, spam"):
        ClassificationTask(tmp_path / "no-model", train, eval_data=held)  # data is checked before the model loads
    one = write(tmp_path / "one.jsonl", {"text": "a", "label": "spam"}, {"text": "b", "label": "spam"})
    with pytest.raises(DataError, match="at least two labels"):
        ClassificationTask(tmp_path / "no-model", one)


def test_model_dir_errors_give_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="huggingface-cli download org/some-model"):
        model_dir("org/some-model")
    with pytest.raises(ModelError, match="no config.json"):
        model_dir(tmp_path)


def test_causal_lm_loss_only_on_completion_tokens(tmp_path: Path, llama: Path) -> None:
    data = write(tmp_path / "d.jsonl", {"prompt": "ab", "completion": "cd"}, {"text": "xy"},
                 {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    task = CausalLMTask(llama, data, eval_fraction=0)
    tok = task.tokenizer
    pc = task.train_examples[0]
    assert tok.convert_ids_to_tokens(pc["input_ids"]) == ["<s>", "a", "b", "c", "d", "</s>"]
    assert pc["labels"] == [IGNORE] * 3 + pc["input_ids"][3:]
    text = task.train_examples[1]
    assert text["labels"] == text["input_ids"] and tok.convert_ids_to_tokens(text["input_ids"]) == ["<s>", "x", "y", "</s>"]
    chat = task.train_examples[2]
    rendered = "<|user|>hi\n<|assistant|>yo\n"  # tiny_models.CHAT_TEMPLATE
    assert "".join(tok.convert_ids_to_tokens(chat["input_ids"][:-1])) == rendered  # one token per character
    n_prompt = len("<|user|>hi\n<|assistant|>")
    assert chat["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert "".join(tok.convert_ids_to_tokens(chat["input_ids"][n_prompt:])) == "yo\n</s>"
    batch = task.collate([pc, text])
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["labels"][1, 4:].tolist() == [IGNORE, IGNORE]


def test_chat_without_a_template_uses_a_plain_layout(tmp_path: Path, llama: Path) -> None:
    task = CausalLMTask(llama, write(tmp_path / "d.jsonl", {"text": "x"}), eval_fraction=0)
    task.tokenizer.chat_template = None
    ex = task._example({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}]})
    tokens = task.tokenizer.convert_ids_to_tokens(ex["input_ids"])
    assert "".join(tokens) == "system: be brief\nuser: hi\nassistant: yo</s>"
    n_prompt = len("system: be brief\nuser: hi\nassistant: ")
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt and ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


def test_causal_lm_bad_lines(tmp_path: Path, llama: Path) -> None:
    bad = write(tmp_path / "d.jsonl", {"prompt": "ab", "completion": "cd"}, {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match=r"d\.jsonl:2: the last message is not from the assistant"):
        CausalLMTask(llama, bad)
    long = write(tmp_path / "l.jsonl", {"prompt": "a" * 20, "completion": "b"})
    with pytest.raises(DataError, match=r"l\.jsonl:1: no tokens to learn from after truncation to --max-length 8"):
        CausalLMTask(llama, long, max_length=8)
    neither = write(tmp_path / "n.jsonl", {"question": "?"})
    with pytest.raises(DataError, match=r"n\.jsonl:1: no 'text', 'prompt'/'completion' or 'messages' field"):
        CausalLMTask(llama, neither)
    task = CausalLMTask(llama, write(tmp_path / "s.jsonl", {"text": "ok"}, {"prompt": "x"}, {"text": ""}), skip_bad_lines=True)
    assert task.skipped == 2 and len(task.train_examples) == 1

