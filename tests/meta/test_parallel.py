"""Tasks on threads (issue #14): the thread count never changes a result, the per-task loop is
matched in float64, running BN statistics stay in task order, evaluation is unchanged."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.data.tasks import Task, sampler_for
from sparsemeta.experiments.methods import base
from sparsemeta.experiments.runner import check_experiment, run_seed
from sparsemeta.foundations import runtime
from sparsemeta.meta import parallel
from sparsemeta.meta.core import MetaLearner, channels_last
from sparsemeta.meta.engine import Engine
from sparsemeta.meta.learners import build_learner
from sparsemeta.models.conv4 import Conv4
from sparsemeta.sparsity.masks import full_mask
from sparsemeta.sparsity.prune import magnitude_prune
from sparsemeta.training.evaluate import evaluate
from sparsemeta.training.setup import prepare
from tests.conftest import make_data


def _tasks(n: int, dtype: torch.dtype, shots: int = 2, queries: int = 2) -> list[Task]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        x = torch.randn(3 * (shots + queries), 1, 16, 16, generator=gen, dtype=dtype)
        out.append(Task(x[:3 * shots], torch.arange(3).repeat_interleave(shots),
                        x[3 * shots:], torch.arange(3).repeat_interleave(queries), index=i))
    return out


def _learner(variant: str, dtype: torch.dtype) -> MetaLearner:
    torch.manual_seed(0)
    steps = 2
    model = Conv4(1, 3, 16, filters=6, bn_steps=steps + 1 if variant == "mamlpp" else 1,
                  bn_running=variant == "running").to(dtype)
    kwargs: dict = {"inner_lr": 0.3, "inner_steps": steps}
    if variant == "mamlpp":
        kwargs.update(lr_rule="lslr")
    elif variant == "metasgd":
        kwargs.update(lr_rule="metasgd", first_order=True)
    elif variant == "metamix":
        kwargs.update(metamix=(2.0, 2.0), metamix_seed=3)
    elif variant in ("running", "support"):
        kwargs.update(bn=variant)
    elif variant == "head":
        kwargs.update(adapt="head")
    elif variant == "first":
        kwargs.update(first_order=True)
    learner = MetaLearner(model, **kwargs)
    if variant == "mamlpp":
        learner.step_weights = [0.3, 0.7]
    if variant == "metamix":
        learner.channel_shuffle = True
    if variant == "masked":
        params = dict(model.named_parameters())
        learner.mask = magnitude_prune(params, full_mask(params), 0.5)
    return learner


def _meta_gradient(variant: str, dtype: torch.dtype, threads: int, tasks: list[Task]
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """(gradients of the model and learned rates, running buffers, (loss, acc))."""
    learner = _learner(variant, dtype)
    learner.threads = threads
    out = learner.meta_gradient_step(dict(learner.model.named_parameters()), tasks)
    grads = torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])
    buffers = [b.flatten() for b in learner.model.buffers()]
    return grads, torch.cat(buffers) if buffers else torch.zeros(0), out


VARIANTS = ["maml", "first", "mamlpp", "metasgd", "metamix", "support", "running", "head",
            "masked"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thread_count_never_changes_the_meta_gradient(variant, dtype):
    tasks = _tasks(5, dtype)
    one = _meta_gradient(variant, dtype, 1, tasks)
    for threads in (2, 3):
        other = _meta_gradient(variant, dtype, threads, tasks)
        assert torch.equal(one[0], other[0]), f"{variant} {dtype} threads={threads}"
        assert torch.equal(one[1], other[1])  # running statistics: same updates, same order
        assert one[2] == other[2]
    if variant in ("mamlpp", "metasgd"):  # the learned rates are in the sum
        assert one[0].numel() > sum(p.numel() for p in _learner(variant, dtype).model.parameters())


def _per_task_loop(learner: MetaLearner, tasks: list[Task]) -> torch.Tensor:
    """The loop the core replaced: outer loss, backward, task after task on this thread."""
    learner.tracking = True
    for task in tasks:
        loss, _ = learner.outer_loss(dict(learner.model.named_parameters()), task)
        (loss / len(tasks)).backward()
    learner.tracking = False
    return torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])


@pytest.mark.parametrize("variant", VARIANTS)
def test_threaded_meta_gradient_equals_the_per_task_loop_in_float64(variant):
    tasks = _tasks(4, torch.float64)
    threaded, buffers, _ = _meta_gradient(variant, torch.float64, 2, tasks)
    loop_learner = _learner(variant, torch.float64)
    looped = _per_task_loop(loop_learner, tasks)
    assert float((threaded - looped).norm() / looped.norm()) <= 1e-12
    loop_buffers = [b.flatten() for b in loop_learner.model.buffers()]
    if loop_buffers:
        assert torch.allclose(buffers, torch.cat(loop_buffers), rtol=1e-12, atol=0)
        assert float(buffers.abs().sum()) > 0


def test_channels_last_first_order_agrees_with_nchw_and_leaves_grad_layout_alone():
    tasks = _tasks(3, torch.float32)
    grads = {}
    for layout in (False, True):
        learner = _learner("first", torch.float32)
        learner.channels_last = layout
        learner.meta_gradient_step(dict(learner.model.named_parameters()), tasks)
        grads[layout] = torch.cat([p.grad.flatten() for p in learner.parameters()])
        weight = learner.model.blocks[1].conv.weight
        assert weight.grad.stride() == weight.stride()  # .grad follows the parameter's layout
    rel = float((grads[True] - grads[False]).norm() / grads[False].norm())
    assert rel < 1e-4


def test_channels_last_restrides_single_channel_tensors_as_views():
    x = torch.randn(4, 1, 6, 5, requires_grad=True)
    y = channels_last(x)
    assert y.stride() == (30, 1, 5, 1) and y.data_ptr() == x.data_ptr() and torch.equal(x, y)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    z = channels_last(torch.randn(2, 3, 4, 4))
    assert z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()
    assert channels_last(torch.randn(3, 4)).is_contiguous()


def _cfg(extra: list[str]) -> object:
    return build_config(overrides=["device=cpu", "data.image_size=16", "model.filters=8",
                                   "data.queries=3", "meta.eval_inner_steps=3", *extra])


@pytest.mark.parametrize("bn", ["transductive", "running"])
def test_evaluation_is_the_same_for_any_thread_count_and_matches_the_old_loop(bn):
    data = make_data()
    cfg = _cfg([f"meta.bn={bn}"])
    learner = build_learner(cfg, data.channels)
    if bn == "running":  # statistics that are not the initial ones
        learner.meta_gradient_step(dict(learner.model.named_parameters()),
                                   [sampler_for(cfg.task_spec(), data, "train").task(i) for i in range(3)])
    params = dict(learner.model.named_parameters())
    sampler = sampler_for(cfg.task_spec(), data, "test")
    results = []
    for threads in (1, 2, 3):
        learner.threads = threads
        results.append(evaluate(Engine(threads=threads), learner, params, sampler, 24, 3))
    assert results[0] == results[1] == results[2]
    # the old evaluation: task after task on this thread, NCHW
    learner.channels_last = False
    old = [learner.evaluate_task(params, sampler.task(i), 3) for i in range(24)]
    learner.channels_last = None
    accs = np.array([a for a, _ in old])
    losses = np.array([loss for _, loss in old])
    new_accs = [r["accuracy"] for r in results[0].per_step]
    assert new_accs == [float(np.mean(accs[:, s])) for s in range(4)]
    assert np.allclose([r["loss"] for r in results[0].per_step], losses.mean(axis=0),
                       rtol=1e-5, atol=0)


def test_train_threads_reach_the_learner_through_the_engine():
    data = make_data()
    setup = prepare(_cfg(["train.threads=3"]), data)
    learner = build_learner(setup.cfg, 1)
    params = dict(learner.model.named_parameters())
    sampler = sampler_for(setup.cfg.task_spec(), data, "test")
    list(setup.engine.evaluate_tasks(learner, params, sampler.task, [0], 1))
    assert setup.engine.threads == 3 and learner.threads == 3  # the engine sets its threads


@pytest.mark.skipif(runtime.cores() < 2, reason="needs two cores to share")
def test_a_training_process_resolves_the_engines_threads_for_its_share_of_the_cores(
        tmp_path, monkeypatch):
    """A runner gives each process cores/workers threads (torch.set_num_threads) *after* the
    setup was prepared; the process's engine must take that share, not the preparer's."""
    data = make_data()
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the preparing process has two threads…
    try:
        setup = prepare(_cfg(["train.iterations=1", "train.val_every=1", "train.val_tasks=2",
                              "eval.tasks=2", "prune.levels=1"]), data)
    finally:
        torch.set_num_threads(before)
    assert setup.engine.threads == 2
    seen = []
    real = base.train

    def spy(s, out, d, **kwargs):
        seen.append(s.engine.threads)
        return real(s, out, d, **kwargs)

    monkeypatch.setattr(base, "train", spy)
    torch.set_num_threads(1)  # …a training process of the runner one
    try:
        assert setup.in_this_process().engine.threads == 1
        exp = check_experiment(setup, ["dense"], [0], [], data.channels)
        run_seed(exp, tmp_path, 0, data, lambda *a: None, progress=False)
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


def test_ordered_map_keeps_order_and_raises_at_the_failing_item():
    def slow_first(i: int) -> int:
        if i == 0:
            threading.Event().wait(0.05)  # finishes last
        if i == 7:
            raise KeyError(i)
        return i * i

    assert list(parallel.ordered_map(slow_first, range(7), threads=3)) == [i * i for i in range(7)]
    got = []
    with pytest.raises(KeyError):
        for value in parallel.ordered_map(slow_first, range(10), threads=2):
            got.append(value)
    assert got == [i * i for i in range(7)]


def test_task_threads_compute_with_one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = set(parallel.ordered_map(lambda _: torch.get_num_threads(), range(8), threads=2))
        assert seen == {1}
        assert torch.get_num_threads() == 2  # the caller's setting is left alone
    finally:
        torch.set_num_threads(before)


def test_no_threads_off_the_cpu():
    learner = MetaLearner(Conv4(1, 3, 16, filters=4).to("meta"), inner_lr=0.1, inner_steps=1,
                          threads=4)
    where = list(learner.map_tasks(lambda _: threading.current_thread(), range(3)))
    assert where == [threading.main_thread()] * 3


def test_resolve_threads_and_configure():
    assert runtime.resolve_threads(3) == 3
    with pytest.raises(ValueError):
        runtime.resolve_threads(0)
    before = torch.get_num_threads()
    try:
        assert runtime.configure(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert 1 <= runtime.resolve_threads(None) <= runtime.MAX_AUTO_THREADS


@pytest.mark.skipif(runtime.platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_settings_are_taken_by_glibc_and_stop_page_faults():
    """In a fresh process (the settings are process-wide): once the heap has grown, tasks that
    allocate and free 68 MB buffers (84×84 query activations) stop faulting their pages in."""
    code = (
        "import resource, sys, torch\n"
        "from sparsemeta.foundations import runtime\n"
        "tuned = sys.argv[1] == '1' and runtime.tune_allocator() and runtime.tune_allocator()\n"
        "def task():\n"
        "    x = torch.ones(17 * 2**20)\n"
        "    return float((x * 2 + x).sum())\n"
        "for _ in range(5): task()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): task()\n"
        "print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    runs = {}
    for tune in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, tune], capture_output=True, text=True,
                             check=True).stdout.split()
        runs[tune] = (out[0], int(out[1]))
    assert runs["0"][1] >= 5 * 2 * 17000  # glibc's defaults: two buffers mmap'ed afresh each time
    assert runs["1"][0] == "True" and runs["1"][1] < runs["0"][1] / 4
