"""RigL, ERK, the L1 term and early-bird detection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from sparsemeta.data.tasks import Task
from sparsemeta.experiments.methods import rigl as rigl_method
from sparsemeta.experiments.methods.earlybird import EarlyBirdHooks, EarlyBirdSettings
from sparsemeta.experiments.methods.l1 import L1Hooks
from sparsemeta.experiments.methods.rigl import RigLHooks
from sparsemeta.meta.core import MetaLearner
from sparsemeta.models.conv4 import Conv4
from sparsemeta.sparsity.masks import density, full_mask
from sparsemeta.sparsity.prune import MagnitudeRule
from sparsemeta.sparsity.rigl import (
    drop_and_grow,
    drop_fraction,
    erk_densities,
    layer_counts,
    random_mask,
)
from sparsemeta.training.hooks import StepContext


def _model():
    torch.manual_seed(0)
    return Conv4(1, ways=5, image_size=16, filters=8)


def _shapes(model):
    return {k: v.shape for k, v in model.named_parameters() if v.dim() >= 2}


@pytest.mark.parametrize("target", [0.05, 0.2, 0.5, 0.9])
def test_erk_densities_hit_the_target_and_none_exceeds_one(target):
    shapes = _shapes(_model())
    dens = erk_densities(shapes, target)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    overall = sum(dens[k] * sizes[k] for k in shapes) / sum(sizes.values())
    assert overall == pytest.approx(target, rel=1e-12)
    assert all(0 < d <= 1.0 for d in dens.values())
    # ERK gives the small first conv (9 inputs per filter) more density than the big ones
    assert dens["blocks.0.conv.weight"] > dens["blocks.2.conv.weight"]
    counts = layer_counts(shapes, target, "erk")
    kept = sum(counts.values()) / sum(sizes.values())
    assert kept == pytest.approx(target, abs=5 / sum(sizes.values()))


def test_erk_makes_layers_dense_when_their_share_would_exceed_one():
    shapes = {"small": torch.Size([4, 1, 3, 3]), "big": torch.Size([256, 256, 3, 3])}
    dens = erk_densities(shapes, 0.5)
    assert dens["small"] == 1.0 and dens["big"] < 0.5


def test_drop_and_grow_keeps_counts_drops_smallest_and_grows_largest_gradient():
    w = {"w": torch.tensor([[0.9, -0.1, 0.5, 0.0, 0.0, 0.0]])}
    mask = {"w": torch.tensor([[True, True, True, False, False, False]])}
    g = {"w": torch.tensor([[0.0, 0.0, 0.0, 0.2, -3.0, 1.0]])}
    new, grown = drop_and_grow(w, g, mask, fraction=0.34)  # round(0.34 * 3) = 1
    assert new["w"].tolist() == [[True, False, True, False, True, False]]
    assert grown["w"].tolist() == [[False, False, False, False, True, False]]
    assert int(new["w"].sum()) == 3


def test_drop_fraction_follows_the_cosine_schedule_and_stops_at_t_end():
    assert drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert drop_fraction(100, 0.3, 100) == 0.0 and drop_fraction(150, 0.3, 100) == 0.0


def _task(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 1, 16, 16, generator=gen)
    y = torch.arange(5).repeat(2)
    return Task(x[:5], y[:5], x[5:], y[5:])


def _dense_meta_gradient(model, eff, tasks, alpha):
    """∂L_q/∂(θ⊙m) of one second-order MAML step, averaged over tasks, written out directly
    (functional_call + autograd, no MetaLearner): the effective weights are the leaves and no
    mask is applied, so the gradient is non-zero where θ is pruned."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in eff.items()}
    total = {k: torch.zeros_like(v) for k, v in leaves.items()}
    for task in tasks:
        support = F.cross_entropy(functional_call(model, leaves, (task.support_x,)), task.support_y)
        grads = torch.autograd.grad(support, list(leaves.values()), create_graph=True)
        fast = {k: v - alpha * g for (k, v), g in zip(leaves.items(), grads)}
        query = F.cross_entropy(functional_call(model, fast, (task.query_x,)), task.query_y)
        for (k, _), g in zip(leaves.items(), torch.autograd.grad(query, list(leaves.values()))):
            total[k] += g / len(tasks)
    return total


