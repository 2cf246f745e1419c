"""The grouped core (all tasks in one pass, grouped convolutions) computes what the per-task
loop computes: meta-gradients and evaluations equal in float64 for every configuration it takes,
and a clear refusal for the ones it cannot express."""

from __future__ import annotations

import pytest
import torch

from sparsemeta.data.tasks import Task
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.engine import Engine
from sparsemeta.meta.grouped import Grouped, unsupported
from sparsemeta.models.conv4 import Conv4, Pass, forward_tasks
from tests.meta.tiny import SIZE, WAYS, tiny_tasks

_tasks = tiny_tasks


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread is faster, and far faster when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**kwargs) -> Conv4:
    torch.manual_seed(0)
    return Conv4(in_channels=1, ways=WAYS, image_size=SIZE, filters=4, **kwargs).double()


def _grads(step, learner: MetaLearner, tasks: list[Task]) -> tuple[torch.Tensor, float, float]:
    """The meta-gradient of every parameter and learned rate, except the conv biases': batch
    norm cancels a conv bias, so its gradient (and its learned rate's) is rounding noise
    (checked below to be that), which two summation orders do not share."""
    params = dict(learner.model.named_parameters())
    for p in learner.parameters():
        p.grad = None
    loss, acc = step(params, tasks)
    named = [*params.items(), *learner.rates.items()]
    for name, p in named:
        if name.replace("-", ".").endswith("conv.bias") and p.grad is not None:
            assert float(p.grad.abs().max()) < 1e-12
    grads = [p.grad.flatten() for name, p in named
             if p.grad is not None and not name.replace("-", ".").endswith("conv.bias")]
    return torch.cat(grads), loss, acc


def _both(learner: MetaLearner, tasks: list[Task]):
    loop = _grads(learner.meta_gradient_step, learner, tasks)
    grouped = _grads(Grouped(learner).meta_gradient_step, learner, tasks)
    return loop, grouped


