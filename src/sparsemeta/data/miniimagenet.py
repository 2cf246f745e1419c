"""mini-ImageNet with the Ravi & Larochelle (2017) split: 64 / 16 / 20 classes of 600 images.

``data.root`` may hold any one of the widely distributed forms (checked in this order):

1. ``images/*.jpg`` with the split files ``train.csv``, ``val.csv``, ``test.csv``
   (columns ``filename,label``; label = WordNet id such as ``n01532829``);
2. ``images/*.jpg`` without CSV files: the classes of each split come from the packaged list
   (``splits/miniimagenet.csv``) and an image belongs to the class its file name starts with
   (``n0153282900000005.jpg`` → ``n01532829``), which is how the released files are named;
3. ``train/``, ``val/``, ``test/`` each with one folder of images per class;
4. the pickles ``mini-imagenet-cache-{train,val,test}.pkl`` (``-validation.pkl`` accepted), a
   dict with ``image_data`` (uint8 ``(N, 84, 84, 3)``) and ``class_dict`` (label → indices).
   They are read with a restricted unpickler that only rebuilds numpy arrays, so a foreign
   pickle cannot run code, nor allocate more than the file holds; the class indices are checked
   (integers in range, no repeats, no image in two classes, no class in two splits) before use,
   and anything malformed is a one-line UserError (tests/data/test_pickle_fuzz.py).

Images are 84×84×3 (resized with Lanczos if ``data.image_size`` differs), cached once as uint8 and
memory-mapped (cache.py). Normalisation uses the ImageNet channel mean and std. Meta-training
augmentation (``data.augment``, default on): random crop with zero padding (8 px at 84 px) and a
horizontal flip, see :func:`crop_flip`, exposed as ``FewShotData.augment``.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import stat
import struct
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from sparsemeta.data.base import SPLITS, FewShotData
from sparsemeta.data.cache import (
    Layout,
    decoded_dir,
    file_signature,
    list_dirs,
    list_images,
    load_layout,
    load_or_build,
    require_root,
    to_fewshot,
    unreadable,
)
from sparsemeta.data.spec import DataSpec
from sparsemeta.foundations.errors import UserError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.multiarray import scalar as _scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.multiarray import scalar as _scalar
    from numpy.core.numeric import _frombuffer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PICKLES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
EXPECTED = ("images/ with train.csv, val.csv and test.csv, or "
            "mini-imagenet-cache-{train,val,test}.pkl, or train/, val/, test/ class folders")


# --------------------------------------------------------------------------- the packaged split


def ravi_split() -> dict[str, list[str]]:
    """The packaged Ravi & Larochelle class lists (WordNet ids) per split."""
    text = (resources.files("sparsemeta.data") / "splits" / "miniimagenet.csv").read_text()
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    rows = csv.reader(line for line in text.splitlines() if line and not line.startswith("#"))
    next(rows)  # header: label,split
    for label, split in rows:
        out[split].append(label)
    return out


# --------------------------------------------------------------------------- augmentation


def crop_flip(batch: np.ndarray, rng: np.random.Generator, padding: int = 8) -> np.ndarray:
    """Random crop after zero padding by ``padding`` px, then a horizontal flip with p = 1/2.

    ``batch`` is uint8 ``(n, C, H, W)``; returns a new array of the same shape.
    """
    n, c, h, w = batch.shape
    p = padding
    padded = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=batch.dtype)
    padded[..., p:p + h, p:p + w] = batch
    offsets = rng.integers(0, 2 * p + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    out = np.empty_like(batch)
    for i in range(n):
        dy, dx = offsets[i]
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop[..., ::-1] if flips[i] else crop
    return out


# --------------------------------------------------------------------------- file sniffing


def sniff(path: Path, what: str) -> None:
    """Reject anything but a regular file (opened without blocking: a fifo would wait for a
    writer), an empty file, or an HTML page saved in place of the data."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"'{path}' is not a regular file; put {what} there")
            head = os.read(fd, 512)
        finally:
            os.close(fd)
    except OSError as exc:
        raise UserError(f"cannot read '{path}' ({exc.strerror}); check its permissions") from None
    if not head:
        raise UserError(f"'{path}' is empty; download {what} again")
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        raise UserError(
            f"'{path}' is an HTML page, not {what} (the download link returned a web page); "
            f"delete it and download the file again"
        )


