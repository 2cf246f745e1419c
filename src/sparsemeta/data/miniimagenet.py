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
   pickle cannot run code.

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
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from sparsemeta.data.base import SPLITS, FewShotData
from sparsemeta.data.cache import (
    Layout,
    check_tasks,
    decoded_dir,
    file_signature,
    list_dirs,
    list_images,
    load_layout,
    load_or_build,
    require_root,
    to_fewshot,
)
from sparsemeta.foundations.errors import UserError

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
    """Reject an empty file or an HTML page saved in place of the data."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
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
    with os.scandir(images_dir) as it:
        present = {e.name for e in it if not e.name.startswith(".")}
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
            if (root / n).is_file():
                found[split] = root / n
                break
    return found


def scan_miniimagenet(cfg) -> Layout | PickleSource:  # noqa: ANN001
    """Detect the form under data.root and list it (no decoding, no unpickling)."""
    root = require_root(cfg, "miniimagenet", EXPECTED)
    images_dir = root / "images"
    if images_dir.is_dir():
        csvs = [root / f"{s}.csv" for s in SPLITS]
        have = [p.is_file() for p in csvs]
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


class _Forbidden(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; refuses anything else."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in _ALLOWED:
            raise _Forbidden(f"{module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy >= 2 (no warning)
        return super().find_class(module, name)


def read_pickle(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(image_data (N, H, W, 3) uint8, {label: indices})`` of one mini-ImageNet pickle."""
    sniff(path, "a mini-ImageNet pickle")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except _Forbidden as exc:
        raise UserError(f"'{path}' is not a mini-ImageNet pickle (it references {exc}); refusing "
                        f"to load it, download the file again") from None
    except MemoryError:
        raise UserError(f"not enough memory to unpickle '{path}'; free memory or use the "
                        f"images/ + CSV form") from None
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, ... = truncated/corrupt
        raise UserError(f"'{path}' is truncated or not a pickle ({type(exc).__name__}: "
                        f"{str(exc)[:80]}); download it again") from None
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    data = obj.get("image_data") if isinstance(obj, dict) else None
    class_dict = obj.get("class_dict") if isinstance(obj, dict) else None
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4
            or data.shape[-1] != 3 or not isinstance(class_dict, dict) or not class_dict):
        shape = getattr(data, "shape", None)
        raise UserError(f"'{path}' is not a mini-ImageNet pickle: expected a dict with image_data "
                        f"(N, 84, 84, 3) uint8 and class_dict, found {keys} (image_data {shape})")
    out = {}
    for label, idx in class_dict.items():
        arr = np.asarray(idx, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= len(data)):
            raise UserError(f"'{path}': class_dict['{label}'] points outside image_data; download "
                            f"the file again")
        out[str(label)] = arr
    return data, out


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
            for split in SPLITS:
                data, class_dict = read_pickle(src.files[split])
                for label in sorted(class_dict):
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


def decode_args(cfg) -> dict:  # noqa: ANN001
    """How image files are decoded (also the cache identity): RGB, resized."""
    return {"size": cfg.data.image_size, "channels": 3}


def load_miniimagenet_unchecked(cfg) -> FewShotData:  # noqa: ANN001
    source = scan_miniimagenet(cfg)
    size = cfg.data.image_size
    if isinstance(source, PickleSource):
        layout, images, per_class = _load_pickles(source, size)
    else:
        layout = source
        images, per_class, _ = load_layout(layout, "miniimagenet", **decode_args(cfg))
    data = to_fewshot(layout, images, per_class, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if cfg.data.augment:
        data.augment = partial(crop_flip, padding=max(1, round(8 * size / 84)))
    return data


def load_miniimagenet(cfg) -> FewShotData:  # noqa: ANN001
    """Registry loader: mini-ImageNet as FewShotData (memory-mapped uint8, 3×84×84)."""
    return check_tasks(load_miniimagenet_unchecked(cfg), cfg)
