"""RigL dynamic sparse meta-training at each level's density (Evci et al., 2020): a random mask
with ERK (or uniform) layer densities, drop by magnitude and grow by meta-gradient on schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sparsemeta.config import Config, at_least, open_unit
from sparsemeta.experiments.methods.base import Branch, Method, Param, SeedRun, planned_levels
from sparsemeta.foundations import streams
from sparsemeta.sparsity.rigl import RigLUpdater, layer_counts, random_mask
from sparsemeta.training.hooks import StepContext, TrainHooks


@dataclass
class RiglSettings:
    """RigL dynamic sparse meta-training at a fixed density (Evci et al., 2020)."""

    distribution: Literal["erk", "uniform"] = "erk"
    """Density per layer: Erdős–Rényi-Kernel ('erk': larger layers sparser) or the same for
    every layer."""
    drop_fraction: float = 0.3
    """f₀: fraction of active weights dropped (and regrown) at the first update; cosine decay."""
    update_every: int = 100
    """ΔT: outer steps between mask updates."""
    end_fraction: float = 0.75
    """T_end as a fraction of train.iterations: no mask updates after it."""

    def validate(self, at: str = "rigl") -> None:
        open_unit(f"{at}.drop_fraction", self.drop_fraction)
        open_unit(f"{at}.end_fraction", self.end_fraction, closed_high=True)
        at_least(f"{at}.update_every", self.update_every, 1)


def settings(cfg: Config) -> RiglSettings:
    return cfg.section("rigl")


class RigLHooks(TrainHooks):
    """Drop/grow on schedule; the grow score is the meta-gradient w.r.t. the effective weight."""

    moves_mask = True

    def __init__(self, f0: float, every: int, end: int) -> None:
        self.f0, self.every, self.end = f0, every, end

    def after_step(self, ctx: StepContext) -> bool:
        mask, params, learner = ctx.mask, ctx.params, ctx.learner
        if mask is None:
            raise ValueError("RigL needs a mask")

        def dense_grad() -> dict[str, torch.Tensor]:
            # θ ⊙ m as leaves, forwarded without the mask: ∂L/∂(θ⊙m) is non-zero where θ is pruned
            eff = {k: (v * mask[k] if k in mask else v).detach().requires_grad_(v.requires_grad)
                   for k, v in params.items()}
            kept, learner.mask = learner.mask, None
            ctx.dense_steps += 1
            try:
                learner.meta_gradient_step(eff, ctx.tasks, track_running=False)
            finally:
                learner.mask = kept
            return {k: eff[k].grad for k in mask}

        updater = RigLUpdater(self.f0, self.every, self.end, dense_grad)
        return updater(ctx.step, params, mask, ctx.optimizer)


def run(s: SeedRun) -> None:
    r = settings(s.cfg)
    shapes = {k: m.shape for k, m in s.full.items()}
    total = sum(m.numel() for m in s.full.values())
    end = max(1, math.floor(r.end_fraction * s.cfg.train.iterations))
    for level in s.target_levels():
        path = s.dir(level, "rigl")
        target = sum(s.counts_at(level).values()) / total
        mask = s.saved_mask(path, lambda d=target, lv=level: random_mask(
            shapes, layer_counts(shapes, d, r.distribution), streams.level_generator(streams.RIGL_INITIAL_MASK, s.seed, lv)))
        s.run(f"{s.label(level)} rigl", path, background=True, init=s.theta0(), mask=mask,
              hooks=RigLHooks(r.drop_fraction, r.update_every, end))


METHOD = Method(
    name="rigl",
    help="RigL dynamic sparse meta-training at each level's density",
    branches=(Branch("rigl", "tab:purple"),),
    run=run, plan=lambda cfg, controls: planned_levels(cfg), score_branch="rigl",
    settings=RiglSettings,
    search={"drop_fraction": Param("rigl.drop_fraction", 0.1, 0.6),
            "end_fraction": Param("rigl.end_fraction", 0.5, 0.95)},
)
