"""What the data layer does with an untrusted or changing disk: 16-bit images, permission
denied, files that vanish, unwritable preview suffixes, and two processes building one cache."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsemeta.data import cache as cache_mod
from sparsemeta.data.cache import DecodeSpec, decode_image, load_layout, load_or_build, to_8bit
from sparsemeta.data.folder import load_folder, scan_folder
from sparsemeta.data.miniimagenet import load_miniimagenet
from sparsemeta.data.preview import check_out, contact_sheet, supported_suffixes
from sparsemeta.foundations.atomic import temp_path
from tests.data import fixtures as fx
from tests.data.test_real_datasets import make_spec, one_line_error

SRC = str(Path(cache_mod.__file__).parents[2])
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSEMETA_CACHE", str(cache))
    return cache / "decoded"


# --------------------------------------------------------------------------- 16-bit images

RAMP = np.array([0, 1, 128, 129, 257, 32767, 32896, 32897, 65278, 65534, 65535] + [40000] * 5,
                dtype=np.uint16)


def _grey16(path: Path) -> np.ndarray:
    """A 16×16 16-bit grey PNG whose rows repeat RAMP; returns the uint16 pixels."""
    px = np.tile(RAMP, (16, 1))
    Image.fromarray(px).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I") and np.array_equal(np.asarray(im), px)  # really 16-bit
    return px


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    px = _grey16(tmp_path / "a.png")
    grey = decode_image(tmp_path / "a.png", DecodeSpec(16, 1))[0]
    expect = np.rint(px / 257).astype(np.uint8)
    assert np.array_equal(grey, expect)
    assert grey[0, RAMP.tolist().index(65535)] == 255 and grey[0, RAMP.tolist().index(32896)] == 128
    assert grey[0, 0] == 0 and grey[0, RAMP.tolist().index(257)] == 1
    assert (grey == 255).mean() < 0.2  # the clipping bug made nearly every pixel white
    rgb = decode_image(tmp_path / "a.png", DecodeSpec(16, 3))
    assert all(np.array_equal(c, expect) for c in rgb)
    inverted = decode_image(tmp_path / "a.png", DecodeSpec(16, 1, invert=True))[0]  # Omniglot
    assert np.array_equal(inverted, 255 - expect)


def test_32bit_integer_image_is_scaled_by_its_own_max():
    im = Image.fromarray(np.array([[0, 100_000, 200_000]], dtype=np.int32), mode="I")
    assert np.asarray(to_8bit(im)).tolist() == [[0, 128, 255]]
    small = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(to_8bit(small)).tolist() == [[0, 1, 255]]


def test_folder_of_16bit_pngs_loads_as_scaled_grey(tmp_path):
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(2):
            px = _grey16(tmp_path / c / f"{i}.png")
    data = load_folder(make_spec("folder", tmp_path, image_size=16, ways=1, shots=1))
    assert data.images.shape == (6, 1, 16, 16)
    assert np.array_equal(data.images[0, 0], np.rint(px / 257).astype(np.uint8))


# --------------------------------------------------------------------------- unreadable data


def _deny(monkeypatch, target: Path, how: str) -> None:
    """Make ``target`` unreadable: chmod 000 when that works (not root), else fake the OS error
    where the loader meets it (root reads anything)."""
    if not ROOT:
        mode = target.stat().st_mode
        target.chmod(0)
        _restore.append((target, mode))  # undone by the restore_modes fixture
        return
    err = PermissionError(13, "Permission denied", str(target))
    if how == "scandir":
        real = os.scandir

        def scandir(path="."):
            if Path(path) == target:
                raise err
            return real(path)

        monkeypatch.setattr(cache_mod.os, "scandir", scandir)
    else:
        real_open = Image.open

        def image_open(fp, *a, **k):
            if Path(fp) == target:
                raise err
            return real_open(fp, *a, **k)

        monkeypatch.setattr(cache_mod.Image, "open", image_open)


_restore: list[tuple[Path, int]] = []


@pytest.fixture(autouse=True)
def restore_modes():
    yield
    while _restore:
        path, mode = _restore.pop()
        path.chmod(mode)


def test_permission_denied_on_a_class_folder_names_it(tmp_path, monkeypatch):
    fx.write_folder(tmp_path, ["a", "b", "c"], per_class=2)
    _deny(monkeypatch, tmp_path / "b", "scandir")
    one_line_error(lambda: load_folder(make_spec("folder", tmp_path, ways=1, shots=1)),
                   f"permission denied reading directory '{tmp_path / 'b'}'")


def test_permission_denied_on_the_mini_imagenet_image_folder_names_it(tmp_path, monkeypatch):
    fx.write_mini_csv(tmp_path, fx.mini_images(fx.mini_wnids((1, 1, 1)), per_class=1, size=8))
    _deny(monkeypatch, tmp_path / "images", "scandir")
    one_line_error(lambda: load_miniimagenet(make_spec("miniimagenet", tmp_path, image_size=8)),
                   f"permission denied reading directory '{tmp_path / 'images'}'")


def test_permission_denied_on_an_image_names_it(tmp_path, monkeypatch):
    fx.write_folder(tmp_path, ["a", "b", "c"], per_class=2)
    victim = tmp_path / "c" / "img_001.png"
    _deny(monkeypatch, victim, "open")
    one_line_error(lambda: load_folder(make_spec("folder", tmp_path, ways=1, shots=1)),
                   f"permission denied reading image '{victim}'")
    one_line_error(lambda: decode_image(victim, DecodeSpec(8, 3)),
                   f"permission denied reading image '{victim}'")


def test_a_file_that_vanishes_after_the_scan_is_named(tmp_path):
    fx.write_folder(tmp_path, ["a", "b", "c"], per_class=2)
    cfg = make_spec("folder", tmp_path, ways=1, shots=1)
    layout = scan_folder(cfg)
    gone = tmp_path / "b" / "img_000.png"
    gone.unlink()
    one_line_error(lambda: load_layout(layout, "folder", size=16, channels=3),
                   f"'{gone}' vanished while the data was being read")
    one_line_error(lambda: decode_image(gone, DecodeSpec(16, 3)), f"image '{gone}' vanished")


# --------------------------------------------------------------------------- mini-ImageNet splits


def test_a_class_in_two_split_pickles_is_refused(tmp_path):
    data = fx.mini_images({"train": ["n01", "n02"], "val": ["n02", "n03"], "test": ["n04"]},
                          per_class=2, size=8)
    fx.write_mini_pickles(tmp_path, data)
    one_line_error(lambda: load_miniimagenet(make_spec("miniimagenet", tmp_path, image_size=8)),
                   "class 'n02' is in both the train and the val pickle")


# --------------------------------------------------------------------------- preview


def test_preview_refuses_an_unwritable_suffix_before_any_work(tmp_path):
    msg = one_line_error(lambda: contact_sheet(None, "train", tmp_path / "x.xyz"),
                         "'.xyz'", ".png", ".jpg")
    assert all(s in msg for s in supported_suffixes())
    one_line_error(lambda: check_out(tmp_path / "sheet"), "no suffix")
    assert check_out(tmp_path / "A.JPG") == tmp_path / "A.JPG"
    fx.write_folder(tmp_path / "d", ["a", "b", "c"], per_class=2, size=(8, 8))
    data = load_folder(make_spec("folder", tmp_path / "d", image_size=8, ways=1, shots=1))
    for suffix in (".png", ".jpg", ".pdf"):
        contact_sheet(data, "train", tmp_path / f"sheet{suffix}")
        assert (tmp_path / f"sheet{suffix}").stat().st_size > 0


# --------------------------------------------------------------------------- the build lock

BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from sparsemeta.data.cache import load_or_build
    go = Path(sys.argv[1])

    def build(tmp):
        print("building", flush=True)
        deadline = time.monotonic() + 20
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(tmp, "wb") as f:
            np.save(f, np.full((3, 1, 2, 2), 7, dtype=np.uint8))
        return {"built_by": "first"}

    images, info = load_or_build("locktest", {"k": 1}, "0" * 40, build)
    print("done", info["built_by"], flush=True)
""")


