"""Local images for the edge runtime: ``root/CLASS_NAME/*.png|jpg|jpeg``, decoded with Pillow.

The same decoding as ``sparsemeta.data.cache.decode_image`` (EXIF orientation, grey or RGB,
optional inversion for Omniglot-style ink, Lanczos resize squashed to a square) so that a model
sees on the device what it saw in meta-training — without importing sparsemeta or torch.
Images stay uint8 until a batch is used: a float copy of a whole data set never exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparsemeta_edge.smz import EdgeError

SUFFIXES = (".png", ".jpg", ".jpeg")
EXPECTED = "one folder per class: ROOT/CLASS_NAME/*.png|jpg|jpeg"


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))


def scan(root: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """Class folders (sorted by name) with their image files; a clear error for a bad layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EdgeError(f"data folder '{root}' does not exist or is not a directory ({EXPECTED})")
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images_in(d)
        if files:
            classes.append((d.name, files))
    if not classes:
        loose = _images_in(root)
        hint = (f"found {len(loose)} image(s) directly in it; put each class in its own sub-folder"
                if loose else f"expected {EXPECTED}")
        raise EdgeError(f"'{root}' has no class folders with images; {hint}")
    if len(classes) < 2:
        raise EdgeError(f"'{root}' has only one class folder ('{classes[0][0]}'); "
                        "classification needs at least 2")
    return classes


def decode(path: str | os.PathLike, size: int, channels: int, invert: bool = False) -> np.ndarray:
    """One image file as ``(C, size, size)`` uint8."""
    from PIL import Image, ImageOps  # Pillow only where images are read

    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(mode, (size, size))
            im = ImageOps.exif_transpose(im)
            im = im.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeError(f"cannot decode image '{path}' ({reason}); replace or delete that file") from None
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


def load_folder(root: str | os.PathLike, size: int, channels: int, invert: bool = False
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a class-folder data set: uint8 (N, C, H, W), labels, class names."""
    classes = scan(root)
    paths = [p for _, files in classes for p in files]
    labels = np.concatenate([np.full(len(files), i) for i, (_, files) in enumerate(classes)])
    return decode_many(paths, size, channels, invert), labels, [n for n, _ in classes]


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
