"""The inner-loop core: meta-gradients against independent computations, BN policies, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsemeta.data.tasks import Task
from sparsemeta.meta.core import MetaLearner
from sparsemeta.models.conv4 import Conv4


class SmoothNet(nn.Module):
    """A tanh MLP: smooth, so central finite differences of the meta-loss are accurate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, p: object = None) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _task(gen: torch.Generator, shape: tuple[int, ...], ways: int, shots: int, queries: int,
          dtype=torch.float64) -> Task:
    sx = torch.randn(ways * shots, *shape, generator=gen, dtype=dtype)
    qx = torch.randn(ways * queries, *shape, generator=gen, dtype=dtype)
    return Task(sx, torch.arange(ways).repeat_interleave(shots), qx,
                torch.arange(ways).repeat_interleave(queries))


def _flat_grad(learner: MetaLearner, params: dict, task: Task) -> torch.Tensor:
    for p in params.values():
        p.grad = None
    learner.meta_gradient_step(params, [task])
    return torch.cat([p.grad.flatten() for p in params.values()])


def test_second_order_meta_gradient_matches_central_finite_differences():
    torch.manual_seed(0)
    model = SmoothNet().double()
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=2, first_order=False)
    task = _task(torch.Generator().manual_seed(1), (4,), ways=3, shots=2, queries=3)
    params = dict(model.named_parameters())
    analytic = _flat_grad(learner, params, task)

    flat = torch.cat([p.detach().flatten() for p in params.values()])
    names, shapes = list(params), [p.shape for p in params.values()]

    def meta_loss(vec: torch.Tensor) -> float:
        chunks = torch.split(vec, [s.numel() for s in shapes])
        p = {n: c.view(s).clone().requires_grad_(True) for n, c, s in zip(names, chunks, shapes)}
        return float(learner.outer_loss(p, task)[0].detach())

    eps = 1e-6
    numeric = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        numeric[i] = (meta_loss(flat + e) - meta_loss(flat - e)) / (2 * eps)
    rel = (analytic - numeric).norm() / numeric.norm()
    assert rel < 1e-7, f"relative error {rel:.2e}"


def _conv4_case():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=3, image_size=16, filters=4).double()
    task = _task(torch.Generator().manual_seed(2), (1, 16, 16), ways=3, shots=2, queries=2)
    return model, task


def test_conv4_one_step_meta_gradient_equals_explicit_hessian_vector_formula():
    """For one inner step θ' = θ − α∇L_s(θ): dL_q/dθ = g − α·H_s(θ)·g with g = ∇L_q(θ')."""
    model, task = _conv4_case()
    alpha = 0.1
    learner = MetaLearner(model, inner_lr=alpha, inner_steps=1, first_order=False)
    params = dict(model.named_parameters())
    core = _flat_grad(learner, params, task)

    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    support_loss = F.cross_entropy(learner.logits(theta, task.support_x), task.support_y)
    g_s = torch.autograd.grad(support_loss, list(theta.values()), create_graph=True)
    fast = {k: (v - alpha * g).detach().requires_grad_(True)
            for (k, v), g in zip(theta.items(), g_s)}
    query_loss = F.cross_entropy(learner.logits(fast, task.query_x), task.query_y)
    g_q = torch.autograd.grad(query_loss, list(fast.values()))
    hvp = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g_s, g_q)), list(theta.values()))
    expected = torch.cat([(gq - alpha * h).flatten() for gq, h in zip(g_q, hvp)])
    assert torch.allclose(core, expected, rtol=1e-10, atol=1e-12)
    # the Hessian term matters here, so the test can tell first from second order
    assert (core - torch.cat([g.flatten() for g in g_q])).norm() > 1e-4 * core.norm()


def test_first_order_equals_second_order_with_hessian_term_dropped():
    model, task = _conv4_case()
    learner = MetaLearner(model, inner_lr=0.1, inner_steps=3, first_order=True)
    params = dict(model.named_parameters())
    fo = _flat_grad(learner, params, task)

    fast = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(3):
        loss = F.cross_entropy(learner.logits(fast, task.support_x), task.support_y)
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {k: (v - 0.1 * g).detach().requires_grad_(True)
                for (k, v), g in zip(fast.items(), grads)}
    query_loss = F.cross_entropy(learner.logits(fast, task.query_x), task.query_y)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(query_loss, list(fast.values()))])
    assert torch.allclose(fo, expected, rtol=1e-10, atol=1e-12)


