"""Gradual magnitude pruning inside one meta-training (Zhu & Gupta, 2017), to each target
density with IMP's per-layer counts: the model as it ends (``gmp``), and its final mask rewound
like IMP and trained as a ticket (``gmp_ticket``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsemeta.config import Config, at_least, open_unit
from sparsemeta.experiments.methods.base import (
    Branch,
    Method,
    Param,
    SeedRun,
    planned_levels,
    same_level,
)
from sparsemeta.foundations.errors import UserError
from sparsemeta.sparsity.masks import Mask
from sparsemeta.sparsity.prune import cubic_counts, top_magnitude_mask
from sparsemeta.training.hooks import StepContext, TrainHooks


@dataclass
class GmpSettings:
    """Gradual magnitude pruning inside one meta-training (Zhu & Gupta, 2017): the density falls
    from 1 to the target on a cubic schedule, d(t) = d_f + (1 − d_f)(1 − (t − t₀)/(t₁ − t₀))³."""

    start_fraction: float = 0.1
    """t₀ as a fraction of train.iterations: the first pruning step."""
    end_fraction: float = 0.5
    """t₁ as a fraction of train.iterations: the target density is reached; the rest of the run
    recovers at it (only weights from t₁ on may become the run's chosen model)."""
    every: int = 10
    """Δt: outer steps between pruning steps."""

    def validate(self, at: str = "gmp") -> None:
        open_unit(f"{at}.start_fraction", self.start_fraction)
        open_unit(f"{at}.end_fraction", self.end_fraction, closed_high=True)
        if self.end_fraction <= self.start_fraction:
            raise UserError(f"{at}.end_fraction must be > {at}.start_fraction, got "
                            f"{self.end_fraction} <= {self.start_fraction}")
        at_least(f"{at}.every", self.every, 1)


def settings(cfg: Config) -> GmpSettings:
    return cfg.section("gmp")


class GmpHooks(TrainHooks):
    """Every ``every`` steps from ``start`` to ``end``, prune each layer by magnitude to the
    cubic schedule's count; pruned weights (and their Adam moments) are zeroed and stay pruned.
    Only weights from ``end`` on (at the target density) may become the chosen model."""

    moves_mask = True

    def __init__(self, final: dict[str, int], start: int, end: int, every: int) -> None:
        self.final, self.start, self.end, self.every = final, start, end, every

    def after_step(self, ctx: StepContext) -> bool:
        step, mask = ctx.step, ctx.mask
        if mask is None:
            raise ValueError("gradual pruning needs a mask to move")
        if not self.start <= step <= self.end or ((step - self.start) % self.every
                                                  and step != self.end):
            return False
        total = {k: m.numel() for k, m in mask.items()}
        counts = cubic_counts(total, self.final, (step - self.start) / (self.end - self.start))
        new = top_magnitude_mask(ctx.params, counts, within=mask)
        with torch.no_grad():
            for k, m in new.items():
                ctx.params[k].mul_(m)
                state = ctx.optimizer.state.get(ctx.params[k], {})
                for name in ("exp_avg", "exp_avg_sq"):
                    if name in state:
                        state[name].mul_(m)
                mask[k].copy_(m)
        return True

    def selectable(self, step: int) -> bool:
        return step >= self.end


def schedule(s: SeedRun) -> tuple[int, int]:
    """(first, last) pruning step for the run's iterations."""
    g, n = settings(s.cfg), s.cfg.train.iterations
    start = max(1, math.floor(g.start_fraction * n))
    return start, max(start + 1, math.floor(g.end_fraction * n))


def run(s: SeedRun) -> None:
    start, end = schedule(s)
    p = s.cfg.prune
    for level in s.target_levels():
        path = s.dir(level, "gmp")
        full: Mask = {k: m.clone() for k, m in s.full.items()}
        s.run(f"{s.label(level)} gradual pruning", path, init=s.theta0(), mask=full,
              hooks=GmpHooks(s.counts_at(level), start, end, settings(s.cfg).every),
              snapshot_at=p.rewind_step())
        mask = s.saved_mask(path, lambda: {})  # the run's final mask (at the target)
        ticket = s.dir(level, "gmp_ticket")
        begin = s.weights(path) if p.rewind == "none" else s.rewind_target(path)
        s.run(f"{s.label(level)} gradual-pruning ticket", ticket, init=begin, mask=mask)


METHOD = Method(
    name="gmp",
    help="gradual magnitude pruning in one meta-training, as is and rewound into a ticket",
    branches=(Branch("gmp", "tab:cyan"),
              Branch("gmp_ticket", "darkcyan", prior="gmp", prior_levels=same_level)),
    run=run, plan=lambda cfg, controls: 2 * planned_levels(cfg),
    score_branch="gmp_ticket", settings=GmpSettings,
    search={"end_fraction": Param("gmp.end_fraction", 0.3, 0.8)},
)
