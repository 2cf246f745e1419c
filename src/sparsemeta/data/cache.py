"""Decode once, memory-map afterwards: the uint8 image cache shared by every real data set.

A real data set is described by a :class:`Layout` (its classes, in a fixed order, each with its
image files, and which classes form each split). :func:`load_layout` decodes all images once
(Pillow, resized, in a pool of processes for big sets) straight into a uint8 ``.npy`` file of
shape ``(N, C, H, W)`` beside a small ``.json``, then memory-maps it. Later loads only list the
tree, check its signature and memory-map the file, so no float copy of the data ever exists.

Cache files live in ``cache_dir()/decoded`` ($SPARSEMETA_CACHE or ~/.cache/sparsemeta), named
``<kind>-<identity>-<signature>.npy`` where *identity* hashes the resolved root and the decoding
parameters (image size, channels, ...) and *signature* hashes every source file's relative path,
size and modification time plus the class structure. A different root, size or a changed file
therefore never reuses a wrong cache; a rebuilt cache removes the stale ones of the same identity.
Files are written to a temporary name and renamed; the ``.json`` is written last and is the
commit mark, so a crash, a truncated ``.npy`` or a foreign file is detected and rebuilt.
One process builds a given cache at a time: the build runs under an exclusive lock
(``.<kind>-<identity>.lock`` beside the caches, foundations/lock.py); a second process prints one
line naming the builder's pid, waits, and then memory-maps what the first one built. Before a
build, temporary files left by killed builders are removed (``atomic.remove_stale_temps``).

This module also holds the root check every real loader shares (``require_root``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sparsemeta.data.base import FewShotData, cache_dir
from sparsemeta.foundations.atomic import (
    atomic_write_text,
    remove_stale_temps,
    replace_durably,
    temp_path,
)
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.lock import exclusive
from sparsemeta.foundations.safeio import mode_kind, read_json

#: a cache's .json holds its key, signature, shape and statistics: a few hundred bytes
MAX_META_BYTES = 1 << 20
#: Bump when the decoded bytes change for the same inputs (invalidates every cache).
CACHE_VERSION = 1
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
#: Below this many images the decode runs in-process (a pool costs more than it saves).
POOL_MIN_IMAGES = 2000
_CHUNK = 500


# --------------------------------------------------------------------------- shared checks


def require_root(root: str | None, name: str, expected: str) -> Path:
    """``data.root`` as an existing directory, or a one-line UserError saying what to do."""
    if not root:
        raise UserError(
            f"data.root is not set for '{name}'; set data.root to a directory with {expected} "
            f"(--set data.root=DIR, --root DIR for 'sparsemeta data …', or for a saved run in its "
            f"config.yaml)"
        )
    path = Path(root).expanduser()
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"data root '{path}' does not exist; set data.root to a directory with "
                        f"{expected}") from None
    except OSError as exc:  # e.g. a parent directory the user may not enter
        raise unreadable(path, exc, "data root") from None
    if not path.is_dir():
        raise UserError(f"data root '{path}' is {_kind(path)}, not a directory; set data.root "
                        f"to a directory with {expected}")
    return path.resolve()


def _kind(path: Path) -> str:
    """What a path that is not a directory is, for a message."""
    return mode_kind(path.stat().st_mode)


def unreadable(path: str | os.PathLike, exc: OSError, what: str = "") -> UserError:
    """The one-line UserError for a file or directory that cannot be read while loading data:
    permission denied, vanished (deleted or moved meanwhile), or another OS error."""
    what = f"{what} " if what else ""
    if isinstance(exc, PermissionError):
        return UserError(f"permission denied reading {what}'{path}'; make it readable "
                         f"(chmod a+r, and a+x for a directory) or run as its owner")
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return UserError(f"{what}'{path}' vanished while the data was being read (deleted or moved "
                         f"meanwhile?); run again once the data directory is stable")
    reason = (exc.strerror or str(exc) or type(exc).__name__).replace("\n", " ")
    return UserError(f"cannot read {what}'{path}' ({reason})")


def _scan(directory: Path, keep: Callable[[os.DirEntry], bool]) -> list[Path]:
    try:
        with os.scandir(directory) as it:
            return sorted(Path(e.path) for e in it if not e.name.startswith(".") and keep(e))
    except OSError as exc:
        raise unreadable(getattr(exc, "filename", None) or directory, exc, "directory") from None


def list_images(directory: Path) -> list[Path]:
    """Image files (png/jpg/jpeg, any case) directly in ``directory``, sorted by name."""
    return _scan(directory, lambda e: e.name.lower().endswith(IMAGE_EXTS) and e.is_file())


def list_dirs(directory: Path) -> list[Path]:
    """Visible sub-directories of ``directory``, sorted by name."""
    return _scan(directory, lambda e: e.is_dir())


# --------------------------------------------------------------------------- layouts


@dataclass
class Layout:
    """What is on disk: classes in cache order (name, image files) and the classes of each split."""

    name: str
    root: Path
    description: str
    classes: list[tuple[str, list[Path]]]
    splits: dict[str, list[int]] = field(default_factory=dict)
    #: further files that define the data (e.g. split CSVs): part of the cache signature
    extra_files: list[Path] = field(default_factory=list)

    def counts(self) -> dict[str, tuple[int, int]]:
        """(classes, images) per split, without decoding anything."""
        return {s: (len(c), sum(len(self.classes[i][1]) for i in c)) for s, c in self.splits.items()}

    def per_class(self, split: str) -> list[int]:
        return [len(self.classes[i][1]) for i in self.splits.get(split, [])]


def to_fewshot(layout: Layout, images: np.ndarray, per_class: list[np.ndarray],
               mean: tuple[float, ...], std: tuple[float, ...]) -> FewShotData:
    """FewShotData of a layout whose images were decoded in layout order."""
    classes = {s: [per_class[i] for i in idx] for s, idx in layout.splits.items()}
    names = {s: [layout.classes[i][0] for i in idx] for s, idx in layout.splits.items()}
    return FewShotData(layout.name, images, classes, names, mean=mean, std=std)


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodeSpec:
    """How a file becomes a ``(channels, size, size)`` uint8 array."""

    size: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    invert: bool = False  # Omniglot: black ink on white → ink 255 on background 0
    exif: bool = False  # honour the EXIF orientation of photos


#: Pillow modes of grey images with more than 8 bits (16-bit PNG/TIFF): ``convert("L")`` would
#: clip them at 255, so they are scaled instead (see :func:`to_8bit`).
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image as 8-bit ``L``, scaled rather than clipped.

    ``I;16*`` modes: divide by 257 (65535 → 255, 32896 → 128). Mode ``I`` (how some decoders
    return 16-bit PNGs, and 32-bit TIFFs): divide by 257 when every value lies in 0..65535, else
    scale the image's own range 0..max to 0..255 (negative values become 0).
    """
    arr = np.asarray(im)
    if im.mode != "I" or (arr.size and arr.min() >= 0 and arr.max() <= 65535):
        scaled = arr / 257.0
    else:
        top = float(arr.max()) if arr.size else 1.0
        scaled = np.clip(arr, 0, None) * (255.0 / max(top, 1.0))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """The image of ``path``, only its header read: every loader opens images here, so each
    defect is the same one line naming the file, before any pixel is decoded. An image of
    more pixels than Pillow's ``MAX_IMAGE_PIXELS`` (a decompression bomb: a small file that
    decodes to gigabytes) is refused, also where Pillow itself only warns (up to twice that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                yield im
        except (PermissionError, FileNotFoundError, NotADirectoryError) as exc:
            raise unreadable(path, exc, "image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UserError(f"image '{path}' has more than {Image.MAX_IMAGE_PIXELS:,} pixels "
                            "(a decompression bomb?); replace or delete that file") from None
        except (OSError, ValueError, SyntaxError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot decode image '{path}' ({reason}); replace or delete that "
                            "file") from None


def decode_image(path: str | os.PathLike, spec: DecodeSpec) -> np.ndarray:
    """One image file as ``(C, H, W)`` uint8, resized (Lanczos) to ``spec.size`` square."""
    mode = "RGB" if spec.channels == 3 else "L"
    with open_image(path) as im:
        if im.format == "JPEG":
            im.draft(mode, (spec.size, spec.size))  # decode big JPEGs at reduced scale
        if spec.exif:
            im = ImageOps.exif_transpose(im)
        if im.mode in WIDE_GREY:
            im = to_8bit(im)
        im = im.convert(mode)
    if spec.invert:
        im = ImageOps.invert(im)
    if im.size != (spec.size, spec.size):
        im = im.resize((spec.size, spec.size), Image.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if spec.channels == 1 else arr.transpose(2, 0, 1)


def infer_channels(paths: Iterable[Path]) -> int:
    """3 if any image has colour, else 1 (reads headers only)."""
    for p in paths:
        with open_image(p) as im:
            mode = im.mode
        if mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
            return 3
    return 1


def _decode_chunk(npy: str, start: int, paths: Sequence[str], spec: DecodeSpec) -> None:
    out = np.load(npy, mmap_mode="r+")
    for k, p in enumerate(paths):
        out[start + k] = decode_image(p, spec)
    out.flush()
    del out


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork avoids re-importing the package (and torch) in each worker; spawn elsewhere.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def default_workers() -> int:
    env = os.environ.get("SPARSEMETA_DECODE_WORKERS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(2, os.cpu_count() or 1))


def _allocate(npy: Path, shape: tuple[int, ...]) -> None:
    """Create an uninitialised uint8 .npy of ``shape``, its disk space reserved up front (so a
    full disk is an OSError here, not a SIGBUS while writing the memory map)."""
    arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=shape)
    offset, nbytes = arr.offset, arr.nbytes
    del arr
    if hasattr(os, "posix_fallocate") and nbytes:
        fd = os.open(npy, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, offset + nbytes)
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: file system cannot; carry on
                raise
        finally:
            os.close(fd)


def decode_files(paths: Sequence[Path], spec: DecodeSpec, npy: Path, workers: int | None = None) -> None:
    """Decode ``paths`` in order into a new .npy at ``npy`` (``(N, C, size, size)`` uint8)."""
    _allocate(npy, (len(paths), spec.channels, spec.size, spec.size))
    strs = [str(p) for p in paths]
    workers = default_workers() if workers is None else workers
    starts = range(0, len(strs), _CHUNK)
    if workers <= 1 or len(strs) < POOL_MIN_IMAGES:
        for s in starts:
            _decode_chunk(str(npy), s, strs[s:s + _CHUNK], spec)
        return
    with ProcessPoolExecutor(workers, mp_context=_mp_context()) as pool:
        futures = [pool.submit(_decode_chunk, str(npy), s, strs[s:s + _CHUNK], spec) for s in starts]
        for f in futures:
            f.result()  # re-raises a worker's UserError (e.g. a corrupt image)


def channel_stats(images: np.ndarray, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``images / 255`` (streamed, float64 accumulators)."""
    c = images.shape[1]
    total = np.zeros(c)
    sq = np.zeros(c)
    count = 0
    for s in range(0, len(images), chunk):
        x = np.asarray(images[s:s + chunk], dtype=np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        sq += np.square(x).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(sq / max(count, 1) - mean**2, 0.0))
    std = np.where(std < 1e-3, 1.0, std)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


