"""Real data sets on small fixtures written in their exact on-disk layouts (tests/data/fixtures.py):
Omniglot, mini-ImageNet (CSV + images, images only, class folders, pickles), user folders, the
uint8 memory-mapped cache, downloads, `data info`, and every user-facing error as one line."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemeta.config import Config, build_config
from sparsemeta.data import cache as cache_mod
from sparsemeta.data.cache import DecodeSpec, decode_files, decode_image
from sparsemeta.data.download import Remote, download, fetch, verify
from sparsemeta.data.folder import load_folder
from sparsemeta.data.info import info
from sparsemeta.data.miniimagenet import crop_flip, load_miniimagenet, ravi_split
from sparsemeta.data.omniglot import load_omniglot, scan_omniglot
from sparsemeta.data.spec import DataSpec
from sparsemeta.data.tasks import TaskSampler, check_tasks
from sparsemeta.foundations.errors import UserError
from tests.data import fixtures as fx

# 90 characters → maml split 61 / 6 / 23 (1200/1623 and 100/1623 of them), 20 drawers each
OMNI_COUNTS = {"train": (61, 1220), "val": (6, 120), "test": (23, 460)}


def make_cfg(name: str, root, **data) -> Config:
    """A default Config with data.* set directly (unvalidated: tiny fixtures use 1-way tasks)."""
    cfg = Config()
    cfg.data.name = name
    cfg.data.root = None if root is None else str(root)
    cfg.data.queries = 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def make_spec(name: str, root, **data) -> DataSpec:
    """``make_cfg``'s data spec: what a loader takes."""
    return make_cfg(name, root, **data).data_spec()