# --------------------------------------------------------------------------- image layouts


def _read_csv(path: Path) -> list[tuple[str, str]]:
    sniff(path, "a mini-ImageNet split file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read split file '{path}' ({exc}); download it again") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(x.strip() for x in r)]
    if not rows or [x.strip().lower() for x in rows[0]] != ["filename", "label"]:
        got = ",".join(rows[0]) if rows else ""
        raise UserError(f"'{path}' is not a mini-ImageNet split file: expected the header "
                        f"'filename,label', got '{got[:60]}'")
    out = []
    for k, r in enumerate(rows[1:], start=2):
        if len(r) != 2 or not r[0].strip() or not r[1].strip():
            raise UserError(f"'{path}' line {k} is not 'filename,label': {','.join(r)[:80]!r}")
        out.append((r[0].strip(), r[1].strip()))
    if not out:
        raise UserError(f"split file '{path}' lists no images; download it again")
    return out


def _from_csv(root: Path, images_dir: Path) -> tuple[list, dict, list[Path]]:
    try:
        with os.scandir(images_dir) as it:
            present = {e.name for e in it if not e.name.startswith(".")}
    except OSError as exc:
        raise unreadable(images_dir, exc, "directory") from None
    classes: list[tuple[str, list[Path]]] = []
    splits: dict[str, list[int]] = {}
    owner: dict[str, str] = {}
    csvs = [root / f"{s}.csv" for s in SPLITS]
    for split, path in zip(SPLITS, csvs):
        by_class: dict[str, list[Path]] = {}
        missing = []
        for fname, label in _read_csv(path):
            if fname not in present:
                missing.append(fname)
            by_class.setdefault(label, []).append(images_dir / fname)
        if missing:
            raise UserError(
                f"{len(missing)} image(s) listed in '{path.name}' are missing from '{images_dir}' "
                f"(first: {missing[0]}); the image folder is incomplete, extract it again"
            )
        splits[split] = []
        for label in sorted(by_class):
            if label in owner:
                raise UserError(f"class {label} is in both {owner[label]}.csv and {split}.csv; "
                                f"the split files overlap")
            owner[label] = split
            splits[split].append(len(classes))
            classes.append((label, by_class[label]))
    return classes, splits, csvs


def _from_packaged(root: Path, images_dir: Path) -> tuple[list, dict]:
    ravi = ravi_split()
    by_class: dict[str, list[Path]] = {}
    for p in list_images(images_dir):
        by_class.setdefault(p.name[:9], []).append(p)
    classes: list[tuple[str, list[Path]]] = []
    splits: dict[str, list[int]] = {}
    for split in SPLITS:
        splits[split] = []
        for label in sorted(ravi[split]):
            files = by_class.get(label)
            if not files:
                raise UserError(
                    f"'{images_dir}' has no images of class {label} ({split} split of Ravi & "
                    f"Larochelle); the image folder is incomplete, or put train.csv, val.csv and "
                    f"test.csv beside it"
                )
            splits[split].append(len(classes))
            classes.append((label, files))
    return classes, splits


def _from_dirs(root: Path) -> tuple[list, dict]:
    classes: list[tuple[str, list[Path]]] = []
    splits: dict[str, list[int]] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        splits[split] = []
        for d in list_dirs(root / split):
            files = list_images(d)
            if not files:
                continue
            if d.name in owner:
                raise UserError(f"class '{d.name}' is in both {owner[d.name]}/ and {split}/ of '{root}'")
            owner[d.name] = split
            splits[split].append(len(classes))
            classes.append((d.name, files))
        if not splits[split]:
            raise UserError(f"'{root / split}' has no class folders with images; expected "
                            f"{split}/CLASS/*.jpg")
    return classes, splits