# --------------------------------------------------------------------------- the cache


def decoded_dir() -> Path:
    path = cache_dir(None) / "decoded"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create cache directory '{path}' ({exc.strerror}); "
                        "set SPARSEMETA_CACHE to a writable directory") from None
    return path


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_signature(root: Path, files: Iterable[Path], structure: object = None) -> str:
    """Hash of every file's path (relative to root), size and mtime, plus ``structure``."""
    h = hashlib.sha1(json.dumps(structure, sort_keys=True, default=str).encode())
    for p in files:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise unreadable(p, exc) from None
        try:
            rel = os.path.relpath(p, root)
        except ValueError:  # another drive (Windows)
            rel = str(p)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_paths(kind: str, key: dict, signature: str, directory: Path | None = None) -> tuple[Path, Path]:
    d = directory or decoded_dir()
    ident = _digest({"kind": kind, "version": CACHE_VERSION, **key})[:12]
    stem = f"{kind}-{ident}-{signature[:12]}"
    return d / f"{stem}.npy", d / f"{stem}.json"


def _try_load(npy: Path, meta: Path, key: dict, signature: str) -> tuple[np.ndarray, dict] | None:
    """The memory-mapped cache and its info, or None when missing, partial, corrupt or foreign."""
    try:
        info = read_json(meta, what=f"cache file '{meta}'", limit=MAX_META_BYTES)
        if info.get("key") != json.loads(json.dumps(key)) or info.get("signature") != signature:
            return None
        images = np.load(npy, mmap_mode="r")
    except Exception:  # any unreadable file simply means "rebuild"
        return None
    ok = (
        isinstance(images, np.memmap)
        and images.dtype == np.uint8
        and images.ndim == 4
        and list(images.shape) == info.get("shape")
        and npy.stat().st_size >= images.offset + images.nbytes
    )
    return (images, info.get("info", {})) if ok else None


