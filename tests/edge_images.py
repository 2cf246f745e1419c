"""Class folders of grey PNGs for the edge runtime's tests (NumPy and Pillow only, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def image_folder(root: Path, classes: int, per_class: int, size: int = 28, seed: int = 0,
                 prefix: str = "class_") -> Path:
    """``root/<prefix><a, b, …>/<i>.png``: each class a random pattern plus per-image noise,
    learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        proto = rng.integers(0, 256, size=(size, size))
        folder = root / f"{prefix}{chr(97 + c)}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(proto + rng.normal(0, 30, size=(size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    return root
