"""Named random streams: the names stand for exactly the numbers the code used before."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from sparsemeta.foundations import streams


def test_tags_keep_their_values():
    assert (streams.METAMIX_DRAW, streams.CHANNEL_SHUFFLE_PLAN, streams.CHANNEL_SHUFFLE_SWITCH,
            streams.GLYPH_ALPHABET_SPLIT, streams.FOLDER_CLASS_SPLIT) == (7717, 7718, 7719, 7919,
                                                                          4099)
    assert (streams.REINIT, streams.RANDOM_MASK, streams.RIGL_INITIAL_MASK) == (1, 2, 3)


def test_numpy_streams_are_bit_identical_to_the_literal_seeds():
    for tag, index in [(7717, (11, 1)), (7718, (4,)), (7719, (250,)), (7919, ()), (4099, ())]:
        ours = streams.rng(tag, 7, *index)
        literal = np.random.default_rng([7, tag, *index])
        assert np.array_equal(ours.random(8), literal.random(8))
        assert np.array_equal(ours.permutation(20), literal.permutation(20))


def test_level_seeds_are_bit_identical_to_the_runner_formula():
    for kind in (1, 2, 3):
        for seed in (0, 1, 5):
            for level in (0, 1, 14):
                expected = 1_000_003 * kind + 7919 * (seed + 1) + 104_729 * level
                assert streams.level_seed(kind, seed, level) == expected
                g = streams.level_generator(kind, seed, level)
                assert torch.equal(torch.rand(5, generator=g),
                                   torch.rand(5, generator=torch.Generator().manual_seed(expected)))


def test_level_seeds_are_distinct_where_documented():
    seeds = {streams.level_seed(k, s, lv) for k in (1, 2, 3) for s in range(10_000)
             for lv in range(31)}
    assert len(seeds) == 3 * 10_000 * 31


def test_numpy_tags_differ_from_each_other_and_from_the_data_layer_tags():
    tags = [streams.METAMIX_DRAW, streams.CHANNEL_SHUFFLE_PLAN, streams.CHANNEL_SHUFFLE_SWITCH,
            streams.GLYPH_ALPHABET_SPLIT, streams.FOLDER_CLASS_SPLIT]
    others = {0, 1, 2, 3, 1623}  # task splits, glyph generator, omniglot class split
    assert len(set(tags)) == len(tags) and not set(tags) & others


def test_streams_import_without_torch():
    code = ("import sys; import sparsemeta.foundations.streams as s; s.rng(1, 2); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
