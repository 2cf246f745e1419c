"""One interface for every data set: a uint8 image array plus per-split class index lists.

Images stay uint8 (memory-mapped where the loader can), and only the examples of one task are
converted to float, so no float copy of a whole data set ever lives in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsemeta.foundations.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class FewShotData:
    """Images ``(N, C, H, W)`` uint8 and, per split, one index array into them per class."""

    name: str
    images: np.ndarray
    classes: dict[str, list[np.ndarray]]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
    """Meta-training augmentation of a uint8 batch (n, C, H, W), e.g. crop + flip."""

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def check_disjoint(self) -> None:
        """Meta-train, validation and test classes must never share an image."""
        seen: dict[int, str] = {}
        for split, per_class in self.classes.items():
            for idx in per_class:
                for i in idx.tolist():
                    if i in seen and seen[i] != split:
                        raise ValueError(f"image {i} is in both {seen[i]} and {split}")
                    seen[i] = split

    def counts(self) -> dict[str, tuple[int, int]]:
        """(classes, images) per split."""
        return {s: (len(c), int(sum(len(i) for i in c))) for s, c in self.classes.items()}


def cache_dir(root: str | None = None) -> Path:
    """Where generated and decoded data live: ``root``, $SPARSEMETA_CACHE, or the user cache."""
    if root:
        path = Path(root).expanduser()
    elif os.environ.get("SPARSEMETA_CACHE"):
        path = Path(os.environ["SPARSEMETA_CACHE"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "sparsemeta"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create cache directory '{path}' ({exc.strerror}); set data.root to a writable directory"
        ) from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cache directory '{path}' is not writable; set data.root to a writable directory")
    return path
