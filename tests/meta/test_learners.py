"""MAML++, Meta-SGD and MetaMix as options of the one core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsemeta.config import build_config
from sparsemeta.data.tasks import Task, sampler_for
from sparsemeta.foundations.errors import UserError
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.engine import Engine
from sparsemeta.meta.learners import build_learner
from sparsemeta.meta.mamlpp import msl_weights, schedule
from sparsemeta.models.conv4 import Conv4, Mix, Pass, Shuffle
from sparsemeta.sparsity.masks import full_mask
from sparsemeta.sparsity.prune import magnitude_prune
from sparsemeta.training.evaluate import evaluate
from sparsemeta.training.loop import train_config as train
from tests.conftest import make_data


def _task(index: int = 0, shots: int = 2, queries: int = 2,
          dtype: torch.dtype = torch.float32) -> Task:
    gen = torch.Generator().manual_seed(index)
    x = torch.randn(3 * (shots + queries), 1, 16, 16, generator=gen).to(dtype)
    sy = torch.arange(3).repeat_interleave(shots)
    qy = torch.arange(3).repeat_interleave(queries)
    return Task(x[:3 * shots], sy, x[3 * shots:], qy, index=index)


def _shuffling_learner() -> tuple[Conv4, MetaLearner]:
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, filters=12).double()
    return model, MetaLearner(model, inner_lr=0.1, inner_steps=1, metamix=(2.0, 2.0), metamix_seed=3)


@pytest.mark.parametrize("rule", ["lslr", "metasgd"])
def test_learned_inner_rates_receive_gradients_and_change(rule):
    torch.manual_seed(0)
    learner = MetaLearner(Conv4(1, 3, 16, filters=4), inner_lr=0.1, inner_steps=2,
                          lr_rule=rule, eval_inner_steps=3)
    before = {k: v.detach().clone() for k, v in learner.rates.items()}
    shape = (3,) if rule == "lslr" else learner.model.head.weight.shape
    assert learner.rates["head-weight"].shape == shape
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    learner.meta_gradient_step(dict(learner.model.named_parameters()), [_task()])
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in learner.rates.values())
    if rule == "lslr":  # the third rate is only used by evaluation (3 steps): no gradient
        assert all(float(r.grad[2]) == 0.0 and float(r.grad[:2].abs().sum()) > 0
                   for r in learner.rates.values())
    opt.step()
    # (a conv bias feeding batch norm has a ~1e-14 gradient: BN cancels it, so its rate stays)
    moving = [k for k, v in learner.rates.items() if v.grad.abs().max() > 1e-6]
    assert len(moving) >= 13
    assert all(not torch.equal(before[k], learner.rates[k]) for k in moving)
    # the flat state round-trips the rates
    state = learner.state_dict()
    assert "inner_lr.head.weight" in state
    other = MetaLearner(Conv4(1, 3, 16, filters=4), inner_lr=0.1, inner_steps=2, lr_rule=rule,
                        eval_inner_steps=3)
    other.load_state_dict(state)
    assert torch.equal(other.rates["head-weight"], learner.rates["head-weight"])


def test_per_step_bn_uses_the_weights_and_running_statistics_of_its_own_step():
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, filters=4, bn_steps=3, bn_running=True)
    bn = model.blocks[0].bn
    assert bn.weight.shape == (3, 4) and bn.running_mean.shape == (3, 4)
    x = torch.randn(6, 1, 16, 16) * 3 + 2
    model(x, Pass(step=1, track=True))
    h = model.blocks[0].conv(x).detach()
    var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=1)
    assert torch.allclose(bn.running_mean[1], 0.1 * mean, atol=1e-6)
    assert torch.allclose(bn.running_var[1], 0.9 + 0.1 * var, atol=1e-5)
    assert torch.equal(bn.running_mean[0], torch.zeros(4)) and torch.equal(bn.running_mean[2],
                                                                           torch.zeros(4))
    # normalising with step 1's running statistics is exactly the formula
    with torch.no_grad():
        bn.weight[1] = torch.tensor([2.0, 1.0, 0.5, 1.5])
        bn.bias[1] = torch.tensor([0.1, -0.1, 0.0, 0.3])
    out = bn(h, Pass(step=1, running=True))
    expected = ((h - bn.running_mean[1].view(1, -1, 1, 1))
                / torch.sqrt(bn.running_var[1].view(1, -1, 1, 1) + 1e-5)
                * bn.weight[1].view(1, -1, 1, 1) + bn.bias[1].view(1, -1, 1, 1))
    assert torch.allclose(out, expected, atol=1e-5)
    # step 0 uses its own weights (still 1/0), so the outputs differ
    assert not torch.allclose(bn(h, Pass(step=0)), bn(h, Pass(step=1)))
    assert torch.allclose(bn(h, Pass(step=5)), bn(h, Pass(step=2)))  # clamped to the last slot


def test_running_policy_tracks_in_training_only_and_evaluates_with_running_statistics():
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, filters=4, bn_steps=2, bn_running=True)
    learner = MetaLearner(model, inner_lr=0.1, inner_steps=1, bn="running")
    params = dict(model.named_parameters())
    task = _task()
    learner.evaluate_task(params, task, 2)
    assert torch.equal(model.blocks[0].bn.running_mean, torch.zeros(2, 4))  # eval never writes
    learner.meta_gradient_step(params, [task])
    rm = model.blocks[0].bn.running_mean
    assert rm[0].abs().sum() > 0 and rm[1].abs().sum() > 0
    # at evaluation a query prediction no longer depends on the other query examples
    other = task.query_x.clone()
    other[1:] = torch.randn_like(other[1:])
    changed = Task(task.support_x, task.support_y, other, task.query_y)
    learner.evaluating = True
    a = learner.query_logits(params, task, 1)[0]
    b = learner.query_logits(params, changed, 1)[0]
    learner.evaluating = False
    assert torch.allclose(a, b, atol=1e-6)


def test_multi_step_loss_weights_anneal_towards_the_last_step_and_sum_to_one():
    steps, msl_epochs = 5, 10
    first = msl_weights(steps, 0, msl_epochs)
    assert first == pytest.approx([0.2] * 5)
    previous = first
    for epoch in range(1, 15):
        w = msl_weights(steps, epoch, msl_epochs)
        assert sum(w) == pytest.approx(1.0)
        assert all(a <= b for a, b in zip(w[:-1], previous[:-1])) and w[-1] >= previous[-1]
        assert min(w[:-1]) >= 0.03 / steps - 1e-12
        previous = w
    assert msl_weights(steps, 20, msl_epochs)[-1] == pytest.approx(1 - 4 * 0.03 / 5)


def test_schedule_switches_derivative_order_and_msl_at_the_configured_epochs():
    cfg = build_config(overrides=["meta.algorithm=mamlpp", "meta.inner_steps=3",
                                  "train.iterations=100", "train.meta_lr=0.001",
                                  "mamlpp.epoch_iterations=10", "mamlpp.first_order_epochs=2",
                                  "mamlpp.msl_epochs=3", "mamlpp.min_meta_lr=0.00001"])
    assert schedule(cfg, 19)[0] is True and schedule(cfg, 20)[0] is False
    assert schedule(cfg, 29)[1] is not None and schedule(cfg, 30)[1] is None
    assert schedule(cfg, 0)[2] == pytest.approx(1e-3)
    assert schedule(cfg, 50)[2] == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedule(cfg, 100)[2] == pytest.approx(1e-5)
    second = build_config(overrides=["meta.algorithm=mamlpp", "mamlpp.first_order_epochs=0"])
    assert schedule(second, 0)[0] is False


def test_metamix_loss_equals_the_formula_on_a_hand_built_case():
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, filters=4).double()
    learner = MetaLearner(model, inner_lr=0.1, inner_steps=1, metamix=(2.0, 2.0), metamix_seed=7)
    task = _task(index=11, dtype=torch.float64)
    params = dict(model.named_parameters())
    loss, _ = learner._query_loss(params, task, 1)

    rng = np.random.default_rng([7, 7717, 11, 1])
    lam = rng.beta(2.0, 2.0)
    perm = torch.as_tensor(rng.permutation(6))
    layer = int(rng.integers(0, 5))
    h = torch.cat([task.query_x, task.support_x])
    for i, block in enumerate(model.blocks):
        if i == layer:
            h = lam * h[:6] + (1 - lam) * h[6:][perm]
        h = block(h, Pass(step=1))
    if layer == 4:
        h = lam * h[:6] + (1 - lam) * h[6:][perm]
    logits = model.head(h.flatten(1))
    expected = (lam * F.cross_entropy(logits, task.query_y)
                + (1 - lam) * F.cross_entropy(logits, task.support_y[perm]))
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert 0 < lam < 1
    # and the same mixing through the model's own Mix hook
    direct = model(torch.cat([task.query_x, task.support_x]),
                   Pass(step=1, mix=Mix(layer, float(lam), 6, perm)))
    assert torch.allclose(direct, logits, rtol=1e-12)


def test_channel_shuffle_swaps_one_channel_group_between_classes_and_keeps_labels():
    model, learner = _shuffling_learner()
    task = _task(index=5, dtype=torch.float64)
    layer, group, classes = learner._shuffle_plan(task)
    assert sorted(classes.tolist()) == [0, 1, 2] and all(classes[c] != c for c in range(3))
    assert 0 <= layer <= 4 and 0 <= group < 6
    # support rows 0,1 are class 0, 2,3 class 1, 4,5 class 2: same-rank rows of the mapped class
    bounds = Shuffle(layer=1, group=2, source=torch.tensor([0])).bounds(12)
    assert bounds == (4, 6)  # 12 channels in 6 groups of 2
    h = torch.randn(6, 12, 4, 4, dtype=torch.float64)
    src = torch.tensor([2 * int(classes[c]) + r for c in range(3) for r in range(2)])
    shuffled = torch.cat([h[:, :4], h[src, 4:6], h[:, 6:]], dim=1)
    assert torch.equal(shuffled[:, :4], h[:, :4]) and torch.equal(shuffled[:, 6:], h[:, 6:])
    assert torch.equal(shuffled[0, 4:6], h[2 * int(classes[0]), 4:6])
    # the model's hook does exactly that at the chosen layer, here the output of block 1
    x = task.support_x
    shuffle = Shuffle(layer=2, group=2, source=src)
    a = model.blocks[1](model.blocks[0](x))
    hooked = model(x, Pass(shuffle=shuffle))
    b = torch.cat([a[:, :4], a[src, 4:6], a[:, 6:]], dim=1)
    expected = model.head(model.blocks[3](model.blocks[2](b)).flatten(1))
    assert torch.allclose(hooked, expected, rtol=1e-12)


def test_channel_shuffle_changes_the_outer_loss_only_when_switched_on():
    model, learner = _shuffling_learner()
    task = _task(index=5, dtype=torch.float64)
    params = dict(model.named_parameters())
    plain, _ = learner.outer_loss(params, task)
    learner.channel_shuffle = True
    shuffled, _ = learner.outer_loss(params, task)
    again, _ = learner.outer_loss(params, task)
    assert not torch.allclose(plain, shuffled) and torch.equal(shuffled, again)
    evaluated_on = learner.evaluate_task(params, task, 1)
    learner.channel_shuffle = False
    assert torch.equal(learner.outer_loss(params, task)[0], plain)
    assert learner.evaluate_task(params, task, 1) == evaluated_on  # evaluation never shuffles


def test_channel_shuffle_needs_metamix():
    with pytest.raises(UserError, match="metamix.channel_shuffle_from"):
        build_config(overrides=["metamix.channel_shuffle_from=10"])


def test_metamix_needs_as_many_queries_as_shots():
    with pytest.raises(UserError, match="needs data.queries == data.shots"):
        build_config(overrides=["meta.mix=metamix", "data.shots=1", "data.queries=15"])


OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8", "train.iterations=4",
             "train.meta_batch=2", "train.val_every=2", "train.val_tasks=4", "eval.tasks=12",
             "data.queries=1", "data.shots=1", "mamlpp.epoch_iterations=2",
             "mamlpp.first_order_epochs=1", "meta.inner_steps=2"]


@pytest.mark.parametrize("extra", [
    ["meta.algorithm=maml"],
    ["meta.algorithm=mamlpp"],
    ["meta.algorithm=mamlpp", "meta.bn=running"],
    ["meta.algorithm=metasgd"],
    ["meta.algorithm=maml", "meta.mix=metamix", "metamix.channel_shuffle_from=2"],
    ["meta.algorithm=mamlpp", "meta.mix=metamix", "meta.bn=support"],
])
def test_every_learner_trains_with_a_mask_that_stays_exact(tmp_path, extra):
    cfg = build_config(overrides=OVERRIDES + extra)
    data = make_data()
    learner = build_learner(cfg, data.channels)
    params = dict(learner.model.named_parameters())
    # a mask as production makes it: magnitude pruning of the prunable weights (conv and
    # linear; never biases or MAML++'s per-step batch-norm weights), half of them removed
    mask = magnitude_prune(params, full_mask(params), 0.5)
    assert all(".bn." not in k for k in mask) and len(mask) == 5
    res = train(cfg, tmp_path, data=data, mask=mask, progress=False)
    ev = res.evaluation
    assert len(ev.per_step) == cfg.meta.eval_inner_steps + 1
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for k, m in mask.items():
        assert torch.count_nonzero(ckpt["model"][k][~m]) == 0
        assert torch.count_nonzero(best[k][~m]) == 0
        # the survivors were trained (moved from θ₀), not merely left non-zero
        assert not torch.equal(ckpt["model"][k][m], init[k][m]), k
    if cfg.meta.algorithm != "maml":
        assert any(k.startswith("inner_lr.") for k in ckpt["model"])

    # labels are shuffled per task, so before adaptation a 5-way learner is at chance (0.2);
    # the synthetic classes are easy, so a few masked inner steps must lift it well above
    acc = [r["accuracy"] for r in ev.per_step]
    if cfg.meta.bn == "running":
        # evaluation normalises with running statistics that 4 iterations barely moved, so
        # accuracy says little; instead every step slot (support steps 0, 1; query step 2)
        # must have been tracked, in every block
        for i in range(4):
            rm = ckpt["model"][f"blocks.{i}.bn.running_mean"]
            assert rm.shape[0] == 3 and all(rm[s].abs().sum() > 0 for s in range(3))
    else:
        assert acc[0] < 0.35 and acc[-1] > 0.6, acc

    # the reported result is the chosen model (best.pt) evaluated *with its mask*: recomputed
    # from the files alone it is equal, and without the mask the adaptation is different
    def evaluation(with_mask):
        fresh = build_learner(cfg, data.channels, mask if with_mask else None)
        fresh.load_state_dict(best)
        return evaluate(Engine(), fresh, dict(fresh.model.named_parameters()),
                        sampler_for(cfg.task_spec(), data, "test"), cfg.eval.tasks,
                        cfg.meta.eval_inner_steps)

    assert evaluation(True) == ev
    unmasked = evaluation(False).per_step[-1]["loss"]
    assert abs(unmasked - ev.per_step[-1]["loss"]) > 1e-4
