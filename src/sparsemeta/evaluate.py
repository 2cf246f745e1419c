"""Episodic evaluation: accuracy after each adaptation step, mean and 95% confidence interval.

The tasks are the fixed tasks 0..n-1 of a split, so two evaluations of the same model always see
the same episodes, and two models are compared on identical tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from tqdm import tqdm

from sparsemeta.data.tasks import TaskSampler
from sparsemeta.distributed import group
from sparsemeta.meta.core import MetaLearner

# Student's t, two-sided 95% (the 0.975 quantile), for n − 1 = 1..30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t quantile for a 95% interval; past 30 degrees of freedom 1.96 + 2.5/df (within 0.002)."""
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.5 / df


def mean_ci95(values: np.ndarray, student: bool = False) -> tuple[float, float]:
    """Mean and half-width of the 95% interval, z · std / √n (sample std): z = 1.96 over many
    tasks (the field's convention), Student's t over a few seeds (``student``), where 1.96
    would be 2.2× too narrow for 3 seeds and 6.5× for 2."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    z = t975(values.size - 1) if student else 1.96
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))


def evaluate(
    learner: MetaLearner,
    params: Mapping[str, torch.Tensor],
    sampler: TaskSampler,
    tasks: int,
    steps: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    """Adapt on each of ``tasks`` fixed tasks for ``steps`` steps; never writes ``params``.
    In a distributed job each rank adapts on its share and the results are gathered."""
    g = group()
    accs = np.zeros((tasks, steps + 1))
    losses = np.zeros((tasks, steps + 1))
    for i in tqdm(g.share(tasks), desc=f"eval {sampler.split}", disable=not progress,
                  leave=False, unit="task"):
        a, loss = learner.evaluate_task(params, sampler.task(i).to(device), steps)
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
    return {
        "split": sampler.split,
        "tasks": tasks,
        "steps": steps,
        "accuracy": final["accuracy"],
        "ci95": final["ci95"],
        "best_step": best["step"],
        "per_step": per_step,
    }


def format_result(result: dict) -> str:
    return (f"{result['split']} accuracy {100 * result['accuracy']:.2f}% "
            f"± {100 * result['ci95']:.2f}% (95% CI, {result['tasks']} tasks, "
            f"{result['steps']} adaptation steps)")
