"""The data layer's own typed view of a run: which data set (``DataSpec``) and which episodes
(``TaskSpec``).

Why not the config object: the data layer sits below the config, so it cannot import the
config's types, and a loader that takes the whole config can read (and come to depend on) any
section. ``Config.data_spec`` and ``Config.task_spec`` build these once; the loaders, the task
sampler and the one tasks-fit check take only them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """Which data set, where, and how its images and class splits are made (the config's
    ``data`` section without the task shape; no defaults here: the config's are the only ones)."""

    name: str
    root: str | None
    image_size: int
    seed: int
    """Seed of the generated glyph set and of the omniglot/folder class splits (not of tasks)."""
    split: str
    """Omniglot's class split ('maml' or 'background')."""
    split_file: str | None
    val_fraction: float
    test_fraction: float
    channels: int | None
    augment: bool
    """mini-ImageNet's meta-training crop + flip."""


@dataclass(frozen=True)
class TaskSpec:
    """N-way K-shot episodes with Q queries per class; task *i* of a split is a function of
    ``(seed, split, i)``. Augmentation (rotations as new classes, shifts) is meta-train only."""

    ways: int
    shots: int
    queries: int
    """Queries per class of a meta-training task."""
    eval_queries: int | None
    """Queries per class of a validation or test task (None: ``queries``)."""
    seed: int
    rotations: bool
    shift: int

    def queries_in(self, split: str) -> int:
        return self.queries if split == "train" or self.eval_queries is None \
            else self.eval_queries

    def rotations_in(self, split: str) -> int:
        """Classes per source class: 4 with rotations on meta-train, else 1."""
        return 4 if self.rotations and split == "train" else 1

    def queries_key(self, split: str) -> str:
        """The config key that sets ``queries_in(split)`` (for messages)."""
        return "data.queries" if split == "train" or self.eval_queries is None \
            else "eval.queries"
