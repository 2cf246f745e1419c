"""Local images for the edge runtime: ``root/CLASS_NAME/*.png|jpg|jpeg``, decoded with Pillow.

The same decoding as ``sparsemeta.data.cache.decode_image`` with ``exif`` on (EXIF orientation;
16- and 32-bit grey scaled to 8 bits, never clipped; any other mode — palette, with alpha,
CMYK, float — converted to grey or RGB by Pillow; optional inversion for Omniglot-style ink;
Lanczos resize squashed to a square) so that a model sees on the device what it saw in
meta-training — without importing sparsemeta or torch (``tests/test_edge_data.py`` checks the
two against each other). Images stay uint8 until a batch is used: a float copy of a whole data
set never exists. Only regular files are read (see ``sparsemeta_edge.files``).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparsemeta_edge.errors import EdgeError, printable
from sparsemeta_edge.files import not_regular, open_regular

if TYPE_CHECKING:  # Pillow is imported only where images are read
    from PIL import Image

SUFFIXES = (".png", ".jpg", ".jpeg")
EXPECTED = "one folder per class: ROOT/CLASS_NAME/*.png|jpg|jpeg"
#: a bigger file is no image a device fine-tunes on (a 24-megapixel PNG is ~70 MB)
MAX_IMAGE_BYTES = 256 << 20
#: grey modes with more than 8 bits: ``convert("L")`` would clip them at 255, so they are scaled
#: (as ``sparsemeta.data.cache.WIDE_GREY``)
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
UINT16_MAX = 65535
UINT16_TO_8 = 257  # 65535 / 255: 16-bit 65535 → 255, 32896 → 128
Classes = list[tuple[str, list[Path]]]  # (class name, its image files), sorted by name


def _listing(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError as exc:
        raise EdgeError(f"cannot read folder '{directory}' ({exc.strerror})") from None


def _images_in(directory: Path) -> list[Path]:
    """The image files of a folder; one that is a broken link, a device or a fifo is refused
    here, before any image is decoded."""
    files = []
    for p in _listing(directory):
        if p.suffix.lower() not in SUFFIXES or p.name.startswith("."):
            continue
        try:
            mode = p.stat().st_mode
        except OSError as exc:  # a broken link, or a file that vanished
            raise EdgeError(f"image file '{p}' cannot be read ({exc.strerror})") from None
        if stat.S_ISREG(mode):
            files.append(p)
        elif not stat.S_ISDIR(mode):
            raise EdgeError(not_regular(p, mode, "image file"))
    return files


def scan(root: str | os.PathLike) -> Classes:
    """Class folders (sorted by name) with their image files; a clear error for a bad layout.
    A class folder without images is refused, not skipped: it would change the classes."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise EdgeError(f"data folder '{root}' {what} ({EXPECTED})")
    folders = [p for p in _listing(root) if p.is_dir() and not p.name.startswith(".")]
    classes = [(d.name, _images_in(d)) for d in folders]
    empty = [name for name, files in classes if not files]
    if empty and len(empty) < len(classes):
        raise EdgeError(f"class folder '{root / empty[0]}' has no images (.png, .jpg, .jpeg)"
                        + (f", nor do {len(empty) - 1} other(s)" if len(empty) > 1 else "")
                        + "; add images or remove the folder (it would be a class)")
    if len(empty) == len(classes):
        loose = _images_in(root)
        hint = (f"found {len(loose)} image(s) directly in it; put each class in its own sub-folder"
                if loose else f"expected {EXPECTED}")
        raise EdgeError(f"'{root}' has no class folders with images; {hint}")
    if len(classes) < 2:
        raise EdgeError(f"'{root}' has only one class folder ('{classes[0][0]}'); "
                        "classification needs at least 2")
    return classes


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image as 8-bit ``L``, scaled rather than clipped, as
    ``sparsemeta.data.cache.to_8bit``: ``I;16*`` divided by 257; mode ``I`` too when every value
    lies in 0..65535, else its own range 0..max scaled to 0..255 (negative values become 0)."""
    from PIL import Image

    arr = np.asarray(im)
    if im.mode != "I" or (arr.size and arr.min() >= 0 and arr.max() <= UINT16_MAX):
        scaled = arr / float(UINT16_TO_8)
    else:
        top = float(arr.max()) if arr.size else 1.0
        scaled = np.clip(arr, 0, None) * (255.0 / max(top, 1.0))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _open(path: str | os.PathLike, mode: str, size: int) -> Image.Image:
    """The file's image in ``mode`` (EXIF-oriented, wide grey scaled); any defect is one
    ``EdgeError``. Pillow's decompression-bomb warning (an image of more pixels than it deems
    safe) is a refusal here: a device has no memory for it."""
    from PIL import Image, ImageOps  # Pillow only where images are read

    with open_regular(path, MAX_IMAGE_BYTES, "image file") as fh, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fh) as im:
                if im.format == "JPEG":
                    im.draft(mode, (size, size))
                im = ImageOps.exif_transpose(im)
                if im.mode in WIDE_GREY:
                    im = to_8bit(im)
                return im.convert(mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise EdgeError(f"cannot decode image '{printable(str(path))}' ({reason[:200]}); "
                            "replace or delete that file") from None


def decode(path: str | os.PathLike, size: int, channels: int, invert: bool = False) -> np.ndarray:
    """One image file as ``(C, size, size)`` uint8."""
    from PIL import Image, ImageOps

    im = _open(path, "RGB" if channels == 3 else "L", size)
    if invert:
        im = ImageOps.invert(im)
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def decode_many(paths: Sequence[str | os.PathLike], size: int, channels: int,
                invert: bool = False) -> np.ndarray:
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = decode(p, size, channels, invert)
    return out


def load_classes(classes: Classes, size: int, channels: int, invert: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images of ``scan``'s class folders: uint8 (N, C, H, W), labels, class names."""
    paths = [p for _, files in classes for p in files]
    labels = np.concatenate([np.full(len(files), i) for i, (_, files) in enumerate(classes)])
    return decode_many(paths, size, channels, invert), labels, [n for n, _ in classes]


def load_folder(root: str | os.PathLike, size: int, channels: int, invert: bool = False
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a class-folder data set: uint8 (N, C, H, W), labels, class names."""
    return load_classes(scan(root), size, channels, invert)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``images / 255`` (as the folder loader computes them)."""
    x = images.reshape(images.shape[0], images.shape[1], -1)
    mean = np.zeros(images.shape[1])
    sq = np.zeros(images.shape[1])
    for i in range(0, len(x), 256):  # float64 accumulators, one chunk at a time
        chunk = x[i:i + 256].astype(np.float64) / 255.0
        mean += chunk.sum(axis=(0, 2))
        sq += np.square(chunk).sum(axis=(0, 2))
    count = max(x.shape[0] * x.shape[2], 1)
    mean /= count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    std = np.where(std < 1e-3, 1.0, std)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def to_float(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
             dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A uint8 batch as the network's input: (x / 255 − mean) / std per channel."""
    m = np.asarray(mean, dtype=dtype).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=dtype).reshape(1, -1, 1, 1)
    x = images.astype(dtype)
    x /= 255.0
    x -= m
    x /= s
    return x
