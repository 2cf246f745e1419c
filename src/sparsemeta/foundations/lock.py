"""An exclusive lock on a path shared between processes (``fcntl.flock`` on a lock file).

    with exclusive(run_dir / ".lock", what=f"run directory '{run_dir}'", wait=False):
        ...  # no other process holds this lock until the block ends

The holder writes its pid into the lock file, only so that the others can say who they wait
for. The kernel drops a ``flock`` when its holder dies, however it dies, so a lock left by a dead
process is simply taken over; the lock file itself is never deleted (deleting it would let two
processes lock two different files of the same name). ``flock`` locks an open file, so the same
process taking the same lock twice would wait for itself: that is refused with a RuntimeError.
On a platform without ``fcntl`` (Windows) the block runs without a lock.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from sparsemeta.foundations.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_held: set[str] = set()
_held_guard = threading.Lock()


def holder(path: str | Path) -> int | None:
    """The pid written in lock file ``path`` (None when empty, absent or unreadable)."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _who(pid: int | None) -> str:
    return f"process {pid}" if pid is not None else "another process"


@contextlib.contextmanager
def exclusive(path: str | Path, what: str, wait: bool, log: TextIO | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing; its directory must exist).

    When another process holds it: with ``wait=False`` raise a one-line UserError "WHAT is in
    use by process PID; ..."; with ``wait=True`` print one line to ``log`` (stderr) and block
    until it is released.
    """
    path = Path(path)
    key = os.path.abspath(path)
    with _held_guard:
        if key in _held:
            raise RuntimeError(f"this process already holds the lock '{path}'")
        _held.add(key)
    try:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"cannot create lock file '{path}' for {what} ({exc.strerror or exc}); "
                            f"check the directory's permissions") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = _who(holder(path))
                if not wait:
                    raise UserError(f"{what} is in use by {who}; wait for it to finish or stop "
                                    f"it (lock file '{path}')") from None
                print(f"waiting: {what} is in use by {who} (lock file '{path}') ...",
                      file=log or sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # still held: nobody reads a stale pid afterwards
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        with _held_guard:
            _held.discard(key)
