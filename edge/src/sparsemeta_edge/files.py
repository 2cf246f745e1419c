"""Files a user names: read only regular files, and only up to a limit; check an output path
before any work is done, and write it atomically.

A path can name anything: a device (``/dev/zero`` never ends), a fifo (opening it blocks until
a writer comes), a symlink to either, a ``/proc`` file whose size says 0. So a file is opened
non-blocking, checked on its descriptor (``fstat``: no race with a swapped path) to be a regular
file of at most ``limit`` bytes, and read for at most ``limit + 1`` bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sparsemeta_edge.errors import EdgeError

_KINDS = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
NAME_MAX = 255  # bytes in one file name where the file system does not say
READ_CHUNK = 1 << 20
TEMP_PREFIX = ".smz-"  # a short prefix: a temporary file's name fits wherever the target's does


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def not_regular(path: str | os.PathLike, mode: int, what: str) -> str:
    """The refusal of a path that is not a regular file (``mode`` from its ``stat``)."""
    article = "an" if what[:1] in "aeiou" else "a"
    return f"'{path}' is a {_kind(mode)}, not a regular file; give {article} {what}"


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, limit: int, what: str) -> Iterator[BinaryIO]:
    """``path`` opened for reading if it is a regular file of at most ``limit`` bytes; anything
    else is one ``EdgeError`` naming it as ``what`` (e.g. "model file")."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise EdgeError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise EdgeError(f"cannot open {what} '{path}' ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise EdgeError(f"'{path}' is a directory, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise EdgeError(not_regular(path, info.st_mode, what))
        if info.st_size > limit:
            raise EdgeError(f"'{path}' has {_size(info.st_size)}, more than any {what} "
                            f"({_size(limit)}); is it the right file?")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def read_regular(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see ``open_regular``). Reads
    what the file declares plus one byte, then in chunks while more comes (a ``/proc`` file
    declares 0): never more than ``limit + 1`` bytes, and never a buffer of ``limit`` for a
    small file. A file that grows past ``limit`` while it is read is refused too."""
    with open_regular(path, limit, what) as fh:
        chunks, total = [], 0
        want = os.fstat(fh.fileno()).st_size + 1
        try:
            while total <= limit:
                chunk = fh.read(min(want, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                want = READ_CHUNK
        except OSError as exc:
            raise EdgeError(f"cannot read {what} '{path}' ({exc.strerror})") from None
    if total > limit:
        raise EdgeError(f"'{path}' has more than {_size(limit)}, more than any {what}; is it "
                        "the right file?")
    return b"".join(chunks)


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def _existing(path: Path, inputs: tuple[Path, ...], flag: str) -> None:
    """An existing output must be a regular file other than every input, and writable."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise EdgeError(f"{flag} '{path}' is a directory; give a file name such as "
                        f"{path / 'tuned.smz'}")
    if not stat.S_ISREG(info.st_mode):
        raise EdgeError(f"{flag} '{path}' is a {_kind(info.st_mode)}, not a regular file; "
                        "choose a file name")
    for source in inputs:
        if source.exists() and path.samefile(source):
            raise EdgeError(f"{flag} '{path}' is the input model; write to another file (the "
                            "input is what the next run starts from)")
    if not os.access(path, os.W_OK):
        raise EdgeError(f"{flag} '{path}' exists and is read-only; choose another file name")


def check_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (),
                 flag: str = "output") -> Path:
    """Refuse, before any work, an output path that cannot be written as a new regular file:
    a directory, a device, one of ``inputs``, a missing or unwritable directory, a name longer
    than the file system allows. Writability is tried for real (a temporary file is created and
    removed in the directory): permissions, read-only mounts and ACLs all count."""
    path = Path(path)
    if str(path).endswith(os.sep) or path.name in ("", ".", ".."):
        raise EdgeError(f"{flag} '{path}' names a directory; give a file name such as tuned.smz")
    parent = path.parent
    if not parent.exists():
        raise EdgeError(f"directory '{parent}' of {flag} does not exist; create it or choose "
                        "another path")
    if not parent.is_dir():
        raise EdgeError(f"'{parent}' in {flag} '{path}' is not a directory")
    limit = _name_max(parent)
    if len(os.fsencode(path.name)) > limit:
        raise EdgeError(f"{flag} file name is {len(os.fsencode(path.name))} bytes long, more "
                        f"than the {limit} the file system allows; choose a shorter name")
    if path.exists():
        _existing(path, tuple(Path(p) for p in inputs), flag)
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=parent)
    except OSError as exc:
        raise EdgeError(f"cannot write in directory '{parent}' ({exc.strerror}); choose "
                        f"another {flag}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def free_bytes(directory: str | os.PathLike) -> int | None:
    """Bytes an unprivileged user may still write on ``directory``'s file system (None where
    the platform cannot say)."""
    try:
        info = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return info.f_bavail * info.f_frsize
