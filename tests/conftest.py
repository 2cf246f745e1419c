"""Shared fixtures: a small synthetic data set, so most tests need no generated glyphs."""

from __future__ import annotations

import os

# Tiny models gain nothing from intra-op threads, and oversubscribed OpenMP threads slow a
# shared 2-core machine down many times over; subprocesses inherit this too.
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sparsemeta.data.base import FewShotData  # noqa: E402

torch.set_num_threads(1)


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


@pytest.fixture(scope="session", autouse=True)
def glyph_cache(tmp_path_factory):
    """Generated glyphs go to one cache per test session (or CI's), never the user's cache."""
    if "SPARSEMETA_CACHE" not in os.environ:
        os.environ["SPARSEMETA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return os.environ["SPARSEMETA_CACHE"]


#: summary row keys measured in seconds: they differ between two runs of the same experiment
TIMINGS = frozenset({"train_seconds", "cpu_seconds", "wall_vs_imp", "cpu_vs_imp"})