@dataclass
class PickleSource:
    """The pickle form: one file per split (counts are known only after unpickling)."""

    root: Path
    files: dict[str, Path]
    description: str


def _find_pickles(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in PICKLES.items():
        for n in names:
            if os.path.lexists(root / n):  # a fifo or device is named by ``sniff``, not missed
                found[split] = root / n
                break
    return found


def scan_miniimagenet(spec: DataSpec) -> Layout | PickleSource:
    """Detect the form under data.root and list it (no decoding, no unpickling)."""
    root = require_root(spec.root, "miniimagenet", EXPECTED)
    images_dir = root / "images"
    if images_dir.is_dir():
        csvs = [root / f"{s}.csv" for s in SPLITS]
        have = [os.path.lexists(p) for p in csvs]
        if any(have) and not all(have):
            missing = [p.name for p, h in zip(csvs, have) if not h]
            raise UserError(f"'{root}' has images/ and some split files but not {', '.join(missing)}; "
                            f"add the missing CSV file(s) (or remove all three to use the packaged split)")
        if all(have):
            classes, splits, extra = _from_csv(root, images_dir)
            desc = f"images/ + train.csv, val.csv, test.csv in '{root}'"
            return Layout("miniimagenet", root, desc, classes, splits, extra)
        classes, splits = _from_packaged(root, images_dir)
        desc = f"images/ in '{root}' with the packaged Ravi & Larochelle split"
        return Layout("miniimagenet", root, desc, classes, splits)
    if all((root / s).is_dir() for s in SPLITS):
        classes, splits = _from_dirs(root)
        return Layout("miniimagenet", root, f"train/, val/, test/ class folders in '{root}'",
                      classes, splits)
    pickles = _find_pickles(root)
    if pickles:
        missing = [PICKLES[s][0] for s in SPLITS if s not in pickles]
        if missing:
            raise UserError(f"'{root}' has mini-ImageNet pickles but not {', '.join(missing)}; "
                            f"download the missing file(s) (sparsemeta data download miniimagenet)")
        return PickleSource(root, pickles, f"mini-imagenet-cache-*.pkl files in '{root}'")
    raise UserError(f"'{root}' is not a mini-ImageNet directory: expected {EXPECTED}")


# --------------------------------------------------------------------------- pickles


_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("collections", "OrderedDict"), ("builtins", "bytearray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
}
#: no dtype in a mini-ImageNet pickle is wider than this (uint8 pixels, int64 indices)
_MAX_ITEMSIZE = 64
_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}


