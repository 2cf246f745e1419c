"""Omniglot (Lake et al.) in its original layout, with the standard MAML class split.

``data.root`` holds ``images_background/`` (30 alphabets, 964 characters) and
``images_evaluation/`` (20 alphabets, 659 characters), each ``ALPHABET/characterNN/*.png``
(105×105, black ink on white, 20 drawers per character) — what the official archives unpack to
(``sparsemeta data download omniglot --root DIR``). A torchvision-style ``omniglot-py/`` folder
inside the root is found too.

Images are inverted to **ink 255 on background 0** (like the glyph set and MAML's own loader),
resized with Lanczos to ``data.image_size`` (28 by default) and cached as uint8 (see cache.py).

Splits (``data.split``), fixed for a given ``data.seed``:

* ``maml`` (default, Finn et al. 2017): all 1,623 characters are shuffled; 1,200 are meta-train
  of which 100 are carved out for validation (1,100 / 100), the remaining 423 are meta-test.
* ``background``: meta-train and validation from ``images_background`` (100 validation
  characters carved out, seeded), meta-test = ``images_evaluation``.

On a tree of another size (e.g. test fixtures) the counts scale proportionally (1200/1623 and
100/1623 of all characters). Rotations by 90° as new classes are applied by the task sampler
(``data.rotations``), on meta-train only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsemeta.data.base import FewShotData
from sparsemeta.data.cache import (
    Layout,
    list_dirs,
    list_images,
    load_layout,
    require_root,
    to_fewshot,
)
from sparsemeta.data.spec import DataSpec
from sparsemeta.foundations.errors import UserError

PARTS = ("images_background", "images_evaluation")
TOTAL_CHARACTERS = 1623
MAML_TRAIN = 1200
VALIDATION = 100
SPLIT_MODES = ("maml", "background")
EXPECTED = "images_background/ and images_evaluation/ (ALPHABET/characterNN/*.png)"


def _base(root: Path) -> Path:
    """The directory holding the two parts: the root itself or a known sub-folder of it."""
    for cand in (root, root / "omniglot-py", root / "omniglot", root / "python"):
        if all((cand / p).is_dir() for p in PARTS):
            return cand
    return root


def _characters(part_dir: Path, root: Path) -> list[tuple[str, list[Path]]]:
    out = []
    for alphabet in list_dirs(part_dir):
        for char in list_dirs(alphabet):
            pngs = [p for p in list_images(char) if p.suffix.lower() == ".png"]
            if pngs:
                out.append((f"{part_dir.name}/{alphabet.name}/{char.name}", pngs))
    if not out:
        nested = part_dir / part_dir.name
        if nested.is_dir():
            raise UserError(
                f"'{part_dir}' contains another '{part_dir.name}/' (unpacked one level too deep); "
                f"move its contents up so that '{part_dir}/ALPHABET/characterNN/*.png' exist"
            )
        raise UserError(
            f"'{part_dir}' has no ALPHABET/characterNN/*.png images; expected the original "
            f"Omniglot layout under data.root='{root}'"
        )
    return out


def split_characters(names: list[str], mode: str, seed: int) -> dict[str, list[int]]:
    """Class indices per split (see the module docstring); pure function of names, mode, seed."""
    n = len(names)
    n_val = max(1, round(n * VALIDATION / TOTAL_CHARACTERS))
    rng = np.random.default_rng([seed, TOTAL_CHARACTERS])
    if mode == "maml":
        order = rng.permutation(n)
        n_pool = round(n * MAML_TRAIN / TOTAL_CHARACTERS)
        pool, test = order[:n_pool], order[n_pool:]
    elif mode == "background":
        background = np.array([i for i, s in enumerate(names) if s.startswith(PARTS[0] + "/")])
        pool = rng.permutation(background)
        test = np.array([i for i, s in enumerate(names) if not s.startswith(PARTS[0] + "/")])
    else:
        raise UserError(f"data.split must be one of {', '.join(SPLIT_MODES)} for omniglot, got {mode!r}")
    if len(pool) <= n_val or len(test) == 0:
        raise UserError(
            f"only {n} Omniglot characters found; too few for the {mode} split (the full set "
            f"has {TOTAL_CHARACTERS}); check data.root"
        )
    return {"train": sorted(pool[n_val:].tolist()), "val": sorted(pool[:n_val].tolist()),
            "test": sorted(np.asarray(test).tolist())}


def scan_omniglot(spec: DataSpec) -> Layout:
    """Check the layout and list every character (no decoding)."""
    root = require_root(spec.root, "omniglot", EXPECTED)
    base = _base(root)
    classes: list[tuple[str, list[Path]]] = []
    for part in PARTS:
        d = base / part
        if not d.is_dir():
            archive = base / f"{part}.zip"
            if archive.is_file():
                raise UserError(
                    f"expected directory '{d}' but found only '{archive.name}'; run `sparsemeta data "
                    f"download omniglot --root {root}` to verify and unpack it"
                )
            raise UserError(
                f"expected directory '{d}' (original Omniglot layout: {part}/ALPHABET/characterNN/"
                f"*.png); run `sparsemeta data download omniglot --root {root}` or point data.root "
                f"at the folder containing {PARTS[0]}/ and {PARTS[1]}/"
            )
        classes += _characters(d, root)
    mode, seed = spec.split, spec.seed
    splits = split_characters([c for c, _ in classes], mode, seed)
    desc = f"original Omniglot layout in '{base}', {mode} split (data.seed={seed})"
    return Layout("omniglot", base, desc, classes, splits)


def decode_args(spec: DataSpec) -> dict:
    """How Omniglot files are decoded (also the cache identity): grey, inverted, resized."""
    return {"size": spec.image_size, "channels": 1, "invert": True}


def load_omniglot(spec: DataSpec) -> FewShotData:
    """Registry loader: Omniglot as FewShotData (memory-mapped uint8, ink 255 on 0)."""
    layout = scan_omniglot(spec)
    images, per_class, _ = load_layout(layout, "omniglot", **decode_args(spec))
    return to_fewshot(layout, images, per_class, mean=(0.0,), std=(1.0,))
