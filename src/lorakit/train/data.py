"""JSONL training data: read, validate, and say exactly which line is wrong and how to fix it.

Every task reads its examples through :func:`read_jsonl`.  A task passes a ``validate`` function
that turns one parsed JSON object into an example (or raises :class:`BadLine` with the reason and
the fix); this module adds the ``file:line`` and either stops at the first bad line or, with
``skip_bad_lines``, skips it and counts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LorakitError

T = TypeVar("T")


class DataError(LorakitError, ValueError):
    """A data file is missing, empty or has a line that is not a valid example."""


class BadLine(ValueError):
    """Raised by a task's validate function: ``reason`` says what is wrong, ``fix`` what to do."""

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


@dataclasses.dataclass
class Loaded:
    """The examples of one file, where each came from, and how many lines were skipped."""

    path: Path
    examples: list[Any]
    #: 1-based line number of each example in ``path``
    lines: list[int]
    skipped: int = 0


def read_jsonl(
    path: str | os.PathLike[str],
    validate: Callable[[dict[str, Any]], T],
    *,
    skip_bad_lines: bool = False,
    example_hint: str = "",
) -> Loaded:
    """Read a JSON-lines file, one example per non-blank line.

    Args:
        path: the .jsonl file.
        validate: turns one JSON object into an example; raises :class:`BadLine` if it cannot.
        skip_bad_lines: skip (and count) bad lines instead of stopping at the first one.
        example_hint: a valid line, shown in error messages (e.g. ``{"text": "...", "label": "spam"}``).

    Raises:
        DataError: missing file, no examples, or (without ``skip_bad_lines``) a bad line, naming
            ``file:line``, what is wrong and the fix.
    """
    path = Path(path)
    hint = f"; each line should look like {example_hint}" if example_hint else ""
    if not path.is_file():
        raise DataError(f"{path}: no such data file; pass --data FILE.jsonl with one JSON object per line{hint}")
    examples: list[Any] = []
    lines: list[int] = []
    skipped = 0
    with open(path, "rb") as f:  # bytes, so an encoding error names its line like any other
        for lineno, raw_bytes in enumerate(f, start=1):
            if lineno == 1 and raw_bytes.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows editors)
                raw_bytes = raw_bytes[3:]
            if not raw_bytes.strip():
                continue
            try:
                try:
                    raw = raw_bytes.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise BadLine(f"not UTF-8 text (byte {err.start + 1} of the line)", "save the file as UTF-8") from None
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise BadLine(f"expected a JSON object, got {type(obj).__name__}", f"write one object per line{hint}")
                examples.append(validate(obj))
                lines.append(lineno)
            except (json.JSONDecodeError, BadLine) as err:
                if skip_bad_lines:
                    skipped += 1
                    continue
                if isinstance(err, json.JSONDecodeError):
                    reason, fix = f"not valid JSON ({err.msg} at column {err.colno})", f"fix the line{hint}"
                else:
                    reason, fix = err.reason, err.fix
                raise DataError(
                    f"{path}:{lineno}: {reason}; {fix or 'fix or remove the line'}"
                    " (or pass --skip-bad-lines to skip bad lines)"
                ) from None
    if not examples:
        what = f"all {skipped} non-blank lines were bad" if skipped else "it has no examples"
        raise DataError(f"{path}: {what}; the file needs at least one JSON object per line{hint}")
    return Loaded(path, examples, lines, skipped)


def require(obj: dict[str, Any], field: str, kind: type | tuple[type, ...] = str, *, fix: str = "") -> Any:
    """``obj[field]``, checked to be present, of ``kind`` and (for strings) non-empty."""
    if field not in obj:
        present = ", ".join(sorted(obj)) or "none"
        raise BadLine(f"missing field {field!r} (fields present: {present})", fix or f"add a {field!r} field")
    value = obj[field]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadLine(f"field {field!r} should be a {names}, got {type(value).__name__}", fix or f"make {field!r} a {names}")
    if isinstance(value, str) and not value.strip():
        raise BadLine(f"field {field!r} is empty", fix or f"give {field!r} some text")
    return value


def file_fingerprint(*paths: str | os.PathLike[str] | None) -> str:
    """sha256 (first 16 hex digits) of the files' bytes, in order; identifies a data set across runs."""
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            h.update(b"<none>")
            continue
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def split_holdout(n: int, fraction: float, seed: int, *, groups: Sequence[Any] | None = None) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index lists; ``fraction`` of ``n`` (at least 1 if n ≥ 2) held out.

    With ``groups`` (e.g. class labels) every group keeps at least one example in training, so
    the held-out set never asks about a label the model was never trained on.
    """
    if n < 2 or fraction <= 0:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    want = min(n - 1, max(1, round(n * fraction)))
    held: list[int] = []
    seen: set[Any] = set()
    # first pass keeps one example of every group for training; the rest may be held out
    for i in order:
        g = groups[i] if groups is not None else None
        if groups is not None and g not in seen:
            seen.add(g)
            continue
        if len(held) < want:
            held.append(i)
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


@dataclasses.dataclass
class TrainEval:
    """A task's training and held-out examples, and the files they came from."""

    train: list[Any]
    eval: list[Any]
    #: the --data file as read (all its examples, before any holdout split)
    train_file: Loaded
    #: the --eval-data file as read, or None when the held-out examples were split from --data
    eval_file: Loaded | None
    #: bad lines skipped over both files (--skip-bad-lines)
    skipped: int


def load_train_eval(
    data: str | os.PathLike[str],
    eval_data: str | os.PathLike[str] | None,
    validate: Callable[[dict[str, Any]], T],
    *,
    example_hint: str = "",
    skip_bad_lines: bool = False,
    seed: int = 0,
    eval_fraction: float = 0.1,
    check_train: Callable[[Loaded], None] | None = None,
    check_eval: Callable[[Loaded, Loaded], None] | None = None,
    group: Callable[[Any], Any] | None = None,
) -> TrainEval:
    """Read ``data`` (and ``eval_data`` when given) with :func:`read_jsonl`; without ``eval_data``,
    hold out ``eval_fraction`` of ``data`` with :func:`split_holdout` seeded by ``seed``.

    Args:
        check_train: called with the training file as read, before ``eval_data`` is read (raise to refuse it).
        check_eval: called with (training file, held-out file) after ``eval_data`` is read.
        group: an example's group for the holdout split (e.g. its label), so that every group keeps
            an example in training.

    Raises:
        DataError: as :func:`read_jsonl`, or whatever the checks raise.
    """
    loaded = read_jsonl(data, validate, skip_bad_lines=skip_bad_lines, example_hint=example_hint)
    if check_train is not None:
        check_train(loaded)
    if eval_data is not None:
        held = read_jsonl(eval_data, validate, skip_bad_lines=skip_bad_lines, example_hint=example_hint)
        if check_eval is not None:
            check_eval(loaded, held)
        return TrainEval(list(loaded.examples), list(held.examples), loaded, held, loaded.skipped + held.skipped)
    groups = [group(e) for e in loaded.examples] if group is not None else None
    train, ev = split_holdout(len(loaded.examples), eval_fraction, seed, groups=groups)
    return TrainEval([loaded.examples[i] for i in train], [loaded.examples[i] for i in ev], loaded, None, loaded.skipped)
