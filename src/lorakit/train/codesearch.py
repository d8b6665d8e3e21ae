"""Code-search pairs built from Python sources: docstring summary → qualified name and signature.

The built-in demo of ``lorakit train`` adapts a sentence-embedding model to code search over
Python's own standard library: the query is the first sentence of a function's (or class's)
docstring, the document is the code-side text ``module.Class.method(arg, *args, key, **kw)``.
Sources are parsed with :mod:`ast`, never imported, so any project can be read safely
(``--source DIR``).

Evaluation is on *unseen modules*: pairs are split by a module group (for the standard library the
top-level package, e.g. all of ``email.*``), chosen by a fixed hash of the group's name, so the
held-out set does not depend on the training seed and no held-out module is ever trained on.

Everything here is deterministic: files are read in sorted order, definitions in source order, and
duplicates are resolved by keeping the first occurrence.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import LorakitError
from ..integrations.local_models import QuantizedLoad
from .embedding import EmbeddingPair, EmbeddingTask, default_model_dir, task_encoder
from .task import TaskDefaults


class CodeSearchDataError(LorakitError):
    """The code-search pairs could not be built (no source directory, no documented functions...)."""


@dataclasses.dataclass(frozen=True)
class CodeSearchDefaults:
    """The tuned settings of the default ``lorakit train`` run (the CLI reads them from here).

    Measured on 2 CPU cores (benchmarks/default_run.py, results in benchmarks/RESULTS.md): the
    whole run must fit in 5 minutes and raise held-out recall@1 by ≥ 5 points.

    Why the top two thirds of the layers only (layers 2-5 of all-MiniLM-L6-v2's 6): backpropagation
    stops at the lowest adapted layer, so layers 0-1 run forward only — a step costs about 30% less
    than adapting all 6, and in 60-step runs it learned as much (held-out recall@1 +8.9 points vs
    +6.9 with all layers).
    """

    #: optimizer steps; recall@1 levels off near 100 steps (one pass is 58 steps of 64)
    max_steps: int = 80
    #: pairs per step; every other pair in the batch is a negative of the in-batch contrastive loss
    batch_size: int = 64
    #: AdamW learning rate of the LoRA factors (linear warm-up then linear decay)
    lr: float = 2e-3
    warmup_steps: int = 10
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    #: empty: the task chooses from the model — the attention and MLP linears of the top
    #: ``top_layers`` share of its layers (see lorakit.train.embedding.encoder_targets); never
    #: pooler.dense, which mean pooling does not use.  Names or a regex here override that.
    targets: tuple[str, ...] = ()
    #: share of the encoder's layers (the top ones) that LoRA adapts when ``targets`` is empty
    top_layers: float = 2 / 3
    #: tokens per text; covers ≥ 99% of the pairs (summaries are one sentence, signatures short)
    max_length: int = 48
    #: InfoNCE temperature τ (sentence-transformers' MultipleNegativesRankingLoss uses 1/20)
    temperature: float = 0.05
    #: held-out pairs scored before and after training (queries vs all held-out code texts)
    eval_pairs: int = 1000
    seed: int = 0

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def task_defaults(self) -> TaskDefaults:
        """These settings as ``lorakit train --task code-search``'s defaults (one pass, linear decay)."""
        return TaskDefaults(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=tuple(self.targets), lr=self.lr,
                            batch_size=self.batch_size, max_length=self.max_length, max_steps=self.max_steps, epochs=1,
                            warmup=float(self.warmup_steps), schedule="linear", seed=self.seed)


CODE_SEARCH_DEFAULTS = CodeSearchDefaults()

#: directories of the standard library that are not library code (tests, IDLE, tools, bundled
#: wheels, installed packages) or whose docstrings would make the task trivially repetitive
STDLIB_SKIP = frozenset(
    {
        "test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
        "turtledemo", "ensurepip", "pydoc_data", "lib-dynload", "__pycache__", "encodings",
        "__phello__",
    }
)  # fmt: skip
#: directories never read in a user's project (environments, build output, VCS metadata)
SOURCE_SKIP = frozenset(
    {
        "test", "tests", "site-packages", "dist-packages", "node_modules", "build", "dist",
        "__pycache__", "venv", "env",
    }
)  # fmt: skip

SUMMARY_MAX_CHARS = 200
SUMMARY_MIN_WORDS = 3
CODE_MAX_CHARS = 160


@dataclasses.dataclass(frozen=True)
class CodePair:
    """One training or evaluation pair."""

    query: str  #: the docstring's first sentence
    code: str  #: ``module.qualname(args)``
    module: str  #: dotted module name the definition lives in
    group: str  #: the split unit (a top-level package for the standard library)


@dataclasses.dataclass(frozen=True)
class CodeSearchSplit:
    train: list[CodePair]
    eval: list[CodePair]
    #: where the pairs came from, for messages and the task fingerprint
    source: str

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for part, pairs in (("train", self.train), ("eval", self.eval)):
            h.update(part.encode())
            for p in pairs:
                h.update(f"{p.query}\x00{p.code}\x00".encode())
        return h.hexdigest()[:16]


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


# -- docstrings -------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)([.!?])(\s|$)")
_SIGNATURE_LIKE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")


def summarize_docstring(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line, or None if unusable.

    Unusable: empty, fewer than ``SUMMARY_MIN_WORDS`` words, not starting with a letter, or a
    bare signature line (``f(a, b) -> c``, common in C-accelerated modules' Python twins).
    Long sentences are cut at a word boundary to ``SUMMARY_MAX_CHARS``.
    """
    if not doc:
        return None
    paragraph = doc.strip().split("\n\n", 1)[0]
    lines = [line.strip() for line in paragraph.splitlines()]
    if lines and _SIGNATURE_LIKE.match(lines[0]):  # "name(args) -> x" then the real text
        lines = lines[1:]
    text = " ".join(line for line in lines if line)
    match = _SENTENCE_END.search(text)
    if match:
        text = text[: match.start(1) + 1]
    text = " ".join(text.split())
    if len(text) > SUMMARY_MAX_CHARS:
        text = text[:SUMMARY_MAX_CHARS].rsplit(" ", 1)[0]
    if not text or not text[0].isalpha() or len(text.split()) < SUMMARY_MIN_WORDS:
        return None
    if text.lower().startswith(("todo", "xxx", "deprecated", "internal", "helper for", "override")):
        return None
    return text


def _arguments(args: ast.arguments, *, drop_first: bool) -> str:
    """Argument names as written in the def: ``a, b, *args, key, **kw`` (no defaults or types)."""
    positional = [a.arg for a in args.posonlyargs + args.args]
    if drop_first and positional:
        positional = positional[1:]  # self / cls
    names = positional
    if args.vararg:
        names.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return ", ".join(names)


def _is_static(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)


def _definitions(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(docstring, code text) for public top-level functions, classes and their public methods."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield ast.get_docstring(node) or "", f"{module}.{node.name}({_arguments(node.args, drop_first=False)})"
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            init = next(
                (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None
            )
            signature = _arguments(init.args, drop_first=True) if init else ""
            yield ast.get_docstring(node) or "", f"{module}.{node.name}({signature})"
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    args = _arguments(item.args, drop_first=not _is_static(item))
                    yield ast.get_docstring(item) or "", f"{module}.{node.name}.{item.name}({args})"


# -- files ------------------------------------------------------------------------------------


def _python_files(root: Path, skip: frozenset[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of skipped trees; sorting makes the walk deterministic.
        dirnames[:] = sorted(
            d for d in dirnames if d not in skip and not d.startswith(".") and d.isidentifier()
        )
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _module_name(path: Path, root: Path) -> str | None:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or any(not p.isidentifier() or p.startswith("_") for p in parts):
        return None  # private modules (_pydecimal, _pyio, ...) mirror public ones
    return ".".join(parts)


def extract_pairs(root: str | os.PathLike[str], *, skip: frozenset[str] = SOURCE_SKIP) -> list[CodePair]:
    """All well-formed pairs under ``root``, deduplicated, in a deterministic order.

    A pair is kept when its summary is usable (see :func:`summarize_docstring`) and its code text
    is at most ``CODE_MAX_CHARS`` long.  A summary or code text seen before is dropped (the first
    occurrence wins), so every query has exactly one right answer.  Files that do not parse
    (Python 2 leftovers, templates) are skipped.
    """
    root = Path(root)
    pairs: list[CodePair] = []
    seen_queries: set[str] = set()
    seen_codes: set[str] = set()
    for path in _python_files(root, skip):
        module = _module_name(path, root)
        if module is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old sources
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for doc, code in _definitions(tree, module):
            query = summarize_docstring(doc)
            if query is None or len(code) > CODE_MAX_CHARS:
                continue
            key = query.lower()
            if key in seen_queries or code in seen_codes:
                continue
            seen_queries.add(key)
            seen_codes.add(code)
            pairs.append(CodePair(query, code, module, module))
    return _assign_groups(pairs)


def _assign_groups(pairs: list[CodePair], min_groups: int = 10) -> list[CodePair]:
    """Group modules by the coarsest package level that still yields ``min_groups`` groups.

    For the standard library that is the top-level package (all of ``email.*`` together), so
    held-out modules share no package with training ones; for a single-package project it is
    the package's modules (``mypkg.io``, ``mypkg.models``...).
    """
    depth_max = max((p.module.count(".") + 1 for p in pairs), default=1)
    for depth in range(1, depth_max + 1):
        groups = {".".join(p.module.split(".")[:depth]) for p in pairs}
        if len(groups) >= min_groups or depth == depth_max:
            break
    return [dataclasses.replace(p, group=".".join(p.module.split(".")[:depth])) for p in pairs]


def _group_rank(group: str) -> str:
    # A fixed hash, not Python's salted hash(): the same groups are held out on every run.
    return hashlib.sha256(f"lorakit-codesearch:{group}".encode()).hexdigest()


def split_pairs(pairs: list[CodePair], eval_fraction: float = 0.15, eval_pairs: int | None = None) -> tuple[list[CodePair], list[CodePair]]:
    """Split by group: groups in a fixed hash order go to evaluation until it holds
    ``eval_fraction`` of the pairs; the rest train.  ``eval_pairs`` caps the held-out set (the
    first pairs of the held-out groups in source order are kept; the others are dropped, never
    trained on)."""
    by_group: dict[str, list[CodePair]] = {}
    for p in pairs:
        by_group.setdefault(p.group, []).append(p)
    target = eval_fraction * len(pairs)
    held: set[str] = set()
    count = 0
    for group in sorted(by_group, key=_group_rank):
        if count >= target or len(held) >= len(by_group) - 1:
            break
        held.add(group)
        count += len(by_group[group])
    train = [p for p in pairs if p.group not in held]
    evaluation = [p for p in pairs if p.group in held]
    if eval_pairs is not None and len(evaluation) > eval_pairs:
        # Spread the cap over the held-out groups: an evenly strided subset in source order.
        step = len(evaluation) / eval_pairs
        evaluation = [evaluation[int(i * step)] for i in range(eval_pairs)]
    return train, evaluation


def build_code_search_pairs(
    source: str | os.PathLike[str] | None = None,
    *,
    eval_fraction: float = 0.15,
    eval_pairs: int | None = CODE_SEARCH_DEFAULTS.eval_pairs,
) -> CodeSearchSplit:
    """Pairs from the standard library (``source=None``) or a project directory, split by module.

    Raises CodeSearchDataError when the directory is missing or yields too few pairs to split.
    """
    if source is None:
        root, skip, name = stdlib_dir(), STDLIB_SKIP, "the Python standard library"
    else:
        root, skip, name = Path(source), SOURCE_SKIP, str(source)
        if not root.is_dir():
            raise CodeSearchDataError(f"--source {source}: not a directory; give the root of a Python project")
    pairs = extract_pairs(root, skip=skip)
    if len(pairs) < 20:
        raise CodeSearchDataError(
            f"{name}: only {len(pairs)} documented public functions/classes found (need ≥ 20 for a train/held-out "
            "split); point --source at a larger project, or give your own pairs with --task embedding --data FILE.jsonl"
        )
    train, evaluation = split_pairs(pairs, eval_fraction, eval_pairs)
    if not train or not evaluation:
        raise CodeSearchDataError(
            f"{name}: all pairs come from one module, so no module can be held out; use a project with several modules"
        )
    return CodeSearchSplit(train, evaluation, str(root))


def build_code_search_task(
    source: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
    seed: int = 0,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    temperature: float | None = None,
    eval_pairs: int | None = None,
    quantize: QuantizedLoad | None = None,
) -> EmbeddingTask:
    """The built-in demo: code search over the standard library (or ``source``), split by module.

    Defaults come from :data:`CODE_SEARCH_DEFAULTS`.  The split does
    not depend on ``seed`` (the held-out modules are fixed by a hash of their names).  ``quantize``:
    see :func:`~lorakit.train.embedding.task_encoder`.
    """
    D = CODE_SEARCH_DEFAULTS
    split = build_code_search_pairs(source, eval_pairs=D.eval_pairs if eval_pairs is None else eval_pairs)
    model, tokenizer, note = task_encoder(model_dir if model_dir is not None else default_model_dir(), quantize)
    return EmbeddingTask(
        model,
        tokenizer,
        [EmbeddingPair(p.query, p.code) for p in split.train],
        [EmbeddingPair(p.query, p.code) for p in split.eval],
        max_length=D.max_length if max_length is None else max_length,
        temperature=D.temperature if temperature is None else temperature,
        name="code-search",
        top_layers=D.top_layers,
        data_id=split.fingerprint(),
        source=split.source,
        load_note=note,
    )
