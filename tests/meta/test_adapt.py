"""ANIL/BOIL-style adaptation: ``meta.adapt`` restricts what the inner loop updates."""

from __future__ import annotations

import pytest
import torch

from sparsemeta.data.tasks import Task
from sparsemeta.meta.core import MetaLearner
from sparsemeta.models.conv4 import Conv4


@pytest.mark.parametrize("mode, adapted", [
    ("head", {"head.weight", "head.bias"}),
    ("last:1", {"head.weight", "head.bias", "blocks.3.conv.weight", "blocks.3.conv.bias",
                "blocks.3.bn.weight", "blocks.3.bn.bias"}),
    ("bn", {"head.weight", "head.bias"} | {f"blocks.{i}.bn.{w}" for i in range(4)
                                           for w in ("weight", "bias")}),
])
def test_the_inner_loop_adapts_only_what_meta_adapt_names(mode, adapted):
    """ANIL-style adaptation: frozen parameters keep their meta-trained values in the fast
    weights, adapted ones take exactly one SGD step, and the outer gradient still reaches all."""
    torch.manual_seed(0)
    model = Conv4(1, 5, 16, 8)
    learner = MetaLearner(model, inner_lr=0.5, inner_steps=1, adapt=mode)
    assert learner.adapted == adapted
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    task = Task(torch.randn(5, 1, 16, 16, generator=g), torch.arange(5),
                torch.randn(10, 1, 16, 16, generator=g), torch.arange(5).repeat(2))
    fast = learner.inner_step(params, task, 0, create_graph=True)
    loss = torch.nn.functional.cross_entropy(learner.logits(params, task.support_x), task.support_y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for k, v in params.items():
        expect = v - 0.5 * grads[k] if k in adapted else v
        torch.testing.assert_close(fast[k], expect, rtol=0, atol=1e-6)
        assert (fast[k] is v) == (k not in adapted)
    learner.meta_gradient_step(params, [task])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in params.items()
               if k.endswith("weight"))
