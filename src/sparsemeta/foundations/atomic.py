"""Atomic file writes (temporary file in the same directory, fsync, rename, fsync the directory).

A crash at any moment — or another process reading a shared cache — sees either the old file or
the complete new one, never a torn one; after :func:`atomic_write` returns, the new file also
survives a power loss (the directory entry is flushed too). Kept free of torch so data loaders
can use it.

* Files get the mode an ordinary ``open()`` would give them (``0o666 & ~umask``), not the
  0600 of ``tempfile.mkstemp``, so a cache shared by a group stays readable to it. The mode
  comes from creating the temporary file with ``os.open(..., 0o666)``: the kernel applies the
  umask (and any default ACL of the directory), so the umask is never read or changed.
* A temporary file is named ``.NAME.<pid>.<8 hex>.tmp`` (see :func:`temp_path`); a writer
  killed before its rename leaves one behind, and :func:`remove_stale_temps` deletes those whose
  pid is no longer alive.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: ``.NAME.<pid>.<8 hex>.tmp``, optionally followed by ``.EXT`` (a writer's side file)
_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside ``path`` that embeds this process's pid."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def create_temp(path: str | Path) -> tuple[int, Path]:
    """Create a new :func:`temp_path` beside ``path`` with mode ``0o666 & ~umask``; return an
    open write descriptor and its path."""
    tmp = temp_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(tmp, flags, 0o666), tmp


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where that is unsupported."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # Windows cannot open a directory; nothing to do there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (EINVAL) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory: for files written elsewhere
    (e.g. through a memory map) under a :func:`temp_path` name."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through a temporary file beside it; an OS error names ``path`` (what the
    user asked for), never the temporary name."""
    path = Path(path)
    try:
        fd, tmp = create_temp(path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (str(tmp), tmp):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host, in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:  # e.g. Windows: cannot tell, so keep the file
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.<pid>.<hex>.tmp[.EXT]``) in ``directory`` whose writer
    is dead; return the paths removed. Files of live writers, and every other file, are kept.

    A pid is only meaningful on the host and pid namespace that wrote it: do not share one
    directory between machines (or containers) that write to it at the same time.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed
