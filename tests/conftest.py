"""Shared fixtures: a small synthetic data set, so most tests need no generated glyphs."""

from __future__ import annotations

import numpy as np
import pytest

from sparsemeta.data.base import FewShotData


def make_data(classes_per_split=(12, 6, 6), per_class=8, size=16, channels=1,
              seed=0) -> FewShotData:
    """Class c is a fixed random pattern plus per-example noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    total = sum(classes_per_split)
    protos = rng.integers(0, 256, size=(total, channels, size, size))
    noise = rng.normal(0, 40, size=(total, per_class, channels, size, size))
    images = np.clip(protos[:, None] + noise, 0, 255).astype(np.uint8)
    images = images.reshape(total * per_class, channels, size, size)
    classes, start = {}, 0
    for split, n in zip(("train", "val", "test"), classes_per_split):
        classes[split] = [np.arange((start + c) * per_class, (start + c + 1) * per_class)
                          for c in range(n)]
        start += n
    return FewShotData("synthetic", images, classes)


@pytest.fixture
def tiny_data() -> FewShotData:
    return make_data()
