"""Tests for the procedurally generated "glyphs" data set (sparsemeta.data.glyphs)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparsemeta.data import glyphs
from sparsemeta.data.glyphs import GlyphSpec, generate, load_or_generate, pixel_nn_accuracy

SMALL = GlyphSpec(alphabets=4, characters=5)


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    return generate(SMALL)


def test_default_spec_meets_size_requirements() -> None:
    spec = GlyphSpec()
    assert spec.alphabets >= 40
    assert spec.alphabets * spec.characters >= 1200
    assert spec.num_classes == spec.alphabets * spec.characters
    assert (spec.drawers, spec.image_size) == (20, 28)


def test_shape_dtype_and_alphabet_ids(small: tuple[np.ndarray, np.ndarray]) -> None:
    images, alphabet_of_class = small
    assert images.shape == (20, 20, 28, 28)
    assert images.dtype == np.uint8
    assert alphabet_of_class.dtype == np.int64
    np.testing.assert_array_equal(alphabet_of_class, np.repeat(np.arange(4), 5))
    assert images.min() == 0 and images.max() == 255


def test_same_spec_is_byte_identical(small: tuple[np.ndarray, np.ndarray]) -> None:
    again, alphabet_of_class = generate(GlyphSpec(alphabets=4, characters=5))
    assert again.tobytes() == small[0].tobytes()
    np.testing.assert_array_equal(alphabet_of_class, small[1])


def test_output_does_not_depend_on_generation_order(small: tuple[np.ndarray, np.ndarray]) -> None:
    # Per-(alphabet, character, drawer) seeding: a larger set starts with the smaller one.
    bigger, _ = generate(GlyphSpec(alphabets=5, characters=5, drawers=20))
    assert bigger[:20].tobytes() == small[0].tobytes()
    fewer_drawers, _ = generate(GlyphSpec(alphabets=4, characters=5, drawers=3))
    assert fewer_drawers.tobytes() == small[0][:, :3].tobytes()


def test_different_seed_differs(small: tuple[np.ndarray, np.ndarray]) -> None:
    other, _ = generate(GlyphSpec(seed=1, alphabets=4, characters=5))
    assert other.shape == small[0].shape
    frac_equal = np.mean(np.all(other == small[0], axis=(2, 3)))
    assert frac_equal < 0.01


def test_every_image_has_ink_and_is_not_saturated(small: tuple[np.ndarray, np.ndarray]) -> None:
    images = small[0].reshape(-1, 28 * 28)
    ink = (images > 127).mean(axis=1)
    assert images.max(axis=1).min() >= 128  # strokes reach (near) full ink
    assert ink.min() > 0.005  # at least ~4 inked pixels: no blank image
    assert ink.max() < 0.5  # strokes, not blobs
    assert 0.03 < ink.mean() < 0.3
    assert np.all(np.median(images, axis=1) == 0)  # ink 255 on background 0
    # anti-aliased: intermediate grey levels exist
    assert np.mean((images > 0) & (images < 255)) > 0.01


def test_drawers_differ_but_are_closer_than_other_characters(
    small: tuple[np.ndarray, np.ndarray],
) -> None:
    images, alphabet_of_class = small
    x = images.astype(np.float32).reshape(20, 20, -1) / 255.0
    within, between = [], []
    for cls in range(20):
        d = np.abs(x[cls][:, None] - x[cls][None]).mean(-1)
        off_diag = d[~np.eye(20, dtype=bool)]
        assert off_diag.min() > 0  # no two drawers produce the same image
        within.append(off_diag.mean())
        same_alphabet = np.flatnonzero(
            (alphabet_of_class == alphabet_of_class[cls]) & (np.arange(20) != cls)
        )
        between.append(
            np.mean([np.abs(x[cls][:, None] - x[o][None]).mean() for o in same_alphabet])
        )
    within_arr, between_arr = np.array(within), np.array(between)
    # Measured with the default knobs: ratio 0.85, 18 of 20 classes; thresholds leave slack
    # for retuning the difficulty but fail if drawers stop resembling their character.
    assert within_arr.mean() < 0.92 * between_arr.mean()
    assert np.mean(within_arr < between_arr) >= 0.75


def test_image_size_84() -> None:
    images, alphabet_of_class = generate(
        GlyphSpec(alphabets=2, characters=2, drawers=3, image_size=84)
    )
    assert images.shape == (4, 3, 84, 84) and images.dtype == np.uint8
    assert alphabet_of_class.shape == (4,)
    ink = (images.reshape(12, -1) > 127).mean(axis=1)
    assert ink.min() > 0.005 and ink.max() < 0.5


def test_workers_2_equals_workers_1(
    small: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    pools = []
    real_pool = glyphs.ProcessPoolExecutor

    def counting_pool(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        pools.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(glyphs, "ProcessPoolExecutor", counting_pool)
    parallel, alphabet_of_class = generate(SMALL, workers=2)
    assert pools, "workers=2 never reached the process pool: nothing parallel was compared"
    assert parallel.tobytes() == small[0].tobytes()
    np.testing.assert_array_equal(alphabet_of_class, small[1])


def test_key_is_stable_and_tracks_fields() -> None:
    key = GlyphSpec().key()
    assert key == GlyphSpec().key()
    assert key.startswith(f"glyphs-v{glyphs.VERSION}-") and len(key.split("-")[-1]) == 10
    assert GlyphSpec(seed=1).key() != key
    assert GlyphSpec(motor_noise=0.1).key() != key
    assert GlyphSpec(pen_width=[1.3, 2.8]).key() == GlyphSpec(pen_width=(1.3, 2.8)).key()


def test_spec_rejects_invalid_values() -> None:
    with pytest.raises(ValueError):
        GlyphSpec(seed=-1)
    with pytest.raises(ValueError):
        GlyphSpec(characters=0)
    with pytest.raises(ValueError):
        GlyphSpec(pen_width=(2.0, 1.0))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[GlyphSpec]:
    """Records every call of the generator, so a test can tell cache hits from regeneration."""
    seen: list[GlyphSpec] = []
    real_generate = glyphs.generate

    def counting_generate(spec: GlyphSpec, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        seen.append(spec)
        return real_generate(spec, workers)

    monkeypatch.setattr(glyphs, "generate", counting_generate)
    return seen


def test_load_or_generate_writes_once_then_memory_maps(
    tmp_path: os.PathLike, calls: list[GlyphSpec], small: tuple[np.ndarray, np.ndarray]
) -> None:
    images, alphabet_of_class = load_or_generate(SMALL, tmp_path)
    assert len(calls) == 1
    npy = tmp_path / f"{SMALL.key()}.npy"
    meta = json.loads((tmp_path / f"{SMALL.key()}.json").read_text())
    assert meta["alphabet_of_class"] == small[1].tolist()
    assert meta["spec"]["alphabets"] == 4 and meta["key"] == SMALL.key()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [npy.name, f"{SMALL.key()}.json", f".{SMALL.key()}.lock"])
    assert isinstance(images, np.memmap)
    assert images.tobytes() == small[0].tobytes()
    mtime = npy.stat().st_mtime_ns

    images2, alphabet_of_class2 = load_or_generate(SMALL, str(tmp_path))
    assert len(calls) == 1  # served from the cache
    assert isinstance(images2, np.memmap) and not images2.flags.writeable
    assert images2.tobytes() == small[0].tobytes()
    np.testing.assert_array_equal(alphabet_of_class2, alphabet_of_class)
    assert npy.stat().st_mtime_ns == mtime


def test_load_or_generate_regenerates_truncated_or_corrupt_cache(
    tmp_path: os.PathLike, calls: list[GlyphSpec], small: tuple[np.ndarray, np.ndarray]
) -> None:
    load_or_generate(SMALL, tmp_path)
    npy = tmp_path / f"{SMALL.key()}.npy"
    size = npy.stat().st_size
    with open(npy, "r+b") as f:
        f.truncate(size // 2)
    images, _ = load_or_generate(SMALL, tmp_path)
    assert len(calls) == 2
    assert npy.stat().st_size == size
    assert images.tobytes() == small[0].tobytes()

    npy.write_bytes(b"not a numpy file")
    images, _ = load_or_generate(SMALL, tmp_path)
    assert len(calls) == 3 and images.tobytes() == small[0].tobytes()

    (tmp_path / f"{SMALL.key()}.json").write_text("{")
    images, _ = load_or_generate(SMALL, tmp_path)
    assert len(calls) == 4 and images.tobytes() == small[0].tobytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pixel_nn_accuracy_extremes() -> None:
    rng = np.random.default_rng(0)
    prototypes = rng.integers(0, 256, (10, 1, 8, 8))
    identical = np.repeat(prototypes, 4, axis=1).astype(np.uint8)
    assert pixel_nn_accuracy(identical, np.arange(10), n_tasks=50) == 1.0
    noise = rng.integers(0, 256, (10, 6, 8, 8)).astype(np.uint8)
    chance = pixel_nn_accuracy(noise, np.arange(10), n_tasks=400)
    assert 0.14 < chance < 0.26
    with pytest.raises(ValueError):
        pixel_nn_accuracy(noise, np.arange(3))


def test_pixel_nn_accuracy_on_glyphs_is_learnable_but_not_solved(
    small: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = small
    acc = pixel_nn_accuracy(images, np.arange(20), n_tasks=200)
    assert 0.35 < acc < 0.9
    assert acc == pixel_nn_accuracy(images, np.arange(20), n_tasks=200)  # seeded
    assert pixel_nn_accuracy(images, np.arange(20), shots=5, n_tasks=200) > acc
