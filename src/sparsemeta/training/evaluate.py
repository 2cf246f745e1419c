"""Episodic evaluation: accuracy after each adaptation step, mean and 95% confidence interval.

The tasks are the fixed tasks 0..n-1 of a split, so two evaluations of the same model always see
the same episodes, and two models are compared on identical tasks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from tqdm import tqdm

from sparsemeta.data.tasks import TaskSampler
from sparsemeta.foundations.stats import mean_ci95
from sparsemeta.meta.core import MetaLearner
from sparsemeta.meta.engine import Engine
from sparsemeta.training.distributed import group
from sparsemeta.training.rundir import Evaluation


def evaluate(
    engine: Engine,
    learner: MetaLearner,
    params: Mapping[str, torch.Tensor],
    sampler: TaskSampler,
    tasks: int,
    steps: int,
    progress: bool = False,
) -> Evaluation:
    """Adapt on each of ``tasks`` fixed tasks for ``steps`` steps; never writes ``params``.
    The run's ``engine`` computes them (on the CPU the loop builds and adapts them on its task
    threads — the results do not depend on how many — or the grouped core several at once). In
    a distributed job each rank adapts on its share and the results are gathered."""
    g = group()
    device = engine.device
    accs = np.zeros((tasks, steps + 1))
    losses = np.zeros((tasks, steps + 1))
    mine = g.share(tasks)
    results = engine.evaluate_tasks(learner, params, lambda i: sampler.task(i).to(device), mine,
                                    steps)
    for i, a, loss in tqdm(results, total=len(mine), desc=f"eval {sampler.split}",
                           disable=not progress, leave=False, unit="task"):
        accs[i], losses[i] = a, loss
    if g.world > 1:  # every other rank's rows are zeros here: the sum gathers them
        both = torch.tensor(np.stack([accs, losses]), device=device)
        g.sum_([both])
        accs, losses = both.cpu().numpy()
    per_step = []
    for s in range(steps + 1):
        m, ci = mean_ci95(accs[:, s])
        per_step.append({"step": s, "accuracy": m, "ci95": ci, "loss": float(losses[:, s].mean())})
    best = max(per_step, key=lambda r: r["accuracy"])
    final = per_step[-1]
    return Evaluation(split=sampler.split, tasks=tasks, steps=steps, accuracy=final["accuracy"],
                      ci95=final["ci95"], best_step=best["step"], per_step=per_step)


def format_result(result: Evaluation) -> str:
    return (f"{result.split} accuracy {100 * result.accuracy:.2f}% "
            f"± {100 * result.ci95:.2f}% (95% CI, {result.tasks} tasks, "
            f"{result.steps} adaptation steps)")
