"""What a sparsity method does inside one meta-training run, as a small object with a lifecycle.

``train()`` calls ``regularizer`` before each optimiser step, ``after_step`` after it and
``should_stop`` last, each with one ``StepContext``; ``state_dict`` goes into every checkpoint so
that a resumed run continues the method exactly. Dense and IMP training use the do-nothing base
class; the methods' own hooks live with the methods (``experiments/methods``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsemeta.data.tasks import Task
from sparsemeta.meta.core import MetaLearner, Params
from sparsemeta.sparsity.masks import Mask


@dataclass
class StepContext:
    """Everything a hook may look at after outer step ``step`` (1-based)."""

    step: int
    params: Params
    mask: Mask | None
    optimizer: torch.optim.Optimizer
    learner: MetaLearner
    tasks: list[Task]
    draw_task: Callable[[int], Task] | None = None
    """Meta-train task ``i`` on the run's device (a method drawing tasks of its own: RigL's
    grow gradients from more tasks, at indices the training's own never reach)."""
    dense_tasks: int = 0
    """Tasks of the extra dense meta-gradients the method computed (counted as compute)."""


class TrainHooks:
    """No-op lifecycle: plain (masked or dense) meta-training."""

    #: the method changes the mask during training (then the best weights' mask is saved too)
    moves_mask = False

    def regularizer(self, ctx: StepContext) -> torch.Tensor | None:
        """A penalty added to the outer loss before the optimiser step (None: none)."""
        return None

    def after_step(self, ctx: StepContext) -> bool:
        """Called after the optimiser step; return True if the mask changed."""
        return False

    def should_stop(self, ctx: StepContext) -> bool:
        return False

    def selectable(self, step: int) -> bool:
        """Whether the weights after outer step ``step`` may become the run's chosen model (a
        method whose mask is still shrinking says no: its model must have the final density)."""
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved (nothing, for stateless methods)."""
