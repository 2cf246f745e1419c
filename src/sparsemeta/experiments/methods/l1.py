"""L1-regularised dense meta-training (the 2019 sparse-MAML baseline), then its magnitude mask at
each level's density, evaluated as is (``l1_oneshot``) and after a short masked meta-fine-tune
(``l1``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsemeta.config import Config, at_least
from sparsemeta.experiments.methods.base import (
    Branch,
    Method,
    Param,
    SeedRun,
    dense_level_only,
    planned_levels,
)
from sparsemeta.sparsity.masks import prunable_names
from sparsemeta.training.hooks import StepContext, TrainHooks


@dataclass
class L1Settings:
    """L1-regularised meta-training (the 2019 sparse-MAML baseline), then magnitude threshold."""

    lambda_: float = 1e-4
    """Penalty λ·Σ|θ| on the prunable weights, added to the mean outer loss (key ``l1.lambda``)."""
    finetune_iterations: int = 30
    """Masked meta-fine-tuning after thresholding to each density (0: evaluate as is only)."""

    def validate(self, at: str = "l1") -> None:
        at_least(f"{at}.lambda", self.lambda_, 0)
        at_least(f"{at}.finetune_iterations", self.finetune_iterations, 0)


def settings(cfg: Config) -> L1Settings:
    return cfg.section("l1")


class L1Hooks(TrainHooks):
    """λ·Σ|θ| over the prunable weights, added once per outer step to the mean outer loss."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def regularizer(self, ctx: StepContext) -> torch.Tensor:
        return self.lam * sum(ctx.params[k].abs().sum() for k in prunable_names(ctx.params))


def run(s: SeedRun) -> None:
    rule, c = s.cfg.prune.rule(), settings(s.cfg)
    dense = s.dir(0, "l1")
    s.run("level 0 l1", dense, init=s.theta0(), hooks=L1Hooks(c.lambda_))
    weights = s.weights(dense)
    mask = s.full
    targets = s.target_levels()
    for level in range(1, s.levels + 1):
        mask = rule.apply(weights, mask)
        if level not in targets:
            continue
        s.run(f"{s.label(level)} l1 one-shot", s.dir(level, "l1_oneshot"), init=weights,
              mask=mask, iterations=0)
        if c.finetune_iterations:
            s.run(f"{s.label(level)} l1 fine-tuned", s.dir(level, "l1"), init=weights, mask=mask,
                  iterations=c.finetune_iterations)


def plan(cfg: Config, controls: list[str]) -> int:
    return 1 + planned_levels(cfg) * (1 + (settings(cfg).finetune_iterations > 0))


METHOD = Method(
    name="l1",
    help="L1-regularised meta-training, magnitude mask, short fine-tune",
    branches=(Branch("l1", "tab:red", prior="l1", prior_levels=dense_level_only),
              Branch("l1_oneshot", "tab:pink", prior="l1", prior_levels=dense_level_only)),
    run=run, plan=plan, score_branch="l1", settings=L1Settings,
    search={"lambda": Param("l1.lambda", 1e-6, 1e-2, log=True)},
)
