"""L1-regularised dense meta-training (the 2019 sparse-MAML baseline), then its magnitude mask at
each level's density, evaluated as is (``l1_oneshot``) and after a short masked meta-fine-tune
(``l1``)."""

from __future__ import annotations

import torch

from sparsemeta.config import Config
from sparsemeta.experiments.methods.base import (
    Branch,
    Method,
    SeedRun,
    dense_level_only,
    planned_levels,
)
from sparsemeta.sparsity.masks import prunable_names
from sparsemeta.sparsity.prune import magnitude_prune
from sparsemeta.training.hooks import StepContext, TrainHooks


class L1Hooks(TrainHooks):
    """λ·Σ|θ| over the prunable weights, added once per outer step to the mean outer loss."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def regularizer(self, ctx: StepContext) -> torch.Tensor:
        return self.lam * sum(ctx.params[k].abs().sum() for k in prunable_names(ctx.params))


def run(s: SeedRun) -> None:
    p, c = s.cfg.prune, s.cfg.l1
    dense = s.dir(0, "l1")
    s.run("level 0 l1", dense, init=s.theta0(), hooks=L1Hooks(c.lambda_))
    weights = s.weights(dense)
    mask = s.full
    targets = s.target_levels()
    for level in range(1, s.levels + 1):
        mask = magnitude_prune(weights, mask, p.rate, p.scope, p.output_rate_factor)
        if level not in targets:
            continue
        s.run(f"{s.label(level)} l1 one-shot", s.dir(level, "l1_oneshot"), init=weights,
              mask=mask, iterations=0)
        if c.finetune_iterations:
            s.run(f"{s.label(level)} l1 fine-tuned", s.dir(level, "l1"), init=weights, mask=mask,
                  iterations=c.finetune_iterations)


def plan(cfg: Config, controls: list[str]) -> int:
    return 1 + planned_levels(cfg) * (
        1 + (cfg.l1.finetune_iterations > 0))


METHOD = Method(
    name="l1",
    help="L1-regularised meta-training, magnitude mask, short fine-tune",
    branches=(Branch("l1", "tab:red", prior="l1", prior_levels=dense_level_only),
              Branch("l1_oneshot", "tab:pink", prior="l1", prior_levels=dense_level_only)),
    run=run, plan=plan, score_branch="l1", tune_params=("l1_lambda",),
)
