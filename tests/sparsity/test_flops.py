"""MAC counting against hand calculations (Conv4-32 on 28×28 glyphs, 5-way 1-shot)."""

from __future__ import annotations

import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.meta.learners import build_learner
from sparsemeta.models.conv4 import Conv4
from sparsemeta.sparsity.flops import TaskShape, eval_task_macs, forward_macs, train_task_macs
from sparsemeta.training.cost import meter_for

# one example's dense forward, by hand: conv k×k×in×out weights at every output pixel
# (28², 14², 7², 3² with max-pooling after each conv) and a 32×1×1 → 5 head
HAND_FORWARD = (9 * 1 * 32 * 28 * 28 + 9 * 32 * 32 * 14 * 14 + 9 * 32 * 32 * 7 * 7
                + 9 * 32 * 32 * 3 * 3 + 32 * 5)


def test_conv4_positions_give_the_hand_counted_forward() -> None:
    model = Conv4(in_channels=1, ways=5, image_size=28, filters=32)
    sizes = {k: p.numel() for k, p in model.named_parameters() if k in model.positions}
    assert forward_macs(model.positions, sizes) == HAND_FORWARD == 2_566_816


def test_stride_downsampling_counts_the_strided_output() -> None:
    model = Conv4(in_channels=3, ways=5, image_size=84, filters=32, downsample="stride")
    assert [model.positions[f"blocks.{i}.conv.weight"] for i in range(4)] == [42**2, 21**2,
                                                                              11**2, 6**2]


def test_second_order_task_by_hand() -> None:
    # 1 inner step on 5 support rows: forward + backward = 3F·5; query 25 rows: 3F·25;
    # back through the inner step: 2 × 3F·5
    f = HAND_FORWARD
    shape = TaskShape(support=5, query=25, inner_steps=1)
    assert train_task_macs(f, shape) == 15 * f + 75 * f + 30 * f
    first = TaskShape(support=5, query=25, inner_steps=1, second_order=False)
    assert train_task_macs(f, first) == 15 * f + 75 * f


def test_evaluation_task_by_hand() -> None:
    # 3 first-order steps on 5 rows, and a query forward of 25 rows after steps 0..3
    assert eval_task_macs(100, 5, 25, 3) == 3 * 3 * 100 * 5 + 4 * 100 * 25


def test_meter_counts_a_masked_meta_batch_at_its_layer_densities() -> None:
    cfg = build_config("glyphs-lottery")  # 5-way 1-shot, 5 queries, 1 inner step, Conv4-32
    learner = build_learner(cfg, 1)
    meter = meter_for(learner)
    mask = {k: torch.zeros_like(p, dtype=torch.bool)
            for k, p in learner.model.named_parameters() if k in learner.model.positions}
    mask["blocks.1.conv.weight"].view(-1)[:1000] = True  # one layer keeps 1,000 weights
    meter.train_step(cfg, learner, mask, tasks=8)
    sparse_forward = 1000 * 14 * 14
    assert meter.totals["train"] == 8 * 120 * sparse_forward
    assert meter.totals["train_dense"] == 8 * 120 * HAND_FORWARD
    meter.evaluation(cfg, None, tasks=10)
    assert meter.totals["eval"] == meter.totals["eval_dense"] == 10 * (
        3 * 3 * HAND_FORWARD * 5 + 4 * HAND_FORWARD * 25)


def test_forward_macs_refuses_a_layer_without_a_count() -> None:
    with pytest.raises(ValueError, match="head.weight"):
        forward_macs({"head.weight": 1}, {})
