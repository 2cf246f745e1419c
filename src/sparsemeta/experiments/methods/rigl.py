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
from sparsemeta.foundations.errors import UserError
from sparsemeta.sparsity.rigl import RigLUpdater, layer_counts, random_mask
from sparsemeta.training.hooks import StepContext, TrainHooks


@dataclass
class RiglSettings:
    """RigL dynamic sparse meta-training at a fixed density (Evci et al., 2020)."""

    distribution: Literal["erk", "uniform", "imp"] = "erk"
    """Density per layer: Erdős–Rényi-Kernel ('erk': larger layers sparser, the first conv and
    the head kept nearly dense), the same for every layer ('uniform'), or IMP's exact per-layer
    counts at the level ('imp': the same architecture budget as the ticket it is compared
    with)."""
    drop_fraction: float = 0.3
    """f₀: fraction of active weights dropped (and regrown) at the first update; cosine decay."""
    update_every: int = 100
    """ΔT: outer steps between mask updates."""
    end_fraction: float = 0.75
    """T_end as a fraction of the run's iterations: no mask updates after it."""
    grow_tasks: int = 0
    """Tasks of the dense meta-gradient that scores regrowth, beyond the meta-batch's own (drawn
    from meta-train tasks the training never reaches): a less noisy grow score."""
    iterations_factor: float = 1.0
    """The sparse run trains this × train.iterations (e.g. 1/density: the dense run's FLOPs)."""

    def validate(self, at: str = "rigl") -> None:
        open_unit(f"{at}.drop_fraction", self.drop_fraction)
        open_unit(f"{at}.end_fraction", self.end_fraction, closed_high=True)
        at_least(f"{at}.update_every", self.update_every, 1)
        at_least(f"{at}.grow_tasks", self.grow_tasks, 0)
        if not 0 < self.iterations_factor <= MAX_ITERATIONS_FACTOR:
            raise UserError(f"{at}.iterations_factor must be in (0, {MAX_ITERATIONS_FACTOR}], "
                            f"got {self.iterations_factor}")


def settings(cfg: Config) -> RiglSettings:
    return cfg.section("rigl")


#: a RigL run trains at most this many times train.iterations
MAX_ITERATIONS_FACTOR = 100.0
#: the first task index of the grow gradients' own tasks: meta-training's task i of iteration t
#: is t·meta_batch + b, far below this for any run
GROW_TASKS_FROM = 1 << 40


class RigLHooks(TrainHooks):
    """Drop/grow on schedule; the grow score is the meta-gradient w.r.t. the effective weight,
    over the meta-batch's tasks and ``grow_tasks`` more."""

    moves_mask = True

    def __init__(self, f0: float, every: int, end: int, grow_tasks: int = 0) -> None:
        self.f0, self.every, self.end, self.grow_tasks = f0, every, end, grow_tasks

    def _grow_tasks(self, ctx: StepContext) -> list:
        if not self.grow_tasks:
            return ctx.tasks
        assert ctx.draw_task is not None, "the loop gives a hook its task sampler"
        first = GROW_TASKS_FROM + ctx.step * self.grow_tasks
        return ctx.tasks + [ctx.draw_task(first + i) for i in range(self.grow_tasks)]

    def after_step(self, ctx: StepContext) -> bool:
        mask, params, learner = ctx.mask, ctx.params, ctx.learner
        if mask is None:
            raise ValueError("RigL needs a mask")

        def dense_grad() -> dict[str, torch.Tensor]:
            # θ ⊙ m as leaves, forwarded without the mask: ∂L/∂(θ⊙m) is non-zero where θ is pruned
            eff = {k: (v * mask[k] if k in mask else v).detach().requires_grad_(v.requires_grad)
                   for k, v in params.items()}
            tasks = self._grow_tasks(ctx)
            kept, learner.mask = learner.mask, None
            ctx.dense_tasks += len(tasks)
            try:
                learner.meta_gradient_step(eff, tasks, track_running=False)
            finally:
                learner.mask = kept
            return {k: eff[k].grad for k in mask}

        updater = RigLUpdater(self.f0, self.every, self.end, dense_grad)
        return updater(ctx.step, params, mask, ctx.optimizer)


def counts(s: SeedRun, level: int, distribution: str) -> dict[str, int]:
    """Kept weights per layer of the RigL run at ``level``'s density."""
    if distribution == "imp":
        return s.counts_at(level)
    shapes = {k: m.shape for k, m in s.full.items()}
    total = sum(m.numel() for m in s.full.values())
    return layer_counts(shapes, sum(s.counts_at(level).values()) / total, distribution)


def run(s: SeedRun) -> None:
    r = settings(s.cfg)
    shapes = {k: m.shape for k, m in s.full.items()}
    iterations = max(1, round(r.iterations_factor * s.cfg.train.iterations))
    end = max(1, math.floor(r.end_fraction * iterations))
    for level in s.target_levels():
        path = s.dir(level, "rigl")
        mask = s.saved_mask(path, lambda lv=level: random_mask(
            shapes, counts(s, lv, r.distribution),
            streams.level_generator(streams.RIGL_INITIAL_MASK, s.seed, lv)))
        s.run(f"{s.label(level)} rigl", path, background=True, init=s.theta0(), mask=mask,
              hooks=RigLHooks(r.drop_fraction, r.update_every, end, r.grow_tasks),
              iterations=iterations)


METHOD = Method(
    name="rigl",
    help="RigL dynamic sparse meta-training at each level's density",
    branches=(Branch("rigl", "tab:purple"),),
    run=run, plan=lambda cfg, controls: planned_levels(cfg), score_branch="rigl",
    settings=RiglSettings,
    search={"drop_fraction": Param("rigl.drop_fraction", 0.1, 0.6),
            "end_fraction": Param("rigl.end_fraction", 0.5, 0.95)},
)