def _assert_equal(loop, grouped) -> None:
    (g_loop, loss_loop, acc_loop), (g_grp, loss_grp, acc_grp) = loop, grouped
    assert g_grp.shape == g_loop.shape
    assert float((g_grp - g_loop).norm() / g_loop.norm()) <= 1e-12
    assert loss_grp == pytest.approx(loss_loop, rel=1e-12)
    assert acc_grp == pytest.approx(acc_loop, abs=1e-12)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("bn", ["transductive", "support"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_meta_gradient_equals_the_loop(first_order, bn, masked):
    model = _model()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    mask = ({k: torch.rand(v.shape, generator=gen) > 0.5 for k, v in params.items()
             if v.dim() >= 2} if masked else None)
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=2, first_order=first_order, bn=bn,
                          mask=mask)
    loop, grouped = _both(learner, _tasks(3))
    _assert_equal(loop, grouped)
    if masked:
        for k, m in mask.items():
            assert torch.count_nonzero(params[k].grad[~m]) == 0


@pytest.mark.parametrize("lr_rule", ["lslr", "metasgd"])
def test_learned_inner_rates_get_the_loops_meta_gradient(lr_rule):
    """MAML++'s per-step rates with per-step batch norm and the multi-step loss; Meta-SGD's α."""
    per_step = lr_rule == "lslr"
    learner = MetaLearner(_model(bn_steps=3 if per_step else 1), inner_lr=0.3, inner_steps=2,
                          lr_rule=lr_rule)
    learner.rates.double()  # created in the default dtype
    if per_step:
        learner.step_weights = [0.3, 0.7]
    with torch.no_grad():  # rates that differ per layer and step, so a mix-up shows
        for i, rate in enumerate(learner.rates.values()):
            rate.mul_(1 + 0.1 * i + 0.05 * torch.arange(rate.numel(), dtype=rate.dtype)
                      .view(rate.shape))
    loop, grouped = _both(learner, _tasks(3))
    _assert_equal(loop, grouped)
    # (with per-step batch norm a step's BN update is never read again: only these learn)
    rate_grads = [r.grad for k, r in learner.rates.items()
                  if k.endswith("conv-weight") or k.startswith("head")]
    assert all(g is not None and float(g.abs().min()) > 0 for g in rate_grads)


def test_strided_model_and_a_partial_adaptation_match_the_loop():
    learner = MetaLearner(_model(downsample="stride"), inner_lr=0.3, inner_steps=2, adapt="last:1")
    loop, grouped = _both(learner, _tasks(2))
    _assert_equal(loop, grouped)


def test_meta_gradient_accumulates_into_grad_like_backward():
    learner = MetaLearner(_model(), inner_lr=0.3, inner_steps=1)
    tasks = _tasks(2)
    once = _grads(learner.meta_gradient_step, learner, tasks)[0]
    grouped = Grouped(learner)
    twice = _grads(lambda p, t: (grouped.meta_gradient_step(p, t),
                                 grouped.meta_gradient_step(p, t))[-1], learner, tasks)[0]
    assert torch.allclose(twice, 2 * once, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bn", ["transductive", "support"])
def test_evaluation_equals_the_loops_task_by_task(bn):
    learner = MetaLearner(_model(), inner_lr=0.3, inner_steps=2, bn=bn)
    params = dict(learner.model.named_parameters())
    tasks = _tasks(5, seed=4)
    before = {k: v.clone() for k, v in params.items()}
    loop = list(learner.evaluate_tasks(params, lambda i: tasks[i], range(5), 3))
    grouped = list(Grouped(learner).evaluate_tasks(params, lambda i: tasks[i], range(5), 3))
    assert [i for i, *_ in grouped] == list(range(5))
    for (_, acc_l, loss_l), (_, acc_g, loss_g) in zip(loop, grouped):
        assert acc_g == acc_l and len(acc_g) == 4
        assert loss_g == pytest.approx(loss_l, rel=1e-12)
    assert loop[0][2][0] != loop[0][2][-1]  # adaptation changed the loss: steps were taken
    assert all(torch.equal(params[k], before[k]) for k in params)  # never writes the weights


def test_forward_tasks_is_each_tasks_own_forward():
    model = _model()
    gen = torch.Generator().manual_seed(5)
    stacked = {k: v.detach() + 0.1 * torch.randn((2, *v.shape), generator=gen, dtype=v.dtype)
               for k, v in model.named_parameters()}
    x = torch.randn(2, 4, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
    out = forward_tasks(model, stacked, x, Pass(stats_rows=3))
    for t in range(2):
        own = torch.func.functional_call(model, {k: v[t] for k, v in stacked.items()}, (x[t],),
                                         {"p": Pass(stats_rows=3)})
        assert torch.allclose(out[t], own, rtol=1e-12, atol=1e-12)


def test_says_what_it_cannot_compute_and_asserts_it_is_not_asked_to():
    assert "running" in unsupported("running", metamix=False)
    assert "MetaMix" in unsupported("transductive", metamix=True)
    assert unsupported("support", metamix=False) is None
    running = MetaLearner(Conv4(1, WAYS, SIZE, filters=4, bn_running=True), inner_lr=0.3,
                          inner_steps=1, bn="running")
    with pytest.raises(AssertionError):  # refused at the boundary (meta.engine), asserted here
        Grouped(running)
    learner = MetaLearner(_model(), inner_lr=0.3, inner_steps=1)
    tasks = _tasks(2)
    odd = Task(tasks[1].support_x[:-1], tasks[1].support_y[:-1], tasks[1].query_x,
               tasks[1].query_y)
    with pytest.raises(ValueError, match="must share shapes: task 1 has support"):
        Grouped(learner).meta_gradient_step(dict(learner.model.named_parameters()),
                                            [tasks[0], odd])


def test_the_engine_routes_meta_batches_and_evaluation_to_its_core():
    learner = MetaLearner(_model(), inner_lr=0.3, inner_steps=1)
    params, tasks = dict(learner.model.named_parameters()), _tasks(2)
    loop, grouped = (_grads(lambda p, t, core=core: Engine(core).meta_gradient_step(learner, p, t),
                            learner, tasks)[0] for core in ("loop", "grouped"))
    assert torch.allclose(grouped, loop, rtol=1e-10, atol=1e-12)
    rows = {core: list(Engine(core).evaluate_tasks(learner, params, lambda i: tasks[i], range(2),
                                                   2)) for core in ("loop", "grouped")}
    assert [r[0] for r in rows["grouped"]] == [0, 1]
    assert rows["grouped"][1][1] == pytest.approx(rows["loop"][1][1], abs=1e-12)
