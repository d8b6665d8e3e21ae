"""Regular expressions from configs and adapter files, checked up front and matched in bounded time.

``target_modules`` / ``exclude_modules`` given as a string, and the keys of ``rank_pattern`` /
``alpha_pattern``, are regular expressions that may come from a file someone else wrote.  Python's
``re`` has no time limit, so a pattern such as ``(a|a)+\\d`` can backtrack for minutes on one module
name; matching is therefore done with the ``regex`` package (installed with transformers), which
takes a timeout.  Its compiler expands counted repeats (``(a{1000}){1000}`` would need gigabytes),
so a pattern is first parsed with ``re``'s parser and refused when its expanded size is too large.

Names without regex syntax never need the ``regex`` package: they are compared as strings.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from .errors import ConfigError

#: seconds one match of one module name may take; real patterns take microseconds
MATCH_TIMEOUT = 0.05
#: longest pattern accepted, and the largest expanded size (counted repeats multiplied out)
MAX_PATTERN_CHARS = 2000
MAX_EXPANDED = 20_000
_SYNTAX = re.compile(r"[\\^$.|?*+()\[\]{}]")


def is_plain(pattern: str) -> bool:
    """True when ``pattern`` has no regex syntax (a literal module name)."""
    return _SYNTAX.search(pattern) is None


def _expanded_size(parsed: Any) -> int:
    """Nodes the pattern becomes once counted repeats are written out (what the ``regex`` compiler builds)."""
    from re import _constants as c  # type: ignore[attr-defined]

    total = 0
    for op, av in parsed:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            count = lo if hi == c.MAXREPEAT else max(lo, hi)
            total += max(1, count) * _expanded_size(sub)
        elif op == c.SUBPATTERN:
            total += _expanded_size(av[-1])
        elif op == c.BRANCH:
            total += sum(_expanded_size(p) for p in av[1])
        elif op in (c.ASSERT, c.ASSERT_NOT):
            total += _expanded_size(av[1])
        elif op == getattr(c, "ATOMIC_GROUP", None):
            total += _expanded_size(av)
        elif op == c.GROUPREF_EXISTS:
            total += sum(_expanded_size(p) for p in av[1:] if p is not None)
        else:
            total += 1
        if total > MAX_EXPANDED:
            break
    return total


def check_pattern(what: str, pattern: Any, *, suffix: bool = False) -> str:
    """Validate a regex from a config: a non-empty string that compiles (as it will be used:
    wrapped as a dotted-suffix match when ``suffix``) and is small enough to compile safely.

    Raises:
        ConfigError: naming ``what`` and the problem (syntax, a global flag not at the start, size).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{what} must be a non-empty string, got {short(pattern)}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{what} is a {len(pattern)}-character regular expression; at most {MAX_PATTERN_CHARS} are accepted")
    if is_plain(pattern):
        return pattern
    used = _wrap(pattern) if suffix else pattern
    try:
        from re import _parser  # type: ignore[attr-defined]

        size = _expanded_size(_parser.parse(used))
        re.compile(used)
    except (re.error, OverflowError, RecursionError, ValueError) as err:
        hint = " (inline flags such as (?i) must stand at the very start, or be scoped: (?i:...))" if "global flags" in str(err) else ""
        raise ConfigError(f"{what} {short(pattern)} is not a valid regular expression: {err}{hint}") from None
    if size > MAX_EXPANDED:
        raise ConfigError(
            f"{what} {short(pattern)} expands to over {MAX_EXPANDED} nodes (counted repeats multiplied out); "
            "write a simpler pattern or list the module names"
        )
    return pattern


def _wrap(pattern: str) -> str:
    """PEFT's rule for rank_pattern / alpha_pattern keys: the name, or a dotted suffix, as a regex."""
    return rf"(?:.*\.)?(?:{pattern})"


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> Any:
    try:
        import regex
    except ImportError:
        raise ConfigError(
            f"matching the regular expression {short(pattern)} needs the `regex` package (it bounds the matching "
            "time); pip install regex, or give module names as a list"
        ) from None
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError, ValueError) as err:
        raise ConfigError(f"regular expression {short(pattern)} is not valid: {err}") from None


def fullmatch(pattern: str, name: str, *, what: str = "target_modules") -> bool:
    """Whether regex ``pattern`` matches all of ``name``, within :data:`MATCH_TIMEOUT` seconds.

    Raises:
        ConfigError: the match took too long (a pattern that backtracks catastrophically).
    """
    try:
        return _compiled(pattern).fullmatch(name, timeout=MATCH_TIMEOUT) is not None
    except TimeoutError:
        raise ConfigError(
            f"{what} {short(pattern)} took over {MATCH_TIMEOUT:g} s to match module {name!r} (catastrophic "
            "backtracking, e.g. nested repeats like (a+)+); simplify it or list the module names"
        ) from None


def suffix_matches(pattern: str, name: str, *, what: str = "rank_pattern key") -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: ``pattern`` equals ``name`` or matches, as a regex, the
    whole name or a dotted suffix of it."""
    if name == pattern:
        return True
    if is_plain(pattern):
        return name.endswith("." + pattern)
    return fullmatch(_wrap(pattern), name, what=what)


def short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to ``limit`` characters, for one-line messages about untrusted values."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