def load_or_build(kind: str, key: dict, signature: str,
                  build: Callable[[Path], dict]) -> tuple[np.ndarray, dict]:
    """Memory-map the cache for (kind, key, signature), building it first when needed.

    ``build(tmp)`` must write a uint8 4-D ``.npy`` at ``tmp`` and return a JSON-able info dict,
    which later loads get back unchanged.
    """
    npy, meta = cache_paths(kind, key, signature)
    found = _try_load(npy, meta, key, signature)
    if found is not None:
        return found
    # One builder per (kind, identity): a second process waits here, then reads what the
    # first one built instead of decoding the whole data set again.
    lock = npy.with_name(f".{npy.stem.rsplit('-', 1)[0]}.lock")
    with exclusive(lock, f"the {kind} cache in '{npy.parent}'", wait=True):
        found = _try_load(npy, meta, key, signature)
        if found is not None:
            return found
        remove_stale_temps(npy.parent)  # left by builders that were killed
        _build(kind, key, signature, build, npy, meta)
        _remove_stale(npy)
    found = _try_load(npy, meta, key, signature)
    if found is None:  # pragma: no cover - only on a broken file system
        raise UserError(f"the {kind} cache '{npy}' could not be read back; delete it and retry")
    return found


def _build(kind: str, key: dict, signature: str, build: Callable[[Path], dict],
           npy: Path, meta: Path) -> None:
    tmp = temp_path(npy)
    try:
        info = build(tmp)
        arr = np.load(tmp, mmap_mode="r")
        shape = list(arr.shape)
        del arr
        replace_durably(tmp, npy)
        record = {"key": key, "signature": signature, "shape": shape, "version": CACHE_VERSION,
                  "info": info}
        atomic_write_text(meta, json.dumps(record))  # written last: the commit mark
    except OSError as exc:
        raise UserError(
            f"cannot write the {kind} cache '{npy}' ({exc.strerror or exc}); free disk space or "
            f"set SPARSEMETA_CACHE to another directory"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale(current: Path) -> None:
    """Delete caches of the same kind and identity but another signature (the data changed)."""
    prefix = current.stem.rsplit("-", 1)[0] + "-"
    for p in current.parent.glob(f"{prefix}*"):
        if p.stem != current.stem and p.suffix in (".npy", ".json") and not p.name.startswith("."):
            with contextlib.suppress(OSError):
                p.unlink()


def _layout_key(layout: Layout, size: int, channels: int | None, invert: bool, exif: bool,
                stats: bool) -> tuple[list[Path], dict, str]:
    files = [p for _, ps in layout.classes for p in ps]
    structure = [[name, len(ps)] for name, ps in layout.classes]
    signature = file_signature(layout.root, [*files, *layout.extra_files], structure)
    key = {"root": str(layout.root), "size": size, "channels": channels or "auto",
           "invert": invert, "exif": exif, "stats": stats}
    return files, key, signature


def layout_cache(layout: Layout, kind: str, *, size: int, channels: int | None,
                 invert: bool = False, exif: bool = False, stats: bool = False) -> Path | None:
    """The valid cache file of ``layout`` if it has been built, else None (decodes nothing)."""
    _, key, signature = _layout_key(layout, size, channels, invert, exif, stats)
    npy, meta = cache_paths(kind, key, signature)
    return npy if _try_load(npy, meta, key, signature) is not None else None


def load_layout(layout: Layout, kind: str, *, size: int,
                channels: int | None, invert: bool = False, exif: bool = False,
                stats: bool = False, workers: int | None = None,
                ) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """Decode (first time) or memory-map (later) every image of ``layout``, in layout order.

    ``channels=None`` infers 1 or 3 from the files. Returns the images, one index array per
    class of ``layout.classes`` and the cache info (``channels``, and ``mean``/``std`` when
    ``stats``).
    """
    files, key, signature = _layout_key(layout, size, channels, invert, exif, stats)

    def build(tmp: Path) -> dict:
        ch = channels or infer_channels(files)
        decode_files(files, DecodeSpec(size, ch, invert, exif), tmp, workers)
        info: dict = {"channels": ch, "classes": len(layout.classes), "images": len(files)}
        if stats:
            mean, std = channel_stats(np.load(tmp, mmap_mode="r"))
            info.update(mean=list(mean), std=list(std))
        return info

    images, info = load_or_build(kind, key, signature, build)
    if images.shape[0] != len(files):  # pragma: no cover - guarded by the signature
        raise UserError(f"the {kind} cache does not match '{layout.root}'; delete {decoded_dir()}")
    ends = np.cumsum([len(ps) for _, ps in layout.classes])
    per_class = [np.arange(e - len(ps), e) for e, (_, ps) in zip(ends, layout.classes)]
    return images, per_class, info
