"""Data sets by name: ``load_data(spec)`` returns the ``FewShotData`` a ``DataSpec`` asks for.

The registry maps each name to the module of its loader, imported only when that data set is
loaded, so reading the names (the config does, to check ``data.name``) costs no import of
Pillow or of any loader.
"""

from __future__ import annotations

import importlib

import numpy as np

from sparsemeta.data.base import FewShotData, cache_dir
from sparsemeta.data.spec import DataSpec
from sparsemeta.foundations import streams
from sparsemeta.foundations.errors import UserError

# Glyph alphabets per split (by alphabet, so no alphabet's style leaks into test).
GLYPH_SPLIT = (0.6, 0.2, 0.2)

#: data set name → (module, loader function); the module is imported on first use
LOADERS = {
    "glyphs": ("sparsemeta.data.registry", "load_glyphs"),
    "omniglot": ("sparsemeta.data.omniglot", "load_omniglot"),
    "miniimagenet": ("sparsemeta.data.miniimagenet", "load_miniimagenet"),
    "folder": ("sparsemeta.data.folder", "load_folder"),
}
NAMES = tuple(LOADERS)


def split_by_group(groups: np.ndarray, seed: int, fractions=GLYPH_SPLIT) -> dict[str, np.ndarray]:
    """Partition class indices by their group (alphabet) into train/val/test, seeded and fixed."""
    unique = np.unique(groups)
    order = streams.rng(streams.GLYPH_ALPHABET_SPLIT, seed).permutation(unique)
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    return {s: np.flatnonzero(np.isin(groups, g)) for s, g in parts.items()}


def load_glyphs(spec: DataSpec) -> FewShotData:
    from sparsemeta.data.glyphs import GlyphSpec, load_or_generate

    glyphs = GlyphSpec(seed=spec.seed, image_size=spec.image_size)
    images, alphabet = load_or_generate(glyphs, cache_dir(spec.root))
    n_classes, drawers = images.shape[:2]
    flat = images.reshape(n_classes * drawers, 1, *images.shape[2:])
    per_split = split_by_group(np.asarray(alphabet), spec.seed)
    classes = {
        s: [np.arange(c * drawers, (c + 1) * drawers) for c in idx] for s, idx in per_split.items()
    }
    names = {s: [f"alphabet{int(alphabet[c]):02d}/char{int(c):04d}" for c in idx]
             for s, idx in per_split.items()}
    return FewShotData("glyphs", flat, classes, names, mean=(0.0,), std=(1.0,))


def load_data(spec: DataSpec) -> FewShotData:
    """The data set ``spec`` names, at ``spec.image_size``."""
    if spec.name not in LOADERS:  # a config checks the name; a hand-built spec may not
        raise UserError(f"unknown data set '{spec.name}'; available: {', '.join(sorted(NAMES))}")
    module, loader = LOADERS[spec.name]
    data = getattr(importlib.import_module(module), loader)(spec)
    if data.image_size != spec.image_size:
        raise UserError(
            f"data.image_size={spec.image_size} but '{spec.name}' images are {data.image_size} px"
        )
    return data
