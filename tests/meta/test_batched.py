"""The vmapped meta-gradient equals the per-task loop's, for every supported configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsemeta.data.tasks import Task
from sparsemeta.meta.batched import vmap_meta_gradient_step
from sparsemeta.meta.core import MetaLearner
from sparsemeta.models.conv4 import Conv4
from tests.meta.tiny import SIZE, WAYS, tiny_tasks

_tasks = tiny_tasks


def _meta_grad(step, learner: MetaLearner, params: dict, tasks: list[Task]):
    for p in params.values():
        p.grad = None
    loss, acc = step(params, tasks)
    return torch.cat([p.grad.flatten() for p in params.values() if p.requires_grad]), loss, acc


@pytest.fixture(scope="module")
def case():
    # Tiny tensors: one thread is faster, and far faster when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=WAYS, image_size=SIZE, filters=4).double()
    yield model, _tasks(3)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("bn", ["transductive", "support"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_vmap_meta_gradient_equals_loop(case, first_order, bn, masked):
    model, tasks = case
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    mask = ({k: torch.rand(v.shape, generator=gen) > 0.5 for k, v in params.items() if v.dim() >= 2}
            if masked else None)
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=2, first_order=first_order, bn=bn,
                          mask=mask)
    loop, loop_loss, loop_acc = _meta_grad(learner.meta_gradient_step, learner, params, tasks)
    vm, vm_loss, vm_acc = _meta_grad(
        lambda p, t: vmap_meta_gradient_step(learner, p, t), learner, params, tasks)
    assert torch.allclose(vm, loop, rtol=1e-9, atol=1e-13)
    assert vm_loss == pytest.approx(loop_loss, rel=1e-12)
    assert vm_acc == pytest.approx(loop_acc, abs=1e-6)
    if masked:
        for k, m in mask.items():
            assert torch.count_nonzero(params[k].grad[~m]) == 0


def test_first_and_second_order_differ(case):
    """Guards the comparison above: the Hessian term is large enough to be seen."""
    model, tasks = case
    params = dict(model.named_parameters())
    grads = []
    for first_order in (False, True):
        learner = MetaLearner(model, inner_lr=0.3, inner_steps=2, first_order=first_order)
        grads.append(_meta_grad(lambda p, t, lr=learner: vmap_meta_gradient_step(lr, p, t),
                                learner, params, tasks)[0])
    assert (grads[0] - grads[1]).norm() > 1e-3 * grads[0].norm()


def test_gradient_accumulates_and_frozen_parameters_are_respected(case):
    model, tasks = case
    params = dict(model.named_parameters())
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=1)
    frozen = "blocks.0.bn.weight"
    try:
        params[frozen].requires_grad_(False)
        loop, *_ = _meta_grad(learner.meta_gradient_step, learner, params, tasks)
        for p in params.values():
            p.grad = None
        vmap_meta_gradient_step(learner, params, tasks)
        vmap_meta_gradient_step(learner, params, tasks)  # .grad accumulates, like .backward()
        assert params[frozen].grad is None
        vm = torch.cat([p.grad.flatten() for p in params.values() if p.requires_grad])
        assert torch.allclose(vm, 2 * loop, rtol=1e-9, atol=1e-13)
    finally:
        params[frozen].requires_grad_(True)


def test_rejects_what_vmap_cannot_reproduce(case):
    model, tasks = case
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=1)
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="at least one task"):
        vmap_meta_gradient_step(learner, params, [])
    odd = Task(tasks[1].support_x[:-1], tasks[1].support_y[:-1], tasks[1].query_x,
               tasks[1].query_y)
    with pytest.raises(ValueError, match="identical shape"):
        vmap_meta_gradient_step(learner, params, [tasks[0], odd])

    torch_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                             nn.LazyLinear(WAYS))
    second = MetaLearner(_StatsRowsAdapter(torch_bn), inner_lr=0.1, inner_steps=1)
    with pytest.raises(ValueError, match="second-order"):
        vmap_meta_gradient_step(second, {}, tasks)
    first = MetaLearner(_StatsRowsAdapter(torch_bn), inner_lr=0.1, inner_steps=1,
                        first_order=True)
    with pytest.raises(ValueError, match="running statistics"):
        vmap_meta_gradient_step(first, {}, tasks)


class _StatsRowsAdapter(nn.Module):
    """A model with the ``stats_rows`` keyword the learner passes; only its modules matter here."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        return self.inner(x)
