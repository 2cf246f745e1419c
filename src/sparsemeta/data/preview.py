"""Contact sheets: rows are classes, columns are examples of that class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sparsemeta.data.base import FewShotData
from sparsemeta.foundations.errors import UserError


def contact_sheet(data: FewShotData, split: str, out: str | Path, classes: int = 12,
                  per_class: int = 20, pad: int = 2) -> np.ndarray:
    """Write a PNG grid of the first ``classes`` classes of ``split``; return the grid array."""
    per_split = data.classes[split]
    if classes < 1 or per_class < 1:
        raise UserError("--classes and --per-class must be >= 1")
    rows = per_split[:classes]
    cols = min(per_class, max(len(idx) for idx in rows))
    c, h, w = data.images.shape[1:]
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for r, idx in enumerate(rows):
        for j, i in enumerate(idx[:cols]):
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = np.transpose(data.images[i], (1, 2, 0))
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, 64 // h)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    try:
        img.save(out)
    except OSError as exc:
        raise UserError(f"cannot write '{out}': {exc.strerror or exc}") from None
    return grid