def test_support_bn_normalises_query_with_support_statistics():
    model, task = _conv4_case()
    # query = copies of the first support image: under 'support' each copy is normalised with
    # the support statistics, so its logits equal that support image's logits.
    query = Task(task.support_x, task.support_y, task.support_x[:1].repeat(4, 1, 1, 1),
                 torch.zeros(4, dtype=torch.long))
    params = dict(model.named_parameters())
    sup = MetaLearner(model, inner_lr=0.1, inner_steps=1, bn="support")
    expected = sup.logits(params, task.support_x)[0]
    got = sup.query_logits(params, query)
    assert torch.allclose(got, expected.expand_as(got), atol=1e-10)
    # transductive: the identical query rows have zero batch variance → all-equal, bias-only output
    trans = MetaLearner(model, inner_lr=0.1, inner_steps=1, bn="transductive")
    assert not torch.allclose(trans.query_logits(params, query), got, atol=1e-3)


def test_support_bn_query_predictions_are_independent_of_other_queries():
    model, task = _conv4_case()
    params = dict(model.named_parameters())
    other = task.query_x.clone()
    other[1:] = torch.randn_like(other[1:])
    changed = Task(task.support_x, task.support_y, other, task.query_y)
    sup = MetaLearner(model, inner_lr=0.1, inner_steps=1, bn="support")
    assert torch.allclose(sup.query_logits(params, task)[0], sup.query_logits(params, changed)[0],
                          atol=1e-12)
    trans = MetaLearner(model, inner_lr=0.1, inner_steps=1, bn="transductive")
    diff = (trans.query_logits(params, task)[0] - trans.query_logits(params, changed)[0]).abs()
    assert diff.max() > 1e-6


def test_evaluation_leaves_parameters_and_buffers_untouched():
    """With meta.bn=running the model has running-statistic buffers (per step) that a
    tracking forward writes: evaluation must read them and leave them, and the parameters,
    bit-identical."""
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=3, image_size=16, filters=4, bn_steps=2,
                  bn_running=True).double()
    _, task = _conv4_case()
    learner = MetaLearner(model, inner_lr=0.4, inner_steps=1, bn="running")
    params = dict(model.named_parameters())
    learner.meta_gradient_step(params, [task])  # meta-training tracks: the buffers move
    for p in params.values():
        p.grad = None
    buffers = dict(model.named_buffers())
    assert len(buffers) == 8 and all(
        not torch.equal(b[0], torch.zeros_like(b[0])) for k, b in buffers.items() if "mean" in k)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = Task(task.support_x, task.support_y, task.support_x, task.support_y)  # learnable
    accs, losses = learner.evaluate_task(params, task, steps=5)
    assert len(accs) == 6 and losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not learner.evaluating and not learner.tracking
    # evaluation did use those buffers: with other running statistics the losses differ
    with torch.no_grad():
        for k, b in buffers.items():
            b.mul_(1.5) if "var" in k else b.add_(0.5)
    assert learner.evaluate_task(params, task, steps=5)[1] != losses


def test_masked_weights_stay_zero_through_second_order_inner_loop():
    model, task = _conv4_case()
    params = dict(model.named_parameters())
    mask = {k: torch.rand_like(v) > 0.5 for k, v in params.items() if v.dim() >= 2}
    with torch.no_grad():
        for k, m in mask.items():
            params[k].mul_(m)
    learner = MetaLearner(model, inner_lr=0.4, inner_steps=3, mask=mask)
    trajectory = learner.adapt(params, task, 3, create_graph=True)
    for fast in trajectory:
        for k, m in mask.items():
            assert torch.count_nonzero(fast[k][~m]) == 0
    learner.meta_gradient_step(params, [task])
    for k, m in mask.items():
        assert torch.count_nonzero(params[k].grad[~m]) == 0
        assert torch.count_nonzero(params[k].grad[m]) > 0
