"""Your own images: ``root/CLASS_NAME/*.{png,jpg,jpeg}``, one folder per class.

Splits by class, either from a split file or seeded:

* ``data.split_file`` (or ``root/splits.json`` when present): JSON ``{"train": [class names],
  "val": [...], "test": [...]}``; a relative path is looked up in the working directory, then
  in the root. Classes not listed are left out.
* otherwise a seeded shuffle of the classes (``data.seed``): ``data.val_fraction`` (0.2) and
  ``data.test_fraction`` (0.2) of the classes, at least one each, the rest meta-train.

Images are resized (Lanczos, squashed to a square) to ``data.image_size``; ``data.channels``
(1 or 3) or, when unset, 3 if any image has colour else 1. EXIF orientation is honoured.
Normalisation uses the per-channel mean and std of the whole folder, computed once when the
cache is built.
"""

from __future__ import annotations

from pathlib import Path

from sparsemeta.data.base import SPLITS, FewShotData
from sparsemeta.data.cache import (
    Layout,
    list_dirs,
    list_images,
    load_layout,
    require_root,
    to_fewshot,
)
from sparsemeta.data.spec import DataSpec
from sparsemeta.foundations import streams
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.safeio import read_json

EXPECTED = "one folder per class: ROOT/CLASS_NAME/*.png|jpg|jpeg"
SPLIT_FILE = "splits.json"


def seeded_split(n: int, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Class indices per split from a seeded shuffle; at least one class in each split."""
    if n < 3:
        raise UserError(f"only {n} class folder(s) found; a train/val/test split needs at least 3")
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise UserError(
            f"data.val_fraction + data.test_fraction leave no meta-train class of {n}; lower them"
        )
    order = streams.rng(streams.FOLDER_CLASS_SPLIT, seed).permutation(n)
    return {"val": sorted(order[:n_val].tolist()),
            "test": sorted(order[n_val:n_val + n_test].tolist()),
            "train": sorted(order[n_val + n_test:].tolist())}


def _split_path(spec: DataSpec, root: Path) -> Path | None:
    given = spec.split_file
    if not given:
        default = root / SPLIT_FILE
        return default if default.is_file() else None
    path = Path(given).expanduser()
    for cand in (path, root / path):
        if cand.is_file():
            return cand
    raise UserError(f"data.split_file '{given}' does not exist (looked in the working directory and "
                    f"in '{root}')")


def read_split_file(path: Path, names: list[str]) -> dict[str, list[int]]:
    """Class indices per split from a JSON ``{split: [class names]}`` file."""
    raw = read_json(path, what=f"split file '{path}'")
    if not isinstance(raw, dict) or set(raw) - set(SPLITS) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in raw.values()):
        raise UserError(f"split file '{path}' must be a JSON object mapping train, val and test to "
                        "lists of class folder names")
    index = {n: i for i, n in enumerate(names)}
    seen: dict[str, str] = {}
    out: dict[str, list[int]] = {}
    for split in SPLITS:
        listed = raw.get(split) or []
        if not listed:
            raise UserError(f"split file '{path}' lists no '{split}' classes; every split needs at least one")
        missing = [c for c in listed if c not in index]
        if missing:
            raise UserError(f"split file '{path}' names {len(missing)} class(es) with no image folder "
                            f"under the root (first: '{missing[0]}'); fix the file or add the folder")
        for c in listed:
            if c in seen and seen[c] != split:
                raise UserError(f"split file '{path}' puts class '{c}' in both {seen[c]} and {split}")
            seen[c] = split
        out[split] = sorted({index[c] for c in listed})
    return out


def scan_folder(spec: DataSpec) -> Layout:
    """Check the layout, list every class folder and split the classes (no decoding)."""
    root = require_root(spec.root, "folder", EXPECTED)
    classes = []
    for d in list_dirs(root):
        files = list_images(d)
        if files:
            classes.append((d.name, files))
    if not classes:
        loose = list_images(root)
        hint = (f"found {len(loose)} image(s) directly in the root; put each class in its own "
                f"sub-folder" if loose else f"expected {EXPECTED}")
        raise UserError(f"'{root}' has no class folders with images; {hint}")
    names = [n for n, _ in classes]
    split_path = _split_path(spec, root)
    seed = spec.seed
    if split_path is not None:
        splits = read_split_file(split_path, names)
        desc = f"class folders in '{root}', split from '{split_path}'"
    else:
        vf, tf = spec.val_fraction, spec.test_fraction
        splits = seeded_split(len(classes), seed, vf, tf)
        desc = f"class folders in '{root}', seeded split by class (data.seed={seed}, val {vf}, test {tf})"
    return Layout("folder", root, desc, classes, splits)


def decode_args(spec: DataSpec) -> dict:
    """How folder images are decoded (also the cache identity)."""
    assert spec.channels in (None, 1, 3), spec.channels  # checked with the config
    return {"size": spec.image_size, "channels": spec.channels, "exif": True, "stats": True}


def load_folder(spec: DataSpec) -> FewShotData:
    """Registry loader: the user's class folders as FewShotData (memory-mapped uint8)."""
    layout = scan_folder(spec)
    images, per_class, info = load_layout(layout, "folder", **decode_args(spec))
    return to_fewshot(layout, images, per_class, mean=tuple(info["mean"]), std=tuple(info["std"]))
