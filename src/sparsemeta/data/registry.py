"""Data sets by name: ``load_data(cfg)`` returns the ``FewShotData`` a config asks for."""

from __future__ import annotations

import numpy as np

from sparsemeta.data.base import FewShotData, cache_dir
from sparsemeta.data.folder import load_folder
from sparsemeta.data.miniimagenet import load_miniimagenet
from sparsemeta.data.omniglot import load_omniglot
from sparsemeta.foundations import streams
from sparsemeta.foundations.errors import UserError

# Glyph alphabets per split (by alphabet, so no alphabet's style leaks into test).
GLYPH_SPLIT = (0.6, 0.2, 0.2)


def split_by_group(groups: np.ndarray, seed: int, fractions=GLYPH_SPLIT) -> dict[str, np.ndarray]:
    """Partition class indices by their group (alphabet) into train/val/test, seeded and fixed."""
    unique = np.unique(groups)
    order = streams.rng(streams.GLYPH_ALPHABET_SPLIT, seed).permutation(unique)
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    return {s: np.flatnonzero(np.isin(groups, g)) for s, g in parts.items()}


def load_glyphs(cfg) -> FewShotData:  # noqa: ANN001
    from sparsemeta.data.glyphs import GlyphSpec, load_or_generate

    spec = GlyphSpec(seed=cfg.data.seed, image_size=cfg.data.image_size)
    images, alphabet = load_or_generate(spec, cache_dir(cfg.data.root))
    n_classes, drawers = images.shape[:2]
    flat = images.reshape(n_classes * drawers, 1, *images.shape[2:])
    per_split = split_by_group(np.asarray(alphabet), cfg.data.seed)
    classes = {
        s: [np.arange(c * drawers, (c + 1) * drawers) for c in idx] for s, idx in per_split.items()
    }
    names = {s: [f"alphabet{int(alphabet[c]):02d}/char{int(c):04d}" for c in idx]
             for s, idx in per_split.items()}
    return FewShotData("glyphs", flat, classes, names, mean=(0.0,), std=(1.0,))


LOADERS = {"glyphs": load_glyphs, "omniglot": load_omniglot,
           "miniimagenet": load_miniimagenet, "folder": load_folder}


def load_data(cfg) -> FewShotData:  # noqa: ANN001
    name = cfg.data.name
    if name not in LOADERS:
        raise UserError(
            f"unknown data set '{name}'; available: {', '.join(sorted(LOADERS))}"
        )
    data = LOADERS[name](cfg)
    if data.image_size != cfg.data.image_size:
        raise UserError(
            f"data.image_size={cfg.data.image_size} but '{name}' images are {data.image_size} px"
        )
    return data