def test_second_process_waits_for_the_build_and_reads_it(tmp_path, monkeypatch, private_cache):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen([sys.executable, "-c", BUILDER, str(go)], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "building"
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)

        def release_when_waiting():
            deadline = time.monotonic() + 20
            while "waiting" not in err.getvalue() and time.monotonic() < deadline:
                time.sleep(0.02)
            go.touch()

        helper = threading.Thread(target=release_when_waiting)
        helper.start()
        images, info = load_or_build("locktest", {"k": 1}, "0" * 40,
                                     lambda tmp: pytest.fail("the data set was decoded twice"))
        helper.join()
        assert info == {"built_by": "first"} and np.all(np.asarray(images) == 7)
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0]
        assert first.stdout.readline().split() == ["done", "first"]
    finally:
        go.touch()
        first.wait(timeout=30)


def test_build_removes_temps_of_dead_builders_and_writes_shareable_files(private_cache):
    private_cache.mkdir(parents=True)
    npy, _ = cache_mod.cache_paths("locktest", {"k": 2}, "1" * 40)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = npy.with_name(f".{npy.name}.{proc.pid}.0123abcd.tmp")
    live = temp_path(npy)  # this process's own pid: a build in progress
    dead.write_bytes(b"half a cache")
    live.write_bytes(b"in progress")

    def build(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.zeros((1, 1, 2, 2), np.uint8))
        return {}

    old = os.umask(0o022)
    try:
        load_or_build("locktest", {"k": 2}, "1" * 40, build)
    finally:
        os.umask(old)
    assert not dead.exists() and live.exists()
    for p in (npy, npy.with_suffix(".json")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
