"""JSON files lorakit writes: strict JSON (no NaN / Infinity), written atomically, readable per umask.

Python's ``json`` writes ``NaN`` and ``Infinity`` for non-finite floats, which jq, JavaScript and most
dashboards reject.  A skipped NaN step's loss is written as ``null`` instead, and
:func:`nan_for_null` turns it back into ``nan`` when lorakit reads its own files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (non-finite floats become null); kwargs as for ``json.dumps``."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def nan_for_null(records: Iterable[dict[str, Any]]) -> None:
    """In place: the null values of metric records (as :func:`dumps` wrote NaN / inf) become ``nan``."""
    for record in records:
        for key, value in record.items():
            if value is None:
                record[key] = math.nan


def umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask is a write)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def as_created(path: str | os.PathLike[str], directory: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would: 0666 / 0777 less the umask.

    ``tempfile`` makes owner-only files and directories; a result moved into place from one must not
    stay unreadable to the group / other users a normal write would let read it (a server user).
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, fsynced and renamed into place:
    a crash leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
