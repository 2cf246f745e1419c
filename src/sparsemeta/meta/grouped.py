"""The tasks of a meta-batch (or of an evaluation) in one pass, as grouped convolutions.

Same contract and the same mathematics as ``MetaLearner.meta_gradient_step`` and
``MetaLearner.evaluate_tasks`` (the reference, tested equal in float64): every task starts from
θ ⊙ m, takes its inner SGD steps on its own support set and scores its own query set. Here the
tasks' fast weights are one ``(T, *shape)`` tensor per parameter (θ expanded, so the outer
gradient sums over tasks by itself), and ``models.conv4.forward_tasks`` runs all of them at once
— a grouped convolution per layer, batch norm per (task, channel), a batched head. The inner
gradient of the summed support losses is every task's own gradient, because tasks share no
computation. Second order stays exact (``create_graph``).

Why: a Conv4 task is 5–80 images; on a GPU one task at a time leaves the device idle between
small kernels, while T tasks side by side launch the same number of kernels T times larger.
Trade-off: every task's graph is alive at once (memory grows with the meta-batch), and the
summation order differs from the loop's (equal to float rounding, not bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from sparsemeta.data.tasks import Task
from sparsemeta.meta.core import MetaLearner, Params
from sparsemeta.models.conv4 import Conv4, Pass, forward_tasks
from sparsemeta.sparsity.masks import apply_mask

#: evaluation tasks adapted together (memory: one first-order graph per task)
EVAL_GROUP = 16


def unsupported(bn: str, metamix: bool) -> str | None:
    """Why a learner with batch-norm policy ``bn`` (and MetaMix or not) cannot run grouped
    (None: it can) — the one statement of it. Running statistics are updated task by task in
    order and MetaMix mixes inside a single task's forward: both stay on the loop."""
    if bn == "running":
        return "meta.bn=running updates running statistics task by task"
    if metamix:
        return "MetaMix mixes rows inside one task's forward"
    return None


def _stack(tasks: list[Task]) -> Task:
    """One task of ``(T, N, …)`` tensors; refuses tasks whose shapes differ."""
    first = tasks[0]
    for i, task in enumerate(tasks[1:], start=1):
        if task.support_x.shape != first.support_x.shape or task.query_x.shape != first.query_x.shape:
            raise ValueError(f"grouped tasks must share shapes: task {i} has support "
                             f"{tuple(task.support_x.shape)}, query {tuple(task.query_x.shape)}; "
                             f"task 0 {tuple(first.support_x.shape)}, "
                             f"{tuple(first.query_x.shape)}")
    return Task(*(torch.stack([getattr(t, f) for t in tasks])
                  for f in ("support_x", "support_y", "query_x", "query_y")))


def _losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each task's mean cross entropy, ``(T,)``."""
    tasks, rows, ways = logits.shape
    return F.cross_entropy(logits.reshape(-1, ways), y.reshape(-1),
                           reduction="none").view(tasks, rows).mean(dim=1)


def _accuracies(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each task's query accuracy; NaN for a task whose logits are not finite (as the loop)."""
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    correct = (logits.argmax(dim=2) == y).float().mean(dim=1)
    return torch.where(finite, correct, torch.nan).tolist()


class Grouped:
    """``learner``'s inner loop over stacked tasks (see the module doc)."""

    def __init__(self, learner: MetaLearner) -> None:
        # the engine is resolved (and refused) at the boundary: ``meta.engine.resolve_engine``
        assert isinstance(learner.model, Conv4), type(learner.model).__name__
        assert unsupported(learner.bn, learner.metamix is not None) is None
        self.learner = learner

    def logits(self, fast: Params, x: torch.Tensor, step: int,
               stats_rows: int | None = None) -> torch.Tensor:
        """The forward of every task at once; the mask is applied here (``apply_mask``
        broadcasts each ``shape`` mask over the task dimension)."""
        return forward_tasks(self.learner.model, apply_mask(fast, self.learner.mask), x,
                             Pass(stats_rows=stats_rows, step=step))

    def query_logits(self, fast: Params, task: Task, step: int) -> torch.Tensor:
        if self.learner.bn != "support":
            return self.logits(fast, task.query_x, step)
        n = task.support_x.shape[1]
        both = torch.cat([task.support_x, task.query_x], dim=1)
        return self.logits(fast, both, step, stats_rows=n)[:, n:]

    def adapt(self, params: Mapping[str, torch.Tensor], task: Task, steps: int,
              create_graph: bool) -> list[Params]:
        """Every task's fast weights after 0..``steps`` inner steps, ``(T, *shape)`` each."""
        learner, tasks = self.learner, task.support_x.shape[0]
        fast = {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}
        trajectory = [fast]
        for step in range(steps):
            loss = _losses(self.logits(fast, task.support_x, step), task.support_y).sum()
            names = [k for k, v in fast.items() if v.requires_grad and k in learner.adapted]
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=create_graph)
            fast = dict(fast)
            for name, grad in zip(names, grads):
                fast[name] = fast[name] - learner.lr(name, step) * grad
            trajectory.append(fast)
        return trajectory

    def meta_gradient_step(self, params: Params, tasks: list[Task]) -> tuple[float, float]:
        """Accumulate the mean meta-gradient of ``tasks`` into ``params[*].grad`` (and the
        learned rates); returns the mean query loss and accuracy — as the loop does."""
        learner, task = self.learner, _stack(tasks)
        trajectory = self.adapt(params, task, learner.inner_steps,
                                create_graph=not learner.first_order)
        if learner.step_weights is None:
            logits = self.query_logits(trajectory[-1], task, learner.inner_steps)
            per_task = _losses(logits, task.query_y)
        else:
            per_task = torch.zeros((), device=task.query_x.device)
            for step, weight in enumerate(learner.step_weights, start=1):
                logits = self.query_logits(trajectory[step], task, step)
                per_task = per_task + weight * _losses(logits, task.query_y)
        per_task.mean().backward()
        accs = _accuracies(logits.detach(), task.query_y)
        return float(per_task.detach().mean()), sum(accs) / len(accs)

    def scores(self, params: Mapping[str, torch.Tensor], tasks: list[Task],
               steps: int) -> list[tuple[list[float], list[float]]]:
        """Each task's query accuracies and losses after 0..``steps`` first-order steps."""
        task = _stack(tasks)
        local = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        accs: list[list[float]] = [[] for _ in tasks]
        losses: list[list[float]] = [[] for _ in tasks]
        for step, fast in enumerate(self.adapt(local, task, steps, create_graph=False)):
            with torch.no_grad():
                logits = self.query_logits(fast, task, step)
                for t, (a, loss) in enumerate(zip(_accuracies(logits, task.query_y),
                                                  _losses(logits, task.query_y).tolist())):
                    accs[t].append(a)
                    losses[t].append(loss)
        return list(zip(accs, losses))

    def evaluate_tasks(self, params: Mapping[str, torch.Tensor], task: Callable[[int], Task],
                       indices: Iterable[int], steps: int
                       ) -> Iterator[tuple[int, list[float], list[float]]]:
        """``(i, accuracies, losses)`` for each task ``task(i)`` in index order, adapted
        ``EVAL_GROUP`` at a time (``MetaLearner.evaluate_tasks``' contract)."""
        order = list(indices)
        for start in range(0, len(order), EVAL_GROUP):
            chunk = order[start:start + EVAL_GROUP]
            for i, (accs, losses) in zip(chunk, self.scores(params, [task(i) for i in chunk],
                                                            steps)):
                yield i, accs, losses

