"""Named random streams: every seeded draw outside the task sampler and the glyph generator.

Two kinds of stream live here:

* **NumPy streams** ``np.random.default_rng([seed, TAG, *index])``: the tag says what the stream
  draws, the seed is the config's, the index says which draw (task, step, iteration). Build them
  with :func:`rng`. The tags must stay pairwise different from each other and from the other
  tags at the same position — the task sampler's split index 0/1/2 (``data/tasks.py``), the
  glyph generator's 1/2/3 (``data/glyphs.py``) and Omniglot's class-split tag 1623
  (``TOTAL_CHARACTERS``, ``data/omniglot.py``). Mind that NumPy pads a short entropy list with
  zeros up to four words: ``[s, t]``, ``[s, t, 0]`` and ``[s, t, 0, 0]`` are the same stream,
  so streams are told apart by their tag, never by their length.
* **Torch seeds of a sparsity experiment** :func:`level_seed` ``(kind, seed, level)``: one seed
  per purpose, experiment seed and pruning level, for ``torch.manual_seed`` or a
  ``torch.Generator`` (:func:`level_generator`).

The values are part of every result: changing one changes tasks, masks or initial weights, so
an old run directory would no longer match a new run. They never change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# -- NumPy stream tags: np.random.default_rng([seed, TAG, *index]) ----------------------------
METAMIX_DRAW = 7717
"""MetaMix's draws for one outer loss, index (task index, inner step): λ ~ Beta(α, β), the
permutation of the support set, and the mixing layer (seed: the config's seed)."""

CHANNEL_SHUFFLE_PLAN = 7718
"""MetaMix Channel Shuffle plan of one task, index (task index,): mixing layer, channel group
and the cyclic class map (seed: the config's seed)."""

CHANNEL_SHUFFLE_SWITCH = 7719
"""Whether a meta-iteration uses Channel Shuffle (one draw < 0.5, half of the meta-batches),
index (iteration,) (seed: the config's seed)."""

GLYPH_ALPHABET_SPLIT = 7919
"""Train/val/test partition of the glyph alphabets (seed: data.seed; no index)."""

FOLDER_CLASS_SPLIT = 4099
"""Train/val/test partition of a folder data set's classes without a split file (seed:
data.seed; no index)."""


def rng(tag: int, seed: int, *index: int) -> np.random.Generator:
    """The NumPy stream ``tag`` of ``seed`` at ``index``: ``default_rng([seed, tag, *index])``."""
    return np.random.default_rng([seed, tag, *index])


# -- Torch seeds per (purpose, experiment seed, level) -----------------------------------------
REINIT = 1
"""Kind: fresh initial weights of the 'reinit' control at a level (``torch.manual_seed``)."""

RANDOM_MASK = 2
"""Kind: random mask (random filters if structured) of a level, for the 'random' control and
the 'random' method alike, so both draw the same mask."""

RIGL_INITIAL_MASK = 3
"""Kind: RigL's random initial mask at a level's density."""

KIND_STRIDE = 1_000_003
"""Multiplier of the kind in :func:`level_seed` (a prime)."""

SEED_STRIDE = 7919
"""Multiplier of (experiment seed + 1) in :func:`level_seed` (the 1,000th prime). The same
number as :data:`GLYPH_ALPHABET_SPLIT` by chance: the two are unrelated."""

LEVEL_STRIDE = 104_729
"""Multiplier of the pruning level in :func:`level_seed` (the 10,000th prime)."""


def level_seed(kind: int, seed: int, level: int) -> int:
    """Torch seed of stream ``kind`` (:data:`REINIT`, :data:`RANDOM_MASK`,
    :data:`RIGL_INITIAL_MASK`) for experiment ``seed`` at pruning ``level``.

    A linear formula, not a hash: checked distinct over kinds 1–3, seeds 0–9,999 and levels
    0–30 (tests/test_streams.py), not beyond."""
    return KIND_STRIDE * kind + SEED_STRIDE * (seed + 1) + LEVEL_STRIDE * level


def level_generator(kind: int, seed: int, level: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`level_seed`."""
    import torch  # here, so the NumPy streams stay importable without torch

    return torch.Generator().manual_seed(level_seed(kind, seed, level))
