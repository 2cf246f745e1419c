"""Small data sets written in the exact on-disk layouts of the real ones (used by the tests and,
at full size, by benchmarks/data_load.py).

* Omniglot: ``images_background/`` and ``images_evaluation/``, ``ALPHABET/characterNN/
  NNNN_DD.png``, 105×105 1-bit PNGs, black strokes on white, one prototype per character and a
  jittered copy per drawer.
* mini-ImageNet: ``images/nXXXXXXXX000000NN.jpg`` + ``train.csv``/``val.csv``/``test.csv``
  (``filename,label``), the ``mini-imagenet-cache-*.pkl`` pickles holding the same pixels, or
  ``train/ val/ test/`` class folders.
* folder: ``root/CLASS/*.png|jpg``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OMNIGLOT_SIZE = 105


def omniglot_character(seed: int, drawer: int, size: int = OMNIGLOT_SIZE) -> Image.Image:
    """A 1-bit image: black strokes (0) on white (1); strokes fixed by ``seed``, jittered by drawer."""
    proto = np.random.default_rng([seed, 0])
    strokes = proto.uniform(0.15, 0.85, size=(int(proto.integers(2, 4)), 3, 2))
    jitter = np.random.default_rng([seed, 1, drawer])
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    shift = jitter.normal(0, 0.02, 2)
    for stroke in strokes:
        pts = (stroke + shift + jitter.normal(0, 0.01, stroke.shape)).clip(0.05, 0.95) * size
        draw.line([tuple(p) for p in pts.tolist()], fill=0, width=max(2, size // 30))
    return img.convert("1")


def write_omniglot(root: Path, background: Sequence[int] = (15, 15, 15),
                   evaluation: Sequence[int] = (15, 15, 15), drawers: int = 20,
                   size: int = OMNIGLOT_SIZE) -> int:
    """Write the original layout; ``background[a]`` = characters of alphabet a. Returns #images."""
    root = Path(root)
    n, char_id = 0, 0
    for part, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        for a, chars in enumerate(alphabets):
            alpha = root / part / f"{part[7:].title()}_Alphabet_{a:02d}"
            for c in range(chars):
                d = alpha / f"character{c + 1:02d}"
                d.mkdir(parents=True, exist_ok=True)
                for k in range(drawers):
                    omniglot_character(char_id, k, size).save(d / f"{char_id + 1:04d}_{k + 1:02d}.png")
                    n += 1
                char_id += 1
    return n


def mini_wnids(counts: Sequence[int] = (6, 5, 5)) -> dict[str, list[str]]:
    """Made-up but well-formed WordNet ids per split (fixtures only)."""
    out, k = {}, 0
    for split, n in zip(("train", "val", "test"), counts):
        out[split] = [f"n{90000000 + 17 * (k + i):08d}" for i in range(n)]
        k += n
    return out


def mini_images(classes: dict[str, list[str]], per_class: int, size: int = 84,
                seed: int = 0) -> dict[str, dict[str, list[np.ndarray]]]:
    """Per split, per class, the (H, W, 3) uint8 pixels of JPEGs as Pillow decodes them."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, labels in classes.items():
        out[split] = {}
        for label in labels:
            base = rng.integers(0, 256, size=(1, 1, 3))
            ims = []
            for _ in range(per_class):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                buf.seek(0)
                ims.append((buf.getvalue(), np.asarray(Image.open(buf).convert("RGB"))))
            out[split][label] = ims
    return out


def write_mini_csv(root: Path, data: dict, csv: bool = True) -> None:
    """``images/`` (+ the three split CSVs when ``csv``) — the image-folder distribution."""
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for split, by_class in data.items():
        rows = ["filename,label"]
        for label, ims in by_class.items():
            for i, (jpeg, _) in enumerate(ims):
                name = f"{label}{i + 1:08d}.jpg"
                (images / name).write_bytes(jpeg)
                rows.append(f"{name},{label}")
        if csv:
            (Path(root) / f"{split}.csv").write_text("\n".join(rows) + "\n")


def write_mini_dirs(root: Path, data: dict) -> None:
    """``train/ val/ test/`` each with one folder of JPEGs per class."""
    for split, by_class in data.items():
        for label, ims in by_class.items():
            d = Path(root) / split / label
            d.mkdir(parents=True, exist_ok=True)
            for i, (jpeg, _) in enumerate(ims):
                (d / f"{label}{i + 1:08d}.jpg").write_bytes(jpeg)


def write_mini_pickles(root: Path, data: dict, protocol: int = 2,
                       val_name: str = "mini-imagenet-cache-val.pkl") -> dict[str, Path]:
    """``mini-imagenet-cache-*.pkl``: {'image_data': (N, H, W, 3) uint8, 'class_dict': ...}."""
    paths = {}
    for split, by_class in data.items():
        arrays, class_dict = [], {}
        for label, ims in by_class.items():
            class_dict[label] = list(range(len(arrays), len(arrays) + len(ims)))
            arrays += [px for _, px in ims]
        obj = {"image_data": np.stack(arrays), "class_dict": class_dict}
        name = val_name if split == "val" else f"mini-imagenet-cache-{split}.pkl"
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        paths[split] = path
    return paths


def write_folder(root: Path, classes: Sequence[str], per_class: int, mode: str = "RGB",
                 ext: str = ".png", size: tuple[int, int] = (40, 30), seed: int = 0) -> None:
    """``root/CLASS/img_NNN.ext``; images of one class share a colour/intensity."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = Path(root) / c
        d.mkdir(parents=True, exist_ok=True)
        channels = 3 if mode == "RGB" else 1
        base = rng.integers(0, 256, size=channels)
        for i in range(per_class):
            px = np.clip(base + rng.integers(-20, 20, size=(size[1], size[0], channels)), 0, 255)
            px = px.astype(np.uint8)
            Image.fromarray(px[..., 0] if channels == 1 else px).save(d / f"img_{i:03d}{ext}")


def zip_dir(src_root: Path, top: str, dest: Path) -> str:
    """Zip ``src_root/top`` as the official archives do (entries under ``top/``); return its md5."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted((Path(src_root) / top).rglob("*")):
            zf.write(p, p.relative_to(src_root).as_posix())
    return hashlib.md5(Path(dest).read_bytes()).hexdigest()
