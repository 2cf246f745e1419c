"""``sparsemeta data download NAME --root DIR``: fetch, verify, unpack — or say exactly why not.

Every file is streamed to a temporary name in the target directory, checked, and only then
renamed into place, so an interrupted or bad download never looks like data. Checks, in order:
an HTML page in place of the data (first bytes ``<!DOCTYPE``/``<html``), a short read against
Content-Length or the known size (truncated), the archive's integrity (zip directory + CRC of
every member, or the pickle's framing), then the MD5 checksum. Each failure is one line saying
what is wrong and what to do. A file already present is verified and reused.

Sources:

* omniglot — the official archives of Lake et al. (github.com/brendenlake/omniglot, python/),
  MD5s as published by torchvision and others; unpacked into ``images_background/`` and
  ``images_evaluation/``.
* miniimagenet — the ``mini-imagenet-cache-{train,validation,test}.pkl`` files of the
  learn2learn record on Zenodo (record 7978538); the sizes and MD5s are those listed for the
  record (as quoted by public projects; they could not be re-checked from this machine).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from sparsemeta.foundations.atomic import create_temp, fsync_dir
from sparsemeta.foundations.errors import UserError


@dataclass(frozen=True)
class Remote:
    filename: str
    urls: tuple[str, ...]
    md5: str | None
    size: int | None = None
    kind: str = "zip"  # "zip" (unpacked into ``unpack``) or "pickle" (kept as is)
    unpack: str | None = None  # top-level directory the zip holds


_OMNIGLOT = ("https://raw.githubusercontent.com/brendenlake/omniglot/master/python/",
             "https://github.com/brendenlake/omniglot/raw/master/python/")
_ZENODO = ("https://zenodo.org/records/7978538/files/",)

SOURCES: dict[str, tuple[Remote, ...]] = {
    "omniglot": (
        Remote("images_background.zip", tuple(u + "images_background.zip" for u in _OMNIGLOT),
               "68d2efa1b9178cc56df9314c21c6e718", kind="zip", unpack="images_background"),
        Remote("images_evaluation.zip", tuple(u + "images_evaluation.zip" for u in _OMNIGLOT),
               "6b91aef0f799c5bb55b94e3f2daec811", kind="zip", unpack="images_evaluation"),
    ),
    "miniimagenet": (
        Remote("mini-imagenet-cache-train.pkl", (_ZENODO[0] + "mini-imagenet-cache-train.pkl",),
               "ee4e80dc7b716f3ceec891d199b5277a", 1145461190, kind="pickle"),
        Remote("mini-imagenet-cache-validation.pkl",
               (_ZENODO[0] + "mini-imagenet-cache-validation.pkl",),
               "c1145a80890b88d54a67d6e0022d53a5", 292661258, kind="pickle"),
        Remote("mini-imagenet-cache-test.pkl", (_ZENODO[0] + "mini-imagenet-cache-test.pkl",),
               "389b6c59d348b2e1ae9610f00a5e6724", 353647539, kind="pickle"),
    ),
}

Opener = Callable[[str], IO[bytes]]
_CHUNK = 1 << 20


def _default_opener(url: str) -> IO[bytes]:
    req = urllib.request.Request(url, headers={"User-Agent": "sparsemeta-data-download"})
    return urllib.request.urlopen(req, timeout=60)


# --------------------------------------------------------------------------- verification


def is_html(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head"))


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_zip(path: Path) -> None:
    """A complete zip whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile:
        raise UserError(f"'{path}' is not a complete zip archive (truncated or interrupted "
                        f"download); delete it and download again") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise UserError(f"'{path}' is a truncated or corrupt zip archive ({exc}); delete it and "
                        f"download again") from None
    if bad is not None:
        raise UserError(f"'{path}' is corrupt (member '{bad}' fails its CRC check); delete it and "
                        f"download again")


def check_pickle(path: Path) -> None:
    """Cheap framing check: a pickle ends with the STOP opcode ('.')."""
    with open(path, "rb") as f:
        first = f.read(2)
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            raise UserError(f"'{path}' is empty; download it again")
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if not first.startswith(b"\x80") and first[:1] not in (b"(", b"}", b"]"):
        raise UserError(f"'{path}' is not a pickle file; delete it and download again")
    if last != b".":
        raise UserError(f"'{path}' is a truncated pickle (it does not end with STOP); delete it "
                        f"and download again")


def verify(path: Path, remote: Remote) -> None:
    """Raise a one-line UserError unless ``path`` is a complete, intact copy of ``remote``."""
    if is_html(path):
        raise UserError(f"'{path}' is an HTML page, not {remote.kind} data (the link returned a web "
                        f"page, e.g. a login or error page); delete it and download again")
    size = path.stat().st_size
    if remote.size is not None and size < remote.size:
        raise UserError(f"'{path}' is truncated ({size:,} of {remote.size:,} bytes); delete it and "
                        f"download again")
    if remote.kind == "zip":
        check_zip(path)
    elif remote.kind == "pickle":
        check_pickle(path)
    if remote.md5 is not None:
        got = md5sum(path)
        if got != remote.md5:
            raise UserError(f"checksum mismatch for '{path}' (md5 {got}, expected {remote.md5}); "
                            f"the file is damaged or not the official one, delete it and download again")


