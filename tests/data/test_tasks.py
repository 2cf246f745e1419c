"""Episodic sampling: task i is a pure function of (seed, split, i); splits never mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemeta.data.spec import TaskSpec
from sparsemeta.data.tasks import TaskSampler, check_tasks
from sparsemeta.foundations.errors import UserError
from tests.conftest import make_data


def _images_of(data, task_x):
    """Map each task image back to its index in the data set (by exact bytes)."""
    lookup = {data.images[i].tobytes(): i for i in range(len(data.images))}
    raw = np.round(task_x.numpy() * 255).astype(np.uint8)
    return [lookup[r.tobytes()] for r in raw]


def test_same_seed_split_index_gives_identical_task_in_any_order():
    data = make_data()
    a = TaskSampler(data, "train", ways=5, shots=1, queries=3, seed=3)
    b = TaskSampler(data, "train", ways=5, shots=1, queries=3, seed=3)
    t7 = a.task(7)
    for i in (3, 1, 7):  # b draws other tasks first: no hidden sampler state
        b.task(i)
    u7 = b.task(7)
    for x, y in zip((t7.support_x, t7.query_x, t7.support_y), (u7.support_x, u7.query_x, u7.support_y)):
        assert torch.equal(x, y)
    assert not torch.equal(a.task(8).query_x, t7.query_x)
    c = TaskSampler(data, "train", ways=5, shots=1, queries=3, seed=4)
    assert not torch.equal(c.task(7).query_x, t7.query_x)


def test_task_shapes_labels_and_support_query_disjoint():
    data = make_data()
    s = TaskSampler(data, "val", ways=4, shots=2, queries=3, seed=0)
    t = s.task(0)
    assert t.support_x.shape == (8, 1, 16, 16) and t.query_x.shape == (12, 1, 16, 16)
    assert t.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(t.query_y.tolist()) == sorted([0, 1, 2, 3] * 3)
    sup, qry = _images_of(data, t.support_x), _images_of(data, t.query_x)
    assert not set(sup) & set(qry)
    # every example of label j comes from one class of the val split
    val_class = {i: c for c, idx in enumerate(data.classes["val"]) for i in idx.tolist()}
    for label in range(4):
        ids = [i for i, y in zip(sup + qry, t.support_y.tolist() + t.query_y.tolist()) if y == label]
        assert len({val_class[i] for i in ids}) == 1


def test_labels_are_shuffled_per_task():
    data = make_data()
    s = TaskSampler(data, "train", ways=5, shots=1, queries=1, seed=0)
    owner = {i: c for c, idx in enumerate(data.classes["train"]) for i in idx.tolist()}
    orders = {tuple(owner[i] for i in _images_of(data, s.task(k).support_x)) for k in range(20)}
    assert len(orders) > 15
    assert any(list(o) != sorted(o) for o in orders)


def test_tasks_only_use_their_split_and_splits_are_disjoint():
    data = make_data()
    data.check_disjoint()
    for split in ("train", "val", "test"):
        allowed = {i for idx in data.classes[split] for i in idx.tolist()}
        s = TaskSampler(data, split, ways=3, shots=1, queries=2, seed=1)
        for k in range(10):
            t = s.task(k)
            assert set(_images_of(data, torch.cat([t.support_x, t.query_x]))) <= allowed


def test_rotation_augmentation_makes_rotated_copies_new_classes():
    data = make_data(classes_per_split=(2, 2, 2))
    s = TaskSampler(data, "train", ways=8, shots=1, queries=0, seed=0, rotations=True)
    t = s.task(0)  # 2 classes × 4 rotations = 8 classes, so every rotation appears once
    raw = np.round(t.support_x.numpy() * 255).astype(np.uint8)
    rotated = {np.rot90(data.images[i], k, axes=(1, 2)).tobytes()
               for idx in data.classes["train"] for i in idx.tolist() for k in range(4)}
    assert all(r.tobytes() in rotated for r in raw)


def _translate(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` (C, H, W) moved down by dy and right by dx, uncovered pixels 0 (background)."""
    out = np.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_shift_augmentation_moves_content_within_bounds():
    """Each shifted image is its unshifted image translated by at most ``shift`` pixels in each
    direction, with background filling what was uncovered; every offset in range occurs."""
    data = make_data()
    k = 2
    plain = TaskSampler(data, "train", ways=3, shots=1, queries=1, seed=0)
    shifted = TaskSampler(data, "train", ways=3, shots=1, queries=1, seed=0, shift=k)
    offsets = set()
    for i in range(40):
        a, b = plain.task(i), shifted.task(i)
        assert a.support_x.shape == b.support_x.shape
        assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
        for xa, xb in ((a.support_x, b.support_x), (a.query_x, b.query_x)):
            raw_a = np.round(xa.numpy() * 255).astype(np.uint8)  # mean 0, std 1: x = raw / 255
            raw_b = np.round(xb.numpy() * 255).astype(np.uint8)
            for img, moved in zip(raw_a, raw_b):
                found = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)
                         if np.array_equal(_translate(img, dy, dx), moved)]
                assert found, f"task {i}: not a translation by at most {k} pixels"
                offsets.add(found[0])
    assert offsets == {(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)}


def _spec(ways: int, shots: int, queries: int, eval_queries: int | None = None) -> TaskSpec:
    return TaskSpec(ways=ways, shots=shots, queries=queries, eval_queries=eval_queries, seed=0,
                    rotations=False, shift=0)


def test_too_many_ways_or_shots_is_one_user_error_line_naming_the_keys():
    data = make_data()
    with pytest.raises(UserError, match="data.ways=7 but the val split"):
        check_tasks(data, _spec(ways=7, shots=1, queries=1), ("val",))
    with pytest.raises(UserError, match="data.shots \\+ data.queries = 9"):
        check_tasks(data, _spec(ways=2, shots=4, queries=5), ("train",))
    # validation and test tasks take eval.queries where it is set, and the message says so
    with pytest.raises(UserError, match="data.shots \\+ eval.queries = 9 .* of the val split"):
        check_tasks(data, _spec(ways=2, shots=1, queries=1, eval_queries=8))
    check_tasks(data, _spec(ways=2, shots=1, queries=1, eval_queries=2))  # fits
    with pytest.raises(AssertionError):  # the sampler only asserts: the boundary checked it
        TaskSampler(data, "val", ways=7, shots=1, queries=1, seed=0)


def test_eval_queries_apply_to_validation_and_test_tasks_only():
    from sparsemeta.config import build_config
    from sparsemeta.data.tasks import sampler_for

    cfg = build_config(overrides=["data.queries=1", "eval.queries=3"])
    data = make_data()
    assert sampler_for(cfg.task_spec(), data, "train").task(0).query_x.shape[0] == 5 * 1
    assert sampler_for(cfg.task_spec(), data, "val").task(0).query_x.shape[0] == 5 * 3
    assert sampler_for(cfg.task_spec(), data, "test").task(0).query_x.shape[0] == 5 * 3
