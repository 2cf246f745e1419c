"""Contact sheets: rows are classes, columns are examples of that class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sparsemeta.data.base import FewShotData
from sparsemeta.foundations.atomic import atomic_write
from sparsemeta.foundations.errors import UserError

#: image formats a contact sheet (8-bit grey or RGB) is written in, if this Pillow can write them
FORMATS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pdf")


def supported_suffixes() -> tuple[str, ...]:
    """The suffixes of :data:`FORMATS` that the installed Pillow can write."""
    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    return tuple(ext for ext in FORMATS if ext in writable)


def check_out(out: str | Path) -> Path:
    """``out`` if its suffix is a format the sheet can be written in, else a one-line UserError
    listing the supported suffixes. Cheap: call it before loading any data."""
    out = Path(out)
    suffixes = supported_suffixes()
    if out.suffix.lower() not in suffixes:
        got = f"'{out.suffix}'" if out.suffix else "no suffix"
        raise UserError(f"--out '{out}' has {got}; a contact sheet can be written as "
                        f"{', '.join(suffixes)}")
    return out


def contact_sheet(data: FewShotData, split: str, out: str | Path, classes: int = 12,
                  per_class: int = 20, pad: int = 2) -> np.ndarray:
    """Write an image grid (format from the suffix of ``out``, see :func:`check_out`) of the
    first ``classes`` classes of ``split``; return the grid array."""
    out = check_out(out)
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
    try:  # through a temporary file: a failed save leaves no torn image at ``out``
        fmt = Image.registered_extensions()[out.suffix.lower()]
        atomic_write(out, lambda fh: img.save(fh, format=fmt))
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc).split())
        raise UserError(f"cannot write '{out}': {reason}") from None
    return grid