# --------------------------------------------------------------------------- fetching


def fetch(remote: Remote, dest: Path, opener: Opener | None = None, log: IO[str] | None = None) -> Path:
    """Download ``remote`` to ``dest`` via a temporary file, verified, trying each URL in turn."""
    opener = opener or _default_opener
    log = log if log is not None else sys.stderr
    problems = []
    for url in remote.urls:
        tmp = None
        try:
            fd, tmp = create_temp(dest)  # readable like any downloaded file, not 0600
            with os.fdopen(fd, "wb") as out:
                try:
                    response = opener(url)
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    reason = getattr(exc, "reason", None) or exc
                    problems.append(f"{url}: {reason}")
                    continue
                with response:
                    expected = _content_length(response)
                    got = 0
                    print(f"downloading {url}" + (f" ({expected / 1e6:.1f} MB)" if expected else ""),
                          file=log)
                    while True:
                        block = response.read(_CHUNK)
                        if not block:
                            break
                        out.write(block)
                        got += len(block)
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and got < expected and not is_html(tmp):
                problems.append(f"{url}: truncated download ({got:,} of {expected:,} bytes)")
                continue
            try:
                verify(tmp, remote)
            except UserError as exc:
                problems.append(f"{url}: {str(exc).replace(str(tmp), 'the download')}")
                continue
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return dest
        except OSError as exc:
            raise UserError(f"cannot write '{dest}' ({exc.strerror or exc}); check the directory "
                            f"and free disk space") from None
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()
    raise UserError(f"could not download {remote.filename}: {'; '.join(problems)}; check the "
                    f"internet connection, or fetch the file by hand into '{dest.parent}'")


def _content_length(response: object) -> int | None:
    """The declared size of an ``urlopen`` response (an HTTP or a file: URL's; None if not
    declared or not a number)."""
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def unpack(archive: Path, root: Path, top: str) -> Path:
    """Extract ``archive`` (whose entries all lie under ``top/``) into ``root/top``, atomically."""
    target = root / top
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{top}."))
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise UserError(f"'{archive}' contains an unsafe path '{name}'; refusing to unpack it")
                if parts and parts[0] != top and parts[0] != "__MACOSX":
                    raise UserError(f"'{archive}' does not hold a '{top}/' folder (found '{parts[0]}'); "
                                    f"it is not the expected archive, delete it and download again")
            zf.extractall(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / top, target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise UserError(f"'{archive}' cannot be unpacked ({exc}); delete it and download again") from None
    except OSError as exc:
        raise UserError(f"cannot unpack '{archive}' into '{root}' ({exc.strerror or exc}); check free "
                        f"disk space and permissions") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download(name: str, root: str | os.PathLike, *, opener: Opener | None = None,
             sources: tuple[Remote, ...] | None = None, log: IO[str] | None = None) -> str:
    """Fetch, verify and unpack data set ``name`` into ``root``; return a one-line summary."""
    log = log if log is not None else sys.stderr
    if sources is None:
        if name in ("glyphs", "folder"):
            what = ("is generated locally on first use" if name == "glyphs"
                    else "is your own images (ROOT/CLASS_NAME/*.png|jpg)")
            raise UserError(f"nothing to download for '{name}': it {what}")
        if name not in SOURCES:
            raise UserError(f"no download for data set '{name}'; choose one of {', '.join(sorted(SOURCES))}")
        sources = SOURCES[name]
    if not root:
        raise UserError("--root is required: the directory to download into")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"'{root}' is a file, not a directory; choose another --root")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create '{root}' ({exc.strerror}); choose a writable --root") from None
    done = []
    for remote in sources:
        if remote.kind == "zip" and remote.unpack and _nonempty_dir(root / remote.unpack):
            print(f"{remote.unpack}/ already present in {root}; skipping", file=log)
            done.append(f"{remote.unpack}/ (present)")
            continue
        path = root / remote.filename
        if path.exists():
            try:
                verify(path, remote)
                print(f"{path.name} already downloaded and verified", file=log)
            except UserError as exc:
                print(f"{exc}; downloading it again", file=log)
                path.unlink()
        if not path.exists():
            fetch(remote, path, opener=opener, log=log)
        if remote.kind == "zip" and remote.unpack:
            unpack(path, root, remote.unpack)
            done.append(f"{remote.unpack}/")
        else:
            done.append(remote.filename)
    return f"{name} ready in {root}: {', '.join(done)} (verified)"


def _nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


__all__ = ["SOURCES", "Remote", "check_pickle", "check_zip", "download", "fetch", "is_html",
           "md5sum", "unpack", "verify"]