def one_line_error(fn, *match: str) -> str:
    with pytest.raises(UserError) as info_:
        fn()
    msg = str(info_.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSEMETA_CACHE", str(cache))
    return cache / "decoded"


@pytest.fixture(scope="session")
def omni_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    assert fx.write_omniglot(root) == 1800
    return root


def cache_files(private_cache) -> list[Path]:
    return sorted(private_cache.glob("*.npy")) if private_cache.exists() else []


# --------------------------------------------------------------------------- Omniglot


def test_omniglot_layout_counts_pixels_and_memmap(omni_root):
    data = load_omniglot(make_spec("omniglot", omni_root))
    assert data.counts() == OMNI_COUNTS
    assert isinstance(data.images, np.memmap) and data.images.dtype == np.uint8
    assert data.images.shape == (1800, 1, 28, 28)
    data.check_disjoint()
    # ink 255 on background 0: corners are background, strokes are bright
    assert data.images[:, :, 0, 0].max() == 0 and data.images[:, :, -1, -1].max() == 0
    assert (data.images.reshape(1800, -1).max(axis=1) > 100).all()
    # exactly what decoding the original PNG gives (inverted, Lanczos to 28×28)
    name = data.class_names["train"][0]
    first = sorted((omni_root / name).glob("*.png"))[0]
    expect = decode_image(first, DecodeSpec(28, 1, invert=True))
    assert np.array_equal(data.images[data.classes["train"][0][0]], expect)
    assert data.mean == (0.0,) and data.std == (1.0,)


def test_omniglot_splits_are_seeded_disjoint_and_deterministic(omni_root):
    a = scan_omniglot(make_spec("omniglot", omni_root)).splits
    b = scan_omniglot(make_spec("omniglot", omni_root)).splits
    c = scan_omniglot(make_spec("omniglot", omni_root, seed=1)).splits
    assert a == b and a != c
    ids = [i for s in a.values() for i in s]
    assert len(ids) == len(set(ids)) == 90


def test_omniglot_background_split(omni_root):
    layout = scan_omniglot(make_spec("omniglot", omni_root, split="background"))
    names = [n for n, _ in layout.classes]
    part = {s: {names[i].split("/")[0] for i in idx} for s, idx in layout.splits.items()}
    assert part == {"train": {"images_background"}, "val": {"images_background"},
                    "test": {"images_evaluation"}}
    assert {s: len(i) for s, i in layout.splits.items()} == {"train": 39, "val": 6, "test": 45}
    one_line_error(lambda: scan_omniglot(make_spec("omniglot", omni_root, split="bogus")),
                   "data.split must be one of maml, background")


def _task_images(task) -> dict[int, np.ndarray]:
    """Per label, the task's uint8 images (support then query), undoing x / 255 (mean 0, std 1)."""
    x = torch.cat([task.support_x, task.query_x])
    y = torch.cat([task.support_y, task.query_y])
    pixels = (x * 255).round().to(torch.uint8).numpy()
    return {int(c): pixels[(y == c).numpy()] for c in y.unique()}


def test_omniglot_tasks_draw_from_the_memmap_with_rotations(omni_root):
    """Each label of a task is one train class turned by one multiple of 90°: every image of the
    label equals np.rot90(the class's stored image, k) for the same class and k, and k ≠ 0
    happens (rotations on) or never happens (rotations off)."""
    data = load_omniglot(make_spec("omniglot", omni_root))
    train = data.classes["train"]
    where: dict[bytes, set[tuple[int, int]]] = {}  # image bytes → {(class, k)}
    for c, idx in enumerate(train):
        for i in idx:
            for k in range(4):
                img = np.rot90(np.asarray(data.images[i]), k, axes=(1, 2))
                where.setdefault(img.tobytes(), set()).add((c, k))
    for rotations in (True, False):
        sampler = TaskSampler(data, "train", ways=5, shots=1, queries=2, seed=0,
                              rotations=rotations)
        turns = []
        for t in range(12):
            task = sampler.task(t)
            assert task.support_x.shape == (5, 1, 28, 28)
            for label, images in _task_images(task).items():
                found = [where.get(img.tobytes(), set()) for img in images]
                assert all(found), f"task {t} label {label}: an image is no (rotated) train image"
                common = set.intersection(*found)  # one class, one rotation for the whole label
                assert common, f"task {t} label {label} mixes classes or rotations"
                c, k = sorted(common)[0]
                ids = train[c]
                assert any(np.array_equal(images[0], np.rot90(np.asarray(data.images[i]), k,
                                                              axes=(1, 2))) for i in ids)
                turns.append(k)
        if rotations:
            assert set(turns) == {0, 1, 2, 3}, turns  # 60 labels: every multiple of 90° shows up
            # a turned glyph differs from the unturned one (the check above is not vacuous)
            img = np.asarray(data.images[train[0][0]])
            assert not np.array_equal(img, np.rot90(img, 1, axes=(1, 2)))
        else:
            assert set(turns) == {0}


def test_cache_is_reused_then_invalidated_by_root_and_content(omni_root, tmp_path, private_cache,
                                                              monkeypatch):
    cfg = make_spec("omniglot", omni_root)
    first = load_omniglot(cfg)
    assert len(cache_files(private_cache)) == 1
    # second load: memory-mapped, nothing decoded
    monkeypatch.setattr(cache_mod, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    second = load_omniglot(cfg)
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    monkeypatch.undo()
    monkeypatch.setenv("SPARSEMETA_CACHE", str(private_cache.parent))
    # another root (a copy with one character less) gets its own cache
    other = tmp_path / "other"
    shutil.copytree(omni_root, other)
    victim = other / sorted(n for n, _ in scan_omniglot(cfg).classes)[0]
    shutil.rmtree(victim)
    moved = load_omniglot(make_spec("omniglot", other))
    assert len(moved.images) == 1780 and len(cache_files(private_cache)) == 2
    # another image size: another cache
    assert load_omniglot(make_spec("omniglot", other, image_size=20)).images.shape[-1] == 20
    assert len(cache_files(private_cache)) == 3
    # a changed file in the tree: rebuilt, the stale cache of that root removed
    png = next(other.rglob("*.png"))
    fx.omniglot_character(999, 0).save(png)
    os.utime(png, ns=(1, 1))
    rebuilt = load_omniglot(make_spec("omniglot", other))
    assert len(cache_files(private_cache)) == 3
    assert not np.array_equal(np.asarray(rebuilt.images), np.asarray(moved.images))


def test_truncated_cache_is_detected_and_rebuilt(omni_root, private_cache):
    cfg = make_spec("omniglot", omni_root)
    good = np.asarray(load_omniglot(cfg).images).copy()
    npy = cache_files(private_cache)[0]
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size // 2)
    assert np.array_equal(np.asarray(load_omniglot(cfg).images), good)


def test_parallel_decode_equals_serial(omni_root, tmp_path, monkeypatch):
    files = sorted(omni_root.rglob("*.png"))[:60]
    spec = DecodeSpec(28, 1, invert=True)
    decode_files(files, spec, tmp_path / "serial.npy", workers=1)
    monkeypatch.setattr(cache_mod, "POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(cache_mod, "_CHUNK", 16)
    pools = []
    real_pool = cache_mod.ProcessPoolExecutor

    def counting_pool(*args, **kwargs):
        pools.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "ProcessPoolExecutor", counting_pool)
    decode_files(files, spec, tmp_path / "pool.npy", workers=2)
    assert pools, "workers=2 did not use a process pool"
    serial, pool = np.load(tmp_path / "serial.npy"), np.load(tmp_path / "pool.npy")
    assert np.array_equal(serial, pool)
    # and both hold each file's own decoding, in order (not, say, two equally empty files)
    assert all(np.array_equal(pool[k], decode_image(f, spec)) for k, f in enumerate(files))
    assert len({im.tobytes() for im in pool}) == len(files)


def test_info_reports_counts_and_cache_state(omni_root):
    cfg = make_cfg("omniglot", omni_root)
    text = info(cfg.data_spec(), cfg.task_spec())
    assert "not built yet" in text and "1,800" in text
    assert "  train        61     1,220  20" in text and "  test         23       460  20" in text
    assert "differs from the published set" in text and "fit every split" in text
    load_omniglot(cfg.data_spec())
    assert "decoded/omniglot-" in info(cfg.data_spec(), cfg.task_spec())
    more = make_cfg("omniglot", omni_root, ways=10)
    assert "do NOT fit" in info(more.data_spec(), more.task_spec())


# --------------------------------------------------------------------------- mini-ImageNet


@pytest.fixture(scope="module")
def mini_data():
    return fx.mini_images(fx.mini_wnids((6, 5, 5)), per_class=4)


def _by_class(data) -> dict:
    return {(s, n): np.asarray(data.images[idx]) for s in data.classes
            for n, idx in zip(data.class_names[s], data.classes[s])}


def test_miniimagenet_csv_pickle_and_class_folders_give_the_same_data(tmp_path, mini_data):
    fx.write_mini_csv(tmp_path / "csv", mini_data)
    fx.write_mini_pickles(tmp_path / "pkl", mini_data)
    fx.write_mini_pickles(tmp_path / "pkl5", mini_data, protocol=5,
                          val_name="mini-imagenet-cache-validation.pkl")
    fx.write_mini_dirs(tmp_path / "dirs", mini_data)
    loaded = {k: load_miniimagenet(make_spec("miniimagenet", tmp_path / k, image_size=84))
              for k in ("csv", "pkl", "pkl5", "dirs")}
    ref = loaded["csv"]
    assert ref.counts() == {"train": (6, 24), "val": (5, 20), "test": (5, 20)}
    assert ref.images.shape == (64, 3, 84, 84) and isinstance(ref.images, np.memmap)
    assert ref.mean == (0.485, 0.456, 0.406) and ref.std == (0.229, 0.224, 0.225)
    expect = {(s, n): np.stack([px.transpose(2, 0, 1) for _, px in ims])
              for s, by in mini_data.items() for n, ims in by.items()}
    for k, data in loaded.items():
        got = _by_class(data)
        assert got.keys() == expect.keys(), k
        for key in expect:
            assert np.array_equal(got[key], expect[key]), (k, key)
        assert isinstance(data.images, np.memmap)
    # second pickle load comes from the cache
    again = load_miniimagenet(make_spec("miniimagenet", tmp_path / "pkl", image_size=84))
    assert isinstance(again.images, np.memmap) and again.counts() == ref.counts()


def test_miniimagenet_images_without_csv_use_the_packaged_ravi_split(tmp_path):
    ravi = ravi_split()
    assert [len(ravi[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert len({w for v in ravi.values() for w in v}) == 100
    data = fx.mini_images(ravi, per_class=2, size=16)
    fx.write_mini_csv(tmp_path, data, csv=False)
    loaded = load_miniimagenet(make_spec("miniimagenet", tmp_path, image_size=16))
    assert loaded.counts() == {"train": (64, 128), "val": (16, 32), "test": (20, 40)}
    assert loaded.class_names["val"] == sorted(ravi["val"])
    mini = make_cfg("miniimagenet", tmp_path, image_size=16)
    text = info(mini.data_spec(), mini.task_spec())
    assert "packaged Ravi & Larochelle split" in text and "differs from the published" in text
    # a missing class is named
    for p in (tmp_path / "images").glob(f"{ravi['test'][3]}*"):
        p.unlink()
    one_line_error(lambda: load_miniimagenet(make_spec("miniimagenet", tmp_path, image_size=16)),
                   f"no images of class {ravi['test'][3]}")


def test_miniimagenet_resizes_and_augments(tmp_path, mini_data):
    fx.write_mini_pickles(tmp_path, mini_data)
    data = load_miniimagenet(make_spec("miniimagenet", tmp_path, image_size=32))
    assert data.images.shape == (64, 3, 32, 32)
    assert data.augment is not None and data.augment.keywords == {"padding": 3}
    assert load_miniimagenet(make_spec("miniimagenet", tmp_path, image_size=32,
                                      augment=False)).augment is None
    batch = np.asarray(data.images[:10])
    out = data.augment(batch, np.random.default_rng(0))
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert np.array_equal(out, data.augment(batch, np.random.default_rng(0)))
    flips = crop_flip(batch, np.random.default_rng(1), padding=0)
    for a, b in zip(flips, batch):
        assert np.array_equal(a, b) or np.array_equal(a, b[..., ::-1])
    assert any(not np.array_equal(a, b) for a, b in zip(flips, batch))


# --------------------------------------------------------------------------- folder


def test_folder_seeded_split_grayscale_and_rgb(tmp_path):
    names = [f"class_{i:02d}" for i in range(10)]
    fx.write_folder(tmp_path / "grey", names, per_class=5, mode="L", ext=".jpg")
    fx.write_folder(tmp_path / "rgb", names, per_class=5, mode="RGB", ext=".PNG")
    grey = load_folder(make_spec("folder", tmp_path / "grey", image_size=16, ways=2))
    rgb = load_folder(make_spec("folder", tmp_path / "rgb", image_size=16, ways=2))
    assert grey.images.shape == (50, 1, 16, 16) and rgb.images.shape == (50, 3, 16, 16)
    assert grey.counts() == {"train": (6, 30), "val": (2, 10), "test": (2, 10)}
    assert grey.class_names == rgb.class_names  # same seed and names → same split
    other = load_folder(make_spec("folder", tmp_path / "rgb", image_size=16, ways=2, seed=5))
    assert other.class_names != rgb.class_names
    assert len(rgb.mean) == 3 and all(0 < s < 1 for s in rgb.std)
    # normalisation statistics are those of the decoded pixels, per channel, on the 0..1 scale
    for data in (grey, rgb):
        x = np.asarray(data.images, dtype=np.float64) / 255
        assert np.allclose(data.mean, x.mean(axis=(0, 2, 3)), atol=1e-5)
        assert np.allclose(data.std, x.std(axis=(0, 2, 3)), atol=1e-5)
    assert len(set(rgb.mean)) == 3  # the channels differ in these images
    forced = load_folder(make_spec("folder", tmp_path / "rgb", image_size=16, ways=2, channels=1))
    assert forced.images.shape[1] == 1
    rgb.check_disjoint()


def test_folder_split_file(tmp_path):
    names = [f"c{i}" for i in range(8)]
    fx.write_folder(tmp_path, names, per_class=3)
    split = {"train": ["c0", "c1", "c2", "c3", "c4"], "val": ["c5"], "test": ["c6", "c7"]}
    (tmp_path / "splits.json").write_text(__import__("json").dumps(split))
    data = load_folder(make_spec("folder", tmp_path, image_size=16, ways=1, shots=1,
                                rotations=False))
    assert data.class_names == {"train": split["train"], "val": ["c5"], "test": ["c6", "c7"]}
    other = tmp_path.parent / f"{tmp_path.name}-split.json"
    other.write_text('{"train": ["c0", "c1"], "val": ["c2"], "test": ["c3"]}')
    data = load_folder(make_spec("folder", tmp_path, image_size=16, ways=1, split_file=str(other)))
    assert data.counts() == {"train": (2, 6), "val": (1, 3), "test": (1, 3)}


# --------------------------------------------------------------------------- errors


def test_missing_root_errors(tmp_path):
    one_line_error(lambda: load_omniglot(make_spec("omniglot", None)), "data.root is not set",
                   "--root DIR")
    one_line_error(lambda: load_miniimagenet(make_spec("miniimagenet", tmp_path / "nope")),
                   "does not exist")
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: load_folder(make_spec("folder", tmp_path / "file")), "is a file")


def test_wrong_layout_names_the_expected_directory(tmp_path):
    fx.write_omniglot(tmp_path, (2,), (), drawers=2)
    (tmp_path / "images_evaluation").mkdir()
    one_line_error(lambda: load_omniglot(make_spec("omniglot", tmp_path)),
                   f"'{tmp_path / 'images_evaluation'}' has no ALPHABET/characterNN/*.png")
    shutil.rmtree(tmp_path / "images_evaluation")
    one_line_error(lambda: load_omniglot(make_spec("omniglot", tmp_path)),
                   f"expected directory '{tmp_path / 'images_evaluation'}'",
                   "sparsemeta data download omniglot")
    (tmp_path / "images_evaluation.zip").write_bytes(b"PK")
    one_line_error(lambda: load_omniglot(make_spec("omniglot", tmp_path)),
                   "found only 'images_evaluation.zip'")
    nested = tmp_path / "images_evaluation" / "images_evaluation" / "A" / "character01"
    nested.mkdir(parents=True)
    fx.omniglot_character(0, 0).save(nested / "x.png")
    one_line_error(lambda: load_omniglot(make_spec("omniglot", tmp_path)), "one level too deep")
    one_line_error(lambda: load_miniimagenet(make_spec("miniimagenet", tmp_path)),
                   "is not a mini-ImageNet directory: expected images/ with train.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    fx.write_folder(empty / "loose", [], 0)
    (empty / "a.png").write_bytes(b"")
    one_line_error(lambda: load_folder(make_spec("folder", empty)),
                   "has no class folders with images", "own sub-folder")


def test_miniimagenet_file_errors(tmp_path, mini_data):
    cfg = make_spec("miniimagenet", tmp_path, image_size=84)
    paths = fx.write_mini_pickles(tmp_path, mini_data)
    blob = paths["train"].read_bytes()
    paths["train"].write_text("<!DOCTYPE html><html><body>Quota exceeded</body></html>")
    one_line_error(lambda: load_miniimagenet(cfg), "is an HTML page", "download the file again")
    paths["train"].write_bytes(blob[: len(blob) // 2])
    one_line_error(lambda: load_miniimagenet(cfg), "is truncated or not a pickle")
    paths["train"].write_bytes(pickle.dumps(os.system, protocol=2))
    one_line_error(lambda: load_miniimagenet(cfg), "refusing to load it")
    paths["train"].write_bytes(pickle.dumps({"images": [1, 2]}))
    one_line_error(lambda: load_miniimagenet(cfg), "expected a dict with image_data")
    paths["val"].unlink()
    one_line_error(lambda: load_miniimagenet(cfg), "but not mini-imagenet-cache-val.pkl")
    # CSV layout: a listed image missing, a bad header, a missing CSV
    csv_root = tmp_path / "csv"
    fx.write_mini_csv(csv_root, mini_data)
    ccfg = make_spec("miniimagenet", csv_root, image_size=84)
    victim = sorted((csv_root / "images").iterdir())[0]
    jpeg = victim.read_bytes()
    victim.unlink()
    one_line_error(lambda: load_miniimagenet(ccfg), "missing from", victim.name)
    victim.write_bytes(jpeg)
    (csv_root / "val.csv").write_text("file,class\nx.jpg,n1\n")
    one_line_error(lambda: load_miniimagenet(ccfg), "expected the header 'filename,label'")
    (csv_root / "val.csv").unlink()
    one_line_error(lambda: load_miniimagenet(ccfg), "but not val.csv")


def test_corrupt_image_is_named(tmp_path):
    fx.write_folder(tmp_path, ["a", "b", "c"], per_class=3)
    bad = tmp_path / "b" / "img_001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    one_line_error(lambda: load_folder(make_spec("folder", tmp_path, ways=1, shots=1)),
                   f"cannot decode image '{bad}'", "replace or delete")


def test_too_few_classes_or_images(tmp_path, omni_root):
    """The one tasks-fit check (``check_tasks``), on what the loaders give."""
    def fit(loader, name, root, **data) -> None:
        cfg = make_cfg(name, root, **data)
        check_tasks(loader(cfg.data_spec()), cfg.task_spec())

    fx.write_folder(tmp_path, [f"c{i}" for i in range(5)], per_class=4)
    one_line_error(lambda: fit(load_folder, "folder", tmp_path, ways=2, rotations=False),
                   "data.ways=2 but the val split of 'folder' has only 1 classes", "lower data.ways")
    one_line_error(lambda: fit(load_folder, "folder", tmp_path, ways=1, shots=2, queries=3),
                   "data.shots + data.queries = 5 but class", "has only 4 images",
                   "lower data.shots or data.queries")
    one_line_error(lambda: fit(load_omniglot, "omniglot", omni_root, ways=7),
                   "data.ways=7 but the val split of 'omniglot' has only 6 classes")
    one_line_error(lambda: fit(load_omniglot, "omniglot", omni_root, shots=10, queries=11),
                   "data.shots + data.queries = 21", "has only 20 images")


def test_folder_split_file_errors(tmp_path):
    fx.write_folder(tmp_path, ["a", "b", "c"], per_class=2)
    cfg = make_spec("folder", tmp_path, ways=1, shots=1)
    (tmp_path / "splits.json").write_text("{not json")
    one_line_error(lambda: load_folder(cfg), "is not valid JSON")
    (tmp_path / "splits.json").write_text('{"train": ["a"], "val": ["zzz"], "test": ["c"]}')
    one_line_error(lambda: load_folder(cfg), "no image folder", "'zzz'")
    (tmp_path / "splits.json").write_text('{"train": ["a", "b"], "val": ["b"], "test": ["c"]}')
    one_line_error(lambda: load_folder(cfg), "puts class 'b' in both train and val")
    (tmp_path / "splits.json").write_text('{"train": ["a", "b"], "test": ["c"]}')
    one_line_error(lambda: load_folder(cfg), "lists no 'val' classes")
    one_line_error(lambda: load_folder(make_spec("folder", tmp_path, split_file="nope.json")),
                   "data.split_file 'nope.json' does not exist")
    (tmp_path / "splits.json").unlink()
    one_line_error(lambda: build_config(overrides=["data.val_fraction=1.5"]),
                   "data.val_fraction and data.test_fraction must be in (0, 1)")


# --------------------------------------------------------------------------- downloads


def _zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_verify_detects_html_truncation_corruption_and_checksum(tmp_path):
    good = _zip_bytes({"images_background/a.txt": b"x" * 5000}, zipfile.ZIP_STORED)
    import hashlib

    remote = Remote("images_background.zip", ("file:///x",), hashlib.md5(good).hexdigest(),
                    unpack="images_background")
    path = tmp_path / "images_background.zip"
    path.write_bytes(good)
    verify(path, remote)
    path.write_text("<!DOCTYPE html>\n<html><head><title>404</title></head></html>")
    one_line_error(lambda: verify(path, remote), "is an HTML page", "download again")
    path.write_bytes(good[: len(good) // 2])
    one_line_error(lambda: verify(path, remote), "not a complete zip archive", "truncated")
    corrupt = bytearray(good)
    corrupt[good.index(b"xxxx") + 10] ^= 0xFF  # inside the member's data: CRC fails
    path.write_bytes(bytes(corrupt))
    one_line_error(lambda: verify(path, remote), "corrupt")
    other = _zip_bytes({"images_background/a.txt": b"y" * 5000})
    path.write_bytes(other)
    one_line_error(lambda: verify(path, remote), "checksum mismatch", remote.md5)
    pkl = Remote("p.pkl", ("file:///x",), None, size=10_000, kind="pickle")
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    one_line_error(lambda: verify(tmp_path / "p.pkl", pkl), "is truncated (", "of 10,000 bytes")


def test_download_fetches_verifies_and_unpacks_from_file_urls(tmp_path, omni_root):
    src = tmp_path / "server"
    src.mkdir()
    remotes = []
    for part in ("images_background", "images_evaluation"):
        md5 = fx.zip_dir(omni_root, part, src / f"{part}.zip")
        remotes.append(Remote(f"{part}.zip", ((src / f"{part}.zip").as_uri(),), md5, unpack=part))
    dest = tmp_path / "data"
    log = io.StringIO()
    msg = download("omniglot", dest, sources=tuple(remotes), log=log)
    assert "ready" in msg and (dest / "images_background").is_dir()
    assert load_omniglot(make_spec("omniglot", dest)).counts() == OMNI_COUNTS
    assert not list(dest.glob(".*"))  # no temp files left
    # again: present, nothing fetched
    assert "(present)" in download("omniglot", dest, sources=tuple(remotes), log=log)
    one_line_error(lambda: download("glyphs", dest), "nothing to download")


class _Response(io.BytesIO):
    def __init__(self, data: bytes, length: int | None = None):
        super().__init__(data)
        self.headers = {} if length is None else {"Content-Length": str(length)}


def test_fetch_reports_truncated_html_and_unreachable(tmp_path):
    good = _zip_bytes({"images_background/a.txt": b"abc"})
    remote = Remote("images_background.zip", ("https://a.example/x.zip", "https://b.example/x.zip"),
                    None, unpack="images_background")
    dest = tmp_path / "images_background.zip"
    one_line_error(lambda: fetch(remote, dest, opener=lambda u: _Response(good[:20], len(good)),
                                 log=io.StringIO()),
                   "could not download images_background.zip", "truncated download (20 of")
    one_line_error(lambda: fetch(remote, dest, log=io.StringIO(),
                                 opener=lambda u: _Response(b"<html>moved</html>")),
                   "is an HTML page")

    def unreachable(url):
        raise OSError("Network is unreachable")

    one_line_error(lambda: fetch(remote, dest, opener=unreachable, log=io.StringIO()),
                   "Network is unreachable", "fetch the file by hand")
    assert not dest.exists() and not list(tmp_path.iterdir())
    # the second mirror works when the first returns junk
    answers = iter([_Response(b"<!doctype html>"), _Response(good, len(good))])
    assert fetch(remote, dest, opener=lambda u: next(answers), log=io.StringIO()) == dest
    assert dest.read_bytes() == good


def test_download_replaces_a_bad_existing_file(tmp_path):
    good = _zip_bytes({"images_evaluation/A/character01/x.png": b"png"})
    import hashlib

    remote = Remote("images_evaluation.zip", ("https://x.example/e.zip",),
                    hashlib.md5(good).hexdigest(), unpack="images_evaluation")
    (tmp_path / "images_evaluation.zip").write_text("<html>error</html>")
    log = io.StringIO()
    download("omniglot", tmp_path, sources=(remote,), log=log,
             opener=lambda u: _Response(good, len(good)))
    assert "HTML page" in log.getvalue()
    assert (tmp_path / "images_evaluation" / "A" / "character01" / "x.png").read_bytes() == b"png"
    evil = _zip_bytes({"../evil.txt": b"x"})
    (tmp_path / "e2.zip").write_bytes(evil)
    from sparsemeta.data.download import unpack

    one_line_error(lambda: unpack(tmp_path / "e2.zip", tmp_path, "images_evaluation"), "unsafe path")