def test_rigl_hook_keeps_density_exact_and_grows_where_the_meta_gradient_is_largest(monkeypatch):
    model = _model()
    params = dict(model.named_parameters())
    shapes = _shapes(model)
    counts = layer_counts(shapes, 0.3, "erk")
    mask = random_mask(shapes, counts, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k, m in mask.items():
            params[k].mul_(m)
    learner = MetaLearner(model, inner_lr=0.4, inner_steps=1, mask=mask)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tasks = [_task(3), _task(4)]
    for _ in range(3):  # build Adam state
        opt.zero_grad()
        learner.meta_gradient_step(params, tasks)
        opt.step()
    before = {k: m.clone() for k, m in mask.items()}
    eff = {k: (v * mask[k] if k in mask else v) for k, v in params.items()}
    expected = _dense_meta_gradient(model, eff, tasks, alpha=0.4)
    # the grow score the hook used, captured from the updater
    used = {}
    real = rigl_method.RigLUpdater

    def capturing(f0, every, end, dense_grad):
        def record():
            used.update(dense_grad())
            return used
        return real(f0, every, end, record)

    monkeypatch.setattr(rigl_method, "RigLUpdater", capturing)
    hook = RigLHooks(f0=0.3, every=1, end=100)
    assert hook.after_step(StepContext(1, params, mask, opt, learner, tasks))
    assert used.keys() == mask.keys()
    for k in mask:
        assert torch.allclose(used[k], expected[k], rtol=1e-4, atol=1e-7), k
        if (~before[k]).any():  # ERK may leave a small layer dense
            assert expected[k][~before[k]].abs().max() > 0  # non-zero where θ was pruned
    assert learner.mask is mask  # the hook gave the learner its mask back
    assert {k: int(m.sum()) for k, m in mask.items()} == counts
    assert density(mask) == pytest.approx(sum(counts.values()) / sum(m.numel() for m in mask.values()))
    for k, m in mask.items():
        grown = m & ~before[k]
        if not grown.any():
            continue
        inactive_not_grown = ~before[k] & ~m
        assert expected[k].abs()[grown].min() >= expected[k].abs()[inactive_not_grown].max()
        assert torch.count_nonzero(params[k][grown]) == 0  # grown weights start at zero
        state = opt.state[params[k]]
        assert torch.count_nonzero(state["exp_avg"][grown]) == 0
        assert torch.count_nonzero(state["exp_avg"][~m]) == 0
        assert torch.count_nonzero(params[k][~m]) == 0
    assert any((m != before[k]).any() for k, m in mask.items())


def test_l1_term_gradient_is_lambda_times_sign_on_prunable_weights_only():
    model = _model()
    params = dict(model.named_parameters())
    lam = 0.01
    L1Hooks(lam).regularizer(StepContext(1, params, None, None, None, [])).backward()
    for k, p in params.items():
        expected = lam * torch.sign(p.detach()) if p.dim() >= 2 else torch.zeros_like(p)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(got, expected), k


def test_early_bird_fires_when_the_last_distances_fall_below_epsilon_and_not_before():
    model = _model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    hook = EarlyBirdHooks(MagnitudeRule(0.2, "layerwise", 0.5),
                          EarlyBirdSettings(epsilon=0.01, every=1, window=3))
    gen = torch.Generator().manual_seed(0)
    fired = []
    for step in range(1, 13):
        if step <= 6:  # weights still moving a lot: the masks differ
            for v in params.values():
                v.add_(torch.randn(v.shape, generator=gen))
        fired.append(hook.should_stop(StepContext(step, params, None, None, None, [])))
    # distances at steps 2..6 are large (the weights moved), from step 7 on they are zero
    assert all(d > 0.01 for d in hook.distances[:5]) and hook.distances[5:8] == [0.0] * 3
    assert fired.index(True) == 8  # step 9: the last 3 distances (steps 7, 8, 9) are zero
    assert not any(fired[:8])
    state = hook.state_dict()
    again = EarlyBirdHooks(MagnitudeRule(0.2, "layerwise", 0.5),
                           EarlyBirdSettings(epsilon=0.01, every=1, window=3))
    again.load_state_dict(state)
    assert again.fired() and again.distances == hook.distances
    assert full_mask(params).keys() == state["previous"].keys()
