"""The edge runtime decodes an image file to the same uint8 array as the main package's loader
(``sparsemeta.data.cache.decode_image`` with EXIF on, as the folder loader uses it): 16- and
32-bit grey scaled (not clipped to white), float, palette with transparency, alpha, CMYK,
bilevel, EXIF-rotated JPEG, to grey and to RGB, inverted or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsemeta.data.cache import DecodeSpec, decode_image
from sparsemeta_edge.data import decode
from sparsemeta_edge.errors import EdgeError

SIZE = 16  # sources are 20×24: every case is resized (and squashed) too
EXIF_ORIENTATION = 0x0112


def _gradient(dtype: type, top: float, bottom: float = 0.0) -> np.ndarray:
    """A 24×20 ramp from ``bottom`` to ``top`` with a diagonal stripe (orientation shows)."""
    ramp = np.linspace(bottom, top, 24 * 20).reshape(24, 20)
    ramp[np.arange(20), np.arange(20)] = top
    return ramp.astype(dtype)


def _rgba() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 20, 4), dtype=np.uint8)


def _images(root: Path) -> dict[str, Path]:
    """One file per kind of image the loaders must agree on."""
    made = {
        "16-bit grey PNG (I;16)": ("g16.png", Image.fromarray(_gradient(np.uint16, 65535))),
        "32-bit grey TIFF within 16 bits (I)": (
            "i32.tif", Image.fromarray(_gradient(np.int32, 65535))),
        "32-bit grey TIFF beyond 16 bits, negatives (I)": (
            "i32big.tif", Image.fromarray(_gradient(np.int32, 10**6, -5000))),
        "float TIFF (F)": ("f.tif", Image.fromarray(_gradient(np.float32, 300.0, -20.0))),
        "grey with alpha (LA)": ("la.png", Image.fromarray(_rgba()[..., :2], mode="LA")),
        "RGBA": ("rgba.png", Image.fromarray(_rgba(), mode="RGBA")),
        "CMYK JPEG": ("cmyk.jpg", Image.fromarray(_rgba(), mode="CMYK")),
        "bilevel (1)": ("bw.png", Image.fromarray(_gradient(np.uint8, 255)).convert("1")),
        "grey JPEG (L)": ("l.jpg", Image.fromarray(_gradient(np.uint8, 255))),
    }
    palette = Image.fromarray(_rgba()[..., :3]).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    made["palette with transparency (P)"] = ("p.png", palette)
    out = {}
    for kind, (name, image) in made.items():
        image.save(root / name, **({"transparency": 3} if name == "p.png" else {}))
        out[kind] = root / name
    rotated = Image.fromarray(_rgba()[..., :3])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90° clockwise on display
    rotated.save(root / "exif.jpg", exif=exif.tobytes())
    out["EXIF-rotated RGB JPEG"] = root / "exif.jpg"
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return _images(tmp_path_factory.mktemp("modes"))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("invert", [False, True])
def test_every_image_mode_decodes_as_the_main_loader_does(images, channels, invert):
    for kind, path in images.items():
        want = decode_image(path, DecodeSpec(SIZE, channels, invert, exif=True))
        got = decode(path, SIZE, channels, invert)
        assert got.dtype == np.uint8 and got.shape == (channels, SIZE, SIZE), kind
        np.testing.assert_array_equal(got, want, err_msg=kind)


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    """65535 → 255, 32896 → 128 (÷ 257): a 16-bit ramp keeps its mid-greys; ``convert('L')``
    alone would clip everything above 255 to white."""
    flat = np.full((SIZE, SIZE), 32896, np.uint16)
    flat[0, 0] = 65535
    Image.fromarray(flat).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    got = decode(tmp_path / "g.png", SIZE, 1)
    assert got[0, 0, 0] == 255 and (got[0].ravel()[1:] == 128).all()
    np.testing.assert_array_equal(
        got, decode_image(tmp_path / "g.png", DecodeSpec(SIZE, 1, exif=True)))


def test_an_image_beyond_pillows_pixel_limit_is_refused_in_one_line(tmp_path, monkeypatch):
    """Pillow only warns between its pixel limit and twice it (and then decodes, using the
    memory); on a device that warning is a refusal."""
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: a warning, not an error
    with pytest.raises(EdgeError, match="cannot decode image .*big.png") as err:
        decode(tmp_path / "big.png", SIZE, 1)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: Pillow's error
    with pytest.raises(EdgeError, match="cannot decode image"):
        decode(tmp_path / "big.png", SIZE, 1)
