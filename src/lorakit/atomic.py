"""Atomic writes: a directory (or file) at ``target`` is replaced whole or not at all.

:func:`write_dir` is the one writer of lorakit's output directories (adapters, training checkpoints):
the files are written into a temporary directory beside ``target`` (same file system, so the swap is
a rename), given the permissions a plain ``open`` / ``mkdir`` would (umask), fsynced file by file and
directory by directory, and then swapped in with :func:`replace_dir`.  A crash at any point leaves the
old directory or the new one at ``target``, never a half-written one; the leftover temporary directory
holds either the partial new contents or the old ones and is the caller's to clean up by name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_RENAME_EXCHANGE = 2


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
    fsync(path.parent)
    return path


def fsync(path: str | os.PathLike) -> None:
    """Flush a file or directory to disk (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file, then every directory bottom-up, so a rename publishes durable data."""
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fsync(os.path.join(dirpath, name))
        fsync(dirpath)


def replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target`` atomically; the old ``target`` ends up at ``new``.

    Uses renameat2(RENAME_EXCHANGE) where the OS has it; elsewhere two renames (a crash between
    them leaves the old directory at ``new``'s name, never a half-written one at ``target``).
    """
    if not target.exists():
        os.rename(new, target)
    else:
        libc_name = ctypes.util.find_library("c")
        renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
        at_fdcwd = -100
        if renameat2 is None or renameat2(at_fdcwd, bytes(new), at_fdcwd, bytes(target), _RENAME_EXCHANGE) != 0:
            old = new.with_name(new.name + ".old")
            os.rename(target, old)
            os.rename(new, target)
            os.rename(old, new)
    fsync(target.parent)


def write_dir(
    target: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    tmp: Path | None = None,
    before_swap: Callable[[], None] | None = None,
) -> Path:
    """Write directory ``target`` atomically: ``fill(tmp)`` writes the contents into a temporary directory
    beside ``target``, which is then made durable and swapped in whole; the old ``target`` is deleted.

    Args:
        fill: writes the files (and subdirectories) into the directory it is given.
        tmp: the temporary directory's path (in ``target``'s parent; removed first if it exists), for
            callers that clean up a crash's leftovers by name; default ``.<target name>.tmp-<random>``.
        before_swap: called when everything is written and fsynced, just before the swap.

    If ``fill`` (or ``before_swap``) raises, the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        fill(tmp)
        for dirpath, _dirnames, filenames in os.walk(tmp):  # mkdtemp and safetensors make them owner-only
            as_created(dirpath, directory=True)
            for filename in filenames:
                as_created(os.path.join(dirpath, filename))
        fsync_tree(tmp)
        if before_swap is not None:
            before_swap()
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after the swap: the old directory
    return target


__all__ = ["as_created", "fsync", "fsync_tree", "replace_dir", "write_atomic", "write_dir"]
