"""The one inner-loop core that every MAML-family learner is a configuration of.

A learner is a pure function of an explicit parameter dict: adaptation on the support set
produces fast weights with ``torch.autograd.grad`` (``create_graph`` for second order), and the
outer loss is the query loss of the fast weights. No module is copied per task, the stored
model is never written, and the mask is applied in one place (``sparsity.masks.apply_mask``).

Batch-norm policy (``meta.bn``), never a side effect of train/eval mode:

* ``transductive`` — support and query are each normalised with their own batch statistics
  (the original MAML). Query predictions depend on the other query examples.
* ``support`` — statistics are computed on the support set only and used for the query (the
  query is forwarded together with the support set, with statistics taken from the support rows),
  so each query prediction depends on the support set and itself alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsemeta.sparsity.masks import Mask, apply_mask

Params = dict[str, torch.Tensor]
BN_POLICIES = ("transductive", "support")


@dataclass
class Task:
    """One N-way K-shot episode; labels are 0..N-1 in a per-task shuffled order."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> Task:
        return Task(*(t.to(device, non_blocking=True) for t in (
            self.support_x, self.support_y, self.query_x, self.query_y)))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


class MetaLearner:
    """MAML / first-order MAML as options of one functional inner loop."""

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        bn: str = "transductive",
        mask: Mask | None = None,
    ) -> None:
        if bn not in BN_POLICIES:
            raise ValueError(f"meta.bn must be one of {BN_POLICIES}, got {bn!r}")
        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.bn = bn
        self.mask = mask

    # -- forward ---------------------------------------------------------------------------
    def logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor,
               stats_rows: int | None = None) -> torch.Tensor:
        """The functional forward: the mask is applied here and nowhere else."""
        return functional_call(self.model, apply_mask(params, self.mask), (x,),
                               {"stats_rows": stats_rows})

    def query_logits(self, params: Mapping[str, torch.Tensor], task: Task) -> torch.Tensor:
        if self.bn == "transductive":
            return self.logits(params, task.query_x)
        n = task.support_x.shape[0]
        both = torch.cat([task.support_x, task.query_x])
        return self.logits(params, both, stats_rows=n)[n:]

    # -- inner loop ------------------------------------------------------------------------
    def inner_step(self, params: Params, task: Task, create_graph: bool) -> Params:
        """One SGD step on the support loss; keeps the graph to ``params`` for the outer step."""
        loss = F.cross_entropy(self.logits(params, task.support_x), task.support_y)
        names = [k for k, v in params.items() if v.requires_grad]
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
        fast = dict(params)
        for name, grad in zip(names, grads):
            fast[name] = params[name] - self.inner_lr * grad
        return fast

    def adapt(self, params: Params, task: Task, steps: int, create_graph: bool) -> list[Params]:
        """Fast weights after 0, 1, …, ``steps`` inner steps."""
        trajectory = [params]
        for _ in range(steps):
            trajectory.append(self.inner_step(trajectory[-1], task, create_graph))
        return trajectory

    # -- outer loss ------------------------------------------------------------------------
    def outer_loss(self, params: Params, task: Task) -> tuple[torch.Tensor, float]:
        """Query loss after adaptation; differentiable w.r.t. ``params`` (second or first order)."""
        fast = self.adapt(params, task, self.inner_steps, create_graph=not self.first_order)[-1]
        logits = self.query_logits(fast, task)
        return F.cross_entropy(logits, task.query_y), accuracy(logits, task.query_y)

    def meta_gradient_step(self, params: Params, tasks: list[Task]) -> tuple[float, float]:
        """Accumulate the mean meta-gradient of ``tasks`` into ``params[*].grad``.

        One backward per task keeps only one task's graph alive at a time.
        """
        total_loss, total_acc = 0.0, 0.0
        for task in tasks:
            loss, acc = self.outer_loss(params, task)
            (loss / len(tasks)).backward()
            total_loss += float(loss.detach())
            total_acc += acc
        return total_loss / len(tasks), total_acc / len(tasks)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate_task(self, params: Mapping[str, torch.Tensor], task: Task,
                      steps: int) -> tuple[list[float], list[float]]:
        """Query accuracy and loss after each of 0..``steps`` adaptation steps.

        Works on detached copies, so the stored parameters are never written.
        """
        local = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        accs, losses = [], []
        for fast in self.adapt(local, task, steps, create_graph=False):
            with torch.no_grad():
                logits = self.query_logits(fast, task)
                losses.append(float(F.cross_entropy(logits, task.query_y)))
                accs.append(accuracy(logits, task.query_y))
        return accs, losses