class _Forbidden(pickle.UnpicklingError):
    pass


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` inside the pickle: only :func:`_reconstruct` may use it (as
    numpy's own pickles do); calling it would allocate an array of any claimed size."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        raise _Forbidden("numpy.ndarray called directly")


_NDARRAY = _NdarrayClass()


def _check_dtype(dtype: object) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.itemsize > _MAX_ITEMSIZE:
        raise _Forbidden(f"an unsupported numpy dtype ({type(dtype).__name__})")
    return dtype


def _safe_reconstruct(subtype: object, shape: object, typecode: object) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') + __setstate__(its bytes), so
    # the array only ever holds bytes present in the file; a non-empty shape here would be an
    # allocation out of nothing.
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,):
        raise _Forbidden("numpy _reconstruct with unusual arguments")
    if not isinstance(typecode, (bytes, str)) or len(typecode) != 1:
        raise _Forbidden("numpy _reconstruct with unusual arguments")
    return _reconstruct(np.ndarray, (0,), typecode)


def _safe_dtype(obj: object, align: object = False, copy: object = False) -> np.dtype:
    if not isinstance(obj, str) or len(obj) > 16:
        raise _Forbidden("numpy.dtype of an unusual description")
    return np.dtype(obj, bool(align), bool(copy))


def _safe_scalar(dtype: object, obj: object = None) -> object:
    _check_dtype(dtype)
    if obj is None and not dtype.hasobject:
        raise _Forbidden("numpy scalar without data")
    return _scalar(dtype, obj)


def _safe_frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    _check_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise _Forbidden("numpy _frombuffer of a non-buffer")
    return _frombuffer(buf, dtype, shape, order)


def _safe_encode(obj: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    # how protocol-2 pickles carry bytes; any other codec could grow the data (hex: 2x per call)
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise _Forbidden("_codecs.encode other than str → latin1 bytes")
    return obj.encode("latin1")


def _safe_bytearray(*args: object) -> bytearray:
    # bytearray(n) would allocate and zero n bytes out of a few bytes of pickle
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if (len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str)
            and args[1].lower() in _LATIN1):
        return bytearray(args[0], "latin1")
    raise _Forbidden("bytearray of anything but bytes")


_SAFE = {"ndarray": _NDARRAY, "dtype": _safe_dtype, "encode": _safe_encode,
         "OrderedDict": OrderedDict, "bytearray": _safe_bytearray,
         "_reconstruct": _safe_reconstruct, "scalar": _safe_scalar, "_frombuffer": _safe_frombuffer}


class _Bounded:
    """The pickle file, refusing any read longer than the whole file: a length field claiming
    1 TB is a damaged file, not a reason to allocate 1 TB."""

    def __init__(self, f: io.BufferedReader, size: int) -> None:
        self._f, self.size = f, size
        self.readline, self.readinto = f.readline, f.readinto

    def read(self, n: int = -1) -> bytes:
        if n > self.size:
            raise EOFError(f"a field claims {n:,} bytes, more than the file's {self.size:,}")
        return self._f.read(n)


def _load_bytearray8(self: _ArrayUnpickler) -> None:
    # pickle._Unpickler zero-fills a bytearray of the claimed length before reading into it
    (n,) = struct.unpack("<Q", self.read(8))
    if n > self.file_size:
        raise EOFError(f"a bytearray claims {n:,} bytes, more than the file's {self.file_size:,}")
    self.append(bytearray(self.read(n)))


class _ArrayUnpickler(pickle._Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; refuses anything else.

    Each allowed global is replaced by a checked stand-in that cannot allocate more than the
    file holds. The pure-Python unpickler is used on purpose: the C one sizes its memo table by
    the largest index a pickle names, so ten bytes (``LONG_BINPUT 2**26``) make it allocate and
    zero 1 GB; this one keeps the memo in a dict (and is as fast on these pickles, which are a
    few large byte strings).
    """

    dispatch = {**pickle._Unpickler.dispatch, pickle.BYTEARRAY8[0]: _load_bytearray8}

    def __init__(self, f: io.BufferedReader, size: int) -> None:
        super().__init__(_Bounded(f, size), encoding="latin1")
        self.file_size = size

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in _ALLOWED:
            raise _Forbidden(f"{module[:60]}.{name[:60]}")
        return _SAFE[name]


def _one_line(text: object, limit: int = 80) -> str:
    """``text`` for an error message: one line, at most ``limit`` characters."""
    out = " ".join(str(text).split())
    return out if len(out) <= limit else out[:limit - 1] + "…"


def _label(key: object) -> str:
    return _one_line(repr(key), 40) if isinstance(key, str) else f"<a {type(key).__name__}>"


def _indices(idx: object, n: int, budget: int, where: str) -> np.ndarray:
    """One class's image indices as int64, checked before anything is expanded: a flat list,
    tuple or 1-D integer array of at most ``budget`` indices, each in ``0..n-1``, no repeats."""
    if isinstance(idx, np.ndarray):
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise UserError(f"{where} is a {idx.ndim}-D {idx.dtype} array, not a list of image "
                            f"indices")
        size = idx.size
    elif isinstance(idx, (list, tuple)):
        size = len(idx)
    else:
        raise UserError(f"{where} is a {type(idx).__name__}, not a list of image indices")
    if size == 0:
        raise UserError(f"{where} lists no images")
    if size > budget:
        raise UserError(f"{where} claims {size:,} images but only {budget:,} of the {n:,} in "
                        f"image_data are not yet taken by earlier classes")
    if isinstance(idx, np.ndarray):
        lo, hi = int(idx.min()), int(idx.max())
    else:
        for v in idx:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise UserError(f"{where} holds a {type(v).__name__}, not an image index")
        lo, hi = int(min(idx)), int(max(idx))
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise UserError(f"{where} points outside image_data (index {_one_line(bad, 30)}, "
                        f"{n:,} images)")
    arr = np.asarray(idx, dtype=np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        raise UserError(f"{where} lists image {int(uniq[counts > 1][0])} more than once")
    return arr


def _check_pickle(obj: object, path: Path, file_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The checks of one unpickled object (any failure is a one-line UserError)."""
    expected = "expected a dict with image_data (N, 84, 84, 3) uint8 and class_dict"
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' is not a mini-ImageNet pickle: {expected}, found a "
                        f"{type(obj).__name__}")
    data = obj.get("image_data")
    class_dict = obj.get("class_dict")
    if data is None or class_dict is None:
        keys = ", ".join(_label(k) for k in list(obj)[:6]) + (", …" if len(obj) > 6 else "")
        raise UserError(f"'{path}' is not a mini-ImageNet pickle: {expected}, found keys [{keys}]")
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4
            or data.shape[-1] != 3 or min(data.shape) < 1):
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise UserError(f"'{path}' is not a mini-ImageNet pickle: {expected}, found image_data "
                        f"{_one_line(what)}")
    if data.nbytes > file_size:
        raise UserError(f"'{path}': image_data claims {data.nbytes:,} bytes but the file has "
                        f"{file_size:,}; download it again")
    if not isinstance(class_dict, dict) or not class_dict:
        what = "an empty dict" if isinstance(class_dict, dict) else f"a {type(class_dict).__name__}"
        raise UserError(f"'{path}' is not a mini-ImageNet pickle: {expected} (label → image "
                        f"indices), found class_dict {what}")
    n = len(data)
    if len(class_dict) > n:
        raise UserError(f"'{path}': class_dict has {len(class_dict):,} classes for {n:,} images")
    owner = np.full(n, -1, dtype=np.int32)
    labels: list[str] = []
    out: dict[str, np.ndarray] = {}
    budget = n
    for label, idx in class_dict.items():
        if not isinstance(label, str) or not label.isprintable() or not 0 < len(label) <= 200:
            raise UserError(f"'{path}': class_dict has the key {_label(label)}; class labels "
                            f"must be strings such as 'n01532829'")
        where = f"'{path}': class_dict[{_label(label)}]"
        arr = _indices(idx, n, budget, where)
        taken = owner[arr]
        if (taken >= 0).any():
            i = int(arr[np.argmax(taken >= 0)])
            raise UserError(f"'{path}': image {i} is in two classes, "
                            f"{_label(labels[owner[i]])} and {_label(label)}")
        owner[arr] = len(labels)
        labels.append(label)
        out[label] = arr
        budget -= len(arr)
    return data, out


def read_pickle(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(image_data (N, H, W, 3) uint8, {label: indices})`` of one mini-ImageNet pickle.

    Whatever the file holds, the result is this or a one-line UserError: only numpy arrays,
    dicts, lists, numbers and strings are rebuilt, nothing can allocate more than the file holds,
    and the indices are checked (integers, in range, no repeats, no image in two classes)
    before they are used.
    """
    sniff(path, "a mini-ImageNet pickle")
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            obj = _ArrayUnpickler(f, file_size).load()
        return _check_pickle(obj, path, file_size)
    except UserError:
        raise
    except _Forbidden as exc:
        raise UserError(f"'{path}' is not a mini-ImageNet pickle (it references "
                        f"{_one_line(exc)}); refusing to load it, download the file again") from None
    except MemoryError:
        raise UserError(f"not enough memory to unpickle '{path}'; free memory or use the "
                        f"images/ + CSV form") from None
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, ... = truncated/corrupt
        raise UserError(f"'{path}' is truncated or not a pickle ({type(exc).__name__}: "
                        f"{_one_line(exc)}); download it again") from None


def _resize_hwc(block: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS))
                     for im in block])


def _build_from_pickles(src: PickleSource, size: int, tmp: Path) -> dict:
    """Unpickle one split at a time, append its (class-sorted) images to a raw file, then
    write the final .npy (memory stays at about one split's pickle)."""
    raw = tmp.with_name(tmp.name + ".raw")
    groups: list[list] = []
    n = 0
    try:
        with open(raw, "wb") as out:
            owner: dict[str, str] = {}
            for split in SPLITS:
                data, class_dict = read_pickle(src.files[split])
                for label in sorted(class_dict):
                    if label in owner:
                        raise UserError(f"class {label!r} is in both the {owner[label]} and the "
                                        f"{split} pickle of '{src.root}'; the splits overlap")
                    owner[label] = split
                    block = data[class_dict[label]]
                    if block.shape[1:3] != (size, size):
                        block = _resize_hwc(block, size)
                    out.write(np.ascontiguousarray(block.transpose(0, 3, 1, 2)).tobytes())
                    groups.append([split, label, len(block)])
                    n += len(block)
                del data, class_dict
        shape = (n, 3, size, size)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        source = np.memmap(raw, dtype=np.uint8, mode="r", shape=shape)
        for s in range(0, n, 2048):
            arr[s:s + 2048] = source[s:s + 2048]
        arr.flush()
        del arr, source
    finally:
        if raw.exists():
            raw.unlink()
    return {"groups": groups}


def _load_pickles(src: PickleSource, size: int) -> tuple[Layout, np.ndarray, list[np.ndarray]]:
    files = [src.files[s] for s in SPLITS]
    signature = file_signature(src.root, files, "pickles")
    key = {"root": str(src.root), "size": size, "format": "pickle"}
    decoded_dir()
    images, info = load_or_build("miniimagenet", key, signature,
                                 lambda tmp: _build_from_pickles(src, size, tmp))
    classes: list[tuple[str, list[Path]]] = []
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    per_class, start = [], 0
    for split, label, count in info["groups"]:
        splits[split].append(len(classes))
        classes.append((label, []))
        per_class.append(np.arange(start, start + count))
        start += count
    return Layout("miniimagenet", src.root, src.description, classes, splits), images, per_class


# --------------------------------------------------------------------------- loader


def decode_args(spec: DataSpec) -> dict:
    """How image files are decoded (also the cache identity): RGB, resized."""
    return {"size": spec.image_size, "channels": 3}


def load_miniimagenet(spec: DataSpec) -> FewShotData:
    """Registry loader: mini-ImageNet as FewShotData (memory-mapped uint8, 3×84×84)."""
    source = scan_miniimagenet(spec)
    size = spec.image_size
    if isinstance(source, PickleSource):
        layout, images, per_class = _load_pickles(source, size)
    else:
        layout = source
        images, per_class, _ = load_layout(layout, "miniimagenet", **decode_args(spec))
    data = to_fewshot(layout, images, per_class, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if spec.augment:
        data.augment = partial(crop_flip, padding=max(1, round(8 * size / 84)))
    return data

