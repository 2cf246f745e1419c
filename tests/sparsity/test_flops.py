"""MAC counting against hand calculations (Conv4-32 on 28×28 glyphs, 5-way 1-shot) and against
what torch's own ``FlopCounterMode`` counts for the forwards, backwards and tasks it runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsemeta.config import Config, build_config
from sparsemeta.data.tasks import Task
from sparsemeta.meta.learners import build_learner
from sparsemeta.models.conv4 import Conv4, forward_tasks
from sparsemeta.sparsity.flops import (
    BACKWARD_PER_FORWARD,
    FLOPS_PER_MAC,
    TaskShape,
    eval_task_macs,
    forward_macs,
    train_task_macs,
)
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


# -- against torch's own counter -------------------------------------------------------------
# ``torch.utils.flop_counter.FlopCounterMode`` counts what torch executes: 2 FLOPs per MAC of
# every convolution (forward and backward) and matrix product, bias additions excluded — the
# package's convention, so one forward must agree exactly.

WAYS = 5
FIRST = "blocks.0.conv.weight"
GRID = [(c, size, filters, down) for c in (1, 3) for size in (28, 30, 84)
        for filters in (8, 32, 64) for down in ("maxpool", "stride")]


def _torch_macs(run: Callable[[], object]) -> dict[str, int]:
    """MACs torch's FlopCounterMode counts while ``run`` runs, per op and in ``total``."""
    with FlopCounterMode(display=False) as counter:
        run()
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    flops["total"] = counter.get_total_flops()
    assert all(n % FLOPS_PER_MAC == 0 for n in flops.values())
    return {op: n // FLOPS_PER_MAC for op, n in flops.items()}


def _layer_macs(model: Conv4) -> dict[str, int]:
    """The package's MACs of one example's dense forward, per weight tensor."""
    params = dict(model.named_parameters())
    return {k: forward_macs({k: n}, {k: params[k].numel()}) for k, n in model.positions.items()}


@pytest.mark.parametrize(("in_channels", "size", "filters", "downsample"), GRID)
def test_dense_forward_equals_torch_flop_counter(in_channels: int, size: int, filters: int,
                                                 downsample: str) -> None:
    """Conv MACs (``positions`` × weights) and head MACs each equal torch's count of one
    forward, for any batch size."""
    model = Conv4(in_channels, WAYS, size, filters, downsample)
    layers = _layer_macs(model)
    conv = sum(n for k, n in layers.items() if k != "head.weight")
    for rows in (1, 3):
        x = torch.randn(rows, in_channels, size, size)
        with torch.no_grad():
            counted = _torch_macs(lambda x=x: model(x))
        assert counted == {"aten.convolution": rows * conv,
                           "aten.addmm": rows * layers["head.weight"],
                           "total": rows * sum(layers.values())}


@pytest.mark.parametrize(("in_channels", "size", "downsample"),
                         [(1, 28, "maxpool"), (3, 30, "stride"), (3, 84, "maxpool")])
def test_backward_is_two_forwards_less_the_first_convs_input_gradient(
        in_channels: int, size: int, downsample: str) -> None:
    """What torch runs for a forward + backward, against the package's 3 × forward.

    Every conv/linear layer's backward is two products as large as its forward — the gradient
    of its input (a transposed convolution) and of its weight — and torch counts both, except
    the first conv's input gradient when the images do not require grad (training never asks
    for it). The package counts every layer's backward as 2 × its forward, as RigL (Evci et al.,
    2020) and Gao et al. (KDD 2022) do: the same rule for every layer and method keeps ratios
    fair, and the excess is one term, the first conv's forward per row — an upper bound, by
    1.5% of the 3 × forward for Conv4-64 on 28×28 glyphs, 2.9% for Conv4-32 there and 7.4% for
    Conv4-32 on 84×84 RGB, whose first conv is 22% of its forward.
    """
    model = Conv4(in_channels, WAYS, size, 8, downsample)
    forward = sum(_layer_macs(model).values())
    first = _layer_macs(model)[FIRST]
    rows = 4
    images = torch.randn(rows, in_channels, size, size)
    weights_only = _torch_macs(lambda: model(images).sum().backward())
    assert weights_only["total"] == rows * ((1 + BACKWARD_PER_FORWARD) * forward - first)
    wanted = images.clone().requires_grad_(True)
    with_input = _torch_macs(lambda: model(wanted).sum().backward())
    assert with_input["total"] == rows * (1 + BACKWARD_PER_FORWARD) * forward


# (overrides of glyphs-lottery, multi-step loss weights, products torch does not run, in units of
# the first conv's one-row forward): 5 support and 25 query rows (5-way 1-shot, 5 queries); per
# support row of an inner step 1 (its backward's input gradient) and, second order, 3 more; per
# query row of each query pass 1
META_CASES = [
    ([], None, 1 * 5 * (1 + 3) + 25),
    (["meta.first_order=true"], None, 1 * 5 * 1 + 25),
    (["meta.inner_steps=2"], None, 2 * 5 * (1 + 3) + 25),
    (["meta.inner_steps=2"], [0.5, 0.5], 2 * 5 * (1 + 3) + 2 * 25),
    (["meta.inner_steps=3", "meta.first_order=true"], [0.2, 0.3, 0.5], 3 * 5 * 1 + 3 * 25),
    (["meta.bn=support"], None, 1 * 5 * (1 + 3) + (25 + 5)),
    (["meta.bn=support", "meta.inner_steps=2", "data.shots=2"], None,
     2 * 10 * (1 + 3) + (25 + 10)),
]
META_SIZE = 16


def _task(cfg: Config) -> Task:
    d, g = cfg.data, torch.Generator().manual_seed(0)
    support, query = d.ways * d.shots, d.ways * d.queries
    return Task(torch.randn(support, 1, META_SIZE, META_SIZE, generator=g),
                torch.arange(support) % d.ways,
                torch.randn(query, 1, META_SIZE, META_SIZE, generator=g),
                torch.arange(query) % d.ways)


@pytest.mark.parametrize(("overrides", "step_weights", "skipped"), META_CASES)
def test_meter_task_equals_torch_less_the_first_convs_input_gradients(
        overrides: list[str], step_weights: list[float] | None, skipped: int) -> None:
    """The meter's dense count of one meta-training task and one evaluation task, against
    what torch runs for the learner's own outer loss and meta-gradient, and its adaptation.

    They differ by exactly the first conv's products that need the images' gradient (see the
    backward test above). Back through an inner step the package counts 2 × (forward +
    backward), 6 products per layer: the double backward of the input and weight gradients (4)
    and the inner forward's backward again (2). Of the first conv's 6 torch runs 3 — no input
    gradient to differentiate, and none again in the repeated backward — though it does compute
    one unneeded product, the images' gradient of the weight gradient.
    """
    cfg = build_config("glyphs-lottery", [f"data.image_size={META_SIZE}", "model.filters=8",
                                          *overrides])
    learner = build_learner(cfg, 1)
    learner.step_weights = step_weights  # as MAML++'s multi-step loss sets it
    params = dict(learner.model.named_parameters())
    first = _layer_macs(learner.model)[FIRST]
    task = _task(cfg)

    # a task's share of meta_gradient_step, run here: the counter sees only its own thread,
    # and meta_gradient_step runs tasks on task threads
    def meta_gradient() -> None:
        loss, _ = learner.outer_loss(params, task)
        torch.autograd.grad(loss, list(params.values()), allow_unused=True)

    train = _torch_macs(meta_gradient)["total"]
    evaluation = _torch_macs(lambda: learner.evaluate_task(params, task,
                                                           cfg.meta.eval_inner_steps))["total"]
    meter = meter_for(learner)
    meter.train_step(cfg, learner, None, tasks=1)
    meter.evaluation(cfg, None, tasks=1)
    assert train == meter.totals["train_dense"] - skipped * first
    support = cfg.data.ways * cfg.data.shots
    assert evaluation == meter.totals["eval_dense"] - cfg.meta.eval_inner_steps * support * first


def test_grouped_tasks_forward_equals_torch_flop_counter() -> None:
    """``forward_tasks`` (one grouped convolution and a batched product for T tasks) runs T
    tasks' forwards: T × rows × the package's forward."""
    model, tasks, rows = Conv4(3, WAYS, 30, 8, "stride"), 3, 4
    params = {k: torch.stack([v.detach()] * tasks) for k, v in model.named_parameters()}
    x = torch.randn(tasks, rows, 3, 30, 30)
    counted = _torch_macs(lambda: forward_tasks(model, params, x))
    assert counted["total"] == tasks * rows * sum(_layer_macs(model).values())
    assert counted["aten.baddbmm"] == tasks * rows * _layer_macs(model)["head.weight"]
