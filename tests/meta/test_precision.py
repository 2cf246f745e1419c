"""``train.precision`` reaches every computation through the engine: bf16 autocast on each task
thread of the loop and around the grouped core, in training and evaluation; TF32 switched on
only for ``tf32`` (PyTorch's cuDNN default is on: fp32 must switch it off)."""

from __future__ import annotations

import pytest
import torch

from sparsemeta.config import build_config
from sparsemeta.data.tasks import Task
from sparsemeta.meta.engine import resolve_engine
from sparsemeta.meta.learners import build_learner
from tests.meta.tiny import tiny_tasks

OVERRIDES = ["data.ways=3", "data.image_size=16", "model.filters=8", "meta.inner_steps=2",
             "train.threads=2"]


@pytest.fixture
def tasks() -> list[Task]:
    return [Task(t.support_x.float(), t.support_y, t.query_x.float(), t.query_y, index=t.index)
            for t in tiny_tasks(2)]


def _gradient(precision: str, core: str, tasks: list[Task]) -> torch.Tensor:
    cfg = build_config(overrides=[*OVERRIDES, f"train.precision={precision}",
                                  f"train.core={core}"])
    engine = resolve_engine(cfg, torch.device("cpu"))
    learner = build_learner(cfg, 1)
    params = dict(learner.model.named_parameters())
    engine.meta_gradient_step(learner, params, tasks)
    return torch.cat([p.grad.flatten() for k, p in params.items() if not k.endswith("conv.bias")])


@pytest.mark.parametrize("core", ["loop", "grouped"])
def test_bf16_computes_the_forwards_in_bfloat16_on_every_core(core, tasks):
    fp32, bf16 = _gradient("fp32", "loop", tasks), _gradient("bf16", core, tasks)
    assert torch.allclose(_gradient("fp32", core, tasks), fp32, rtol=1e-4, atol=1e-6)
    # measured 1.4 (second order, this tiny model): bfloat16 keeps ~3 significant digits
    assert float((bf16 - fp32).norm() / fp32.norm()) > 1e-2
    assert _gradient("tf32", core, tasks).equal(_gradient("fp32", core, tasks))  # CPU: float32


@pytest.mark.parametrize("core", ["loop", "grouped"])
def test_evaluation_runs_in_the_engines_precision(core, tasks):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = build_config(overrides=[*OVERRIDES, f"train.precision={precision}",
                                      f"train.core={core}"])
        engine, learner = resolve_engine(cfg, torch.device("cpu")), build_learner(cfg, 1)
        rows = list(engine.evaluate_tasks(learner, dict(learner.model.named_parameters()),
                                          lambda i: tasks[i], range(2), 2))
        assert [i for i, _, _ in rows] == [0, 1] and not torch.is_autocast_enabled("cpu")
        losses[precision] = [loss for _, _, row in rows for loss in row]
    assert losses["fp32"] != losses["bf16"]


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_tf32_is_on_only_where_asked(precision, tf32, tasks):
    kept = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
    try:
        _gradient(precision, "loop", tasks)
        assert torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = kept
