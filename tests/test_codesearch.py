"""The code-search pairs: well formed, split by module, deterministic, and from a user's project."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.train import codesearch as cs

ARG = r"(\*{0,2}\w+|\*)"
CODE_TEXT = re.compile(rf"^[A-Za-z_][\w.]*\(({ARG}(, {ARG})*)?\)$")


@pytest.fixture(scope="module")
def stdlib_split() -> cs.CodeSearchSplit:
    return cs.build_code_search_pairs(eval_pairs=None)


def test_stdlib_pairs_are_well_formed(stdlib_split: cs.CodeSearchSplit) -> None:
    pairs = stdlib_split.train + stdlib_split.eval
    assert len(stdlib_split.train) > 2000 and len(stdlib_split.eval) > 300
    for p in pairs:
        assert p.query == p.query.strip() and "\n" not in p.query
        assert len(p.query) <= cs.SUMMARY_MAX_CHARS and len(p.query.split()) >= cs.SUMMARY_MIN_WORDS
        assert p.query[0].isalpha()
        assert CODE_TEXT.match(p.code), p.code
        assert len(p.code) <= cs.CODE_MAX_CHARS
        assert p.code.startswith(p.module + ".")
        top = p.module.split(".")[0]
        assert top not in {"test", "idlelib", "lib2to3", "turtledemo"} and not top.startswith("_")
    assert len({p.query.lower() for p in pairs}) == len(pairs), "duplicate queries"
    assert len({p.code for p in pairs}) == len(pairs), "duplicate code texts"
    codes = {p.code: p.query for p in pairs}
    assert codes["json.dumps(obj, *, skipkeys, ensure_ascii, check_circular, allow_nan, cls, indent, separators, default, sort_keys, **kw)"] == "Serialize ``obj`` to a JSON formatted ``str``."
    # a method: self dropped; a class: its __init__ signature without self
    assert "fractions.Fraction.from_float(f)" in codes
    assert any(c.startswith("queue.Queue(maxsize") for c in codes)


def test_split_is_by_module_with_no_overlap(stdlib_split: cs.CodeSearchSplit) -> None:
    train_groups = {p.group for p in stdlib_split.train}
    eval_groups = {p.group for p in stdlib_split.eval}
    assert train_groups and eval_groups and not train_groups & eval_groups
    # the standard library is split by top-level package: email.* all on one side
    assert all(p.group == p.module.split(".")[0] for p in stdlib_split.train + stdlib_split.eval)
    assert not {p.module for p in stdlib_split.train} & {p.module for p in stdlib_split.eval}
    n = len(stdlib_split.train) + len(stdlib_split.eval)
    assert 0.14 <= len(stdlib_split.eval) / n <= 0.3


def test_eval_cap_keeps_only_held_out_pairs(stdlib_split: cs.CodeSearchSplit) -> None:
    train, capped = cs.split_pairs(stdlib_split.train + stdlib_split.eval, eval_pairs=100)
    assert len(capped) == 100
    assert set(capped) <= set(stdlib_split.eval)
    assert train == stdlib_split.train  # capping never moves pairs into training


def test_deterministic(stdlib_split: cs.CodeSearchSplit) -> None:
    again = cs.build_code_search_pairs(eval_pairs=None)
    assert again.train == stdlib_split.train and again.eval == stdlib_split.eval
    assert again.fingerprint() == stdlib_split.fingerprint()


@pytest.mark.parametrize(
    ("doc", "summary"),
    [
        ("Return the sum of a and b.  Extra text.", "Return the sum of a and b."),
        ("Read data,\n    possibly in chunks, from the file.\n\nDetails.", "Read data, possibly in chunks, from the file."),
        ("Parse a value, e.g. a number. Then more.", "Parse a value, e.g. a number."),
        ("f(a, b) -> int\n\nNope", None),
        ("f(a, b) -> int\nCompute the thing from a and b.", "Compute the thing from a and b."),
        ("Too short.", None),
        ("", None),
        (None, None),
        ("   >>> doctest first line", None),
        ("TODO: write this docstring later", None),
        ("word " * 100, ("word " * 100)[: cs.SUMMARY_MAX_CHARS].rsplit(" ", 1)[0]),
    ],
)
def test_summarize_docstring(doc: str | None, summary: str | None) -> None:
    assert cs.summarize_docstring(doc) == summary


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _project(root: Path) -> None:
    for i in range(12):
        _write(
            root,
            f"proj/mod{i:02d}.py",
            f'''
            def load_table_{i}(path, *, sep=",", **options):
                """Load table number {i} from a CSV file.

                Long description.
                """

            def _private_{i}(x):
                """Never paired because the name is private."""

            class Store{i}:
                """Keeps the records of shard {i} in memory."""

                def __init__(self, capacity, policy=None):
                    pass

                def get_record(self, key):
                    """Return the record stored under key {i}."""

                @staticmethod
                def merge_many(*stores):
                    """Merge several stores of shard {i} into one."""

                def undocumented(self):
                    pass
            ''',
        )
    _write(root, "proj/__init__.py", '"""The package."""\n')
    _write(root, "proj/broken.py", "def f(:\n    pass\n")
    _write(root, "proj/tests/test_mod.py", 'def test_it():\n    """Check that the loader works fine."""\n')
    _write(root, ".venv/lib/site.py", 'def hidden():\n    """Something in a virtual env."""\n')
    _write(root, "build/lib/proj/mod00.py", 'def built():\n    """A copy in build output."""\n')
    _write(root, "proj/zz_dup.py", 'def again(path):\n    """Load table number 3 from a CSV file."""\n')


def test_source_project(tmp_path: Path) -> None:
    _project(tmp_path)
    pairs = cs.extract_pairs(tmp_path)
    codes = [p.code for p in pairs]
    assert codes[:4] == [
        "proj.mod00.load_table_0(path, *, sep, **options)",
        "proj.mod00.Store0(capacity, policy)",
        "proj.mod00.Store0.get_record(key)",
        "proj.mod00.Store0.merge_many(*stores)",
    ]
    assert [p.query for p in pairs[:4]] == [
        "Load table number 0 from a CSV file.",
        "Keeps the records of shard 0 in memory.",
        "Return the record stored under key 0.",
        "Merge several stores of shard 0 into one.",
    ]
    assert len(pairs) == 48  # 12 modules × 4; private, undocumented, tests, .venv, build, broken, duplicate: none
    # one package: the split unit falls back to its modules
    assert {p.group for p in pairs} == {f"proj.mod{i:02d}" for i in range(12)}
    split = cs.build_code_search_pairs(tmp_path)
    assert split.train and split.eval
    assert not {p.module for p in split.train} & {p.module for p in split.eval}
    assert len(split.train) + len(split.eval) == 48
    assert cs.build_code_search_pairs(tmp_path) == split


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="not a directory"):
        cs.build_code_search_pairs(tmp_path / "missing")
    _write(tmp_path, "one.py", 'def a():\n    """Do the one thing we need."""\n')
    with pytest.raises(cs.CodeSearchDataError, match="only 1 documented"):
        cs.build_code_search_pairs(tmp_path)


def test_defaults_are_exported() -> None:
    d = cs.CODE_SEARCH_DEFAULTS.as_dict()
    assert {"max_steps", "batch_size", "lr", "r", "alpha", "targets", "max_length"} <= set(d)
    assert d["targets"] == () and d["top_layers"] == pytest.approx(2 / 3)  # the task picks layers from the model

