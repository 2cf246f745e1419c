"""Early-bird tickets as You et al. (2020) run them: one dense meta-training at a larger meta
learning rate watches, for every target density, the mask magnitude pruning to IMP's per-layer
counts would give; a target's ticket is drawn once the newest mask is within ε (normalised
Hamming distance) of *each* of the last ``window`` masks, and the search stops when every target
is drawn — at the latest after ``max_search`` of the budget, where the targets not yet drawn
are drawn as they are. Each ticket is then trained on from the weights it was drawn at, for what
is left of the budget (``train.iterations`` minus the draw step) — not rewound to θ₀ and trained
in full, as ``ebtarget`` does. ``prune.rewind=step:K`` rewinds late instead: to the search's
weights after K steps, trained for the rest of the budget from there."""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import torch

from sparsemeta.config import Config, TrainConfig, at_least, open_unit
from sparsemeta.experiments.methods.base import (
    Branch,
    Method,
    Param,
    SeedRun,
    dense_level_only,
    planned_levels,
)
from sparsemeta.experiments.methods.ebtarget import TargetEarlyBirdHooks
from sparsemeta.foundations.errors import UserError
from sparsemeta.sparsity.masks import Mask, hamming
from sparsemeta.sparsity.prune import top_magnitude_mask
from sparsemeta.training.hooks import StepContext
from sparsemeta.training.rundir import RunDir

#: the search's meta learning rate is at most this many times train.meta_lr
MAX_LR_FACTOR = 100.0


@dataclass
class EbContinueSettings:
    """Early-bird tickets drawn in a dense search at a larger meta learning rate and trained on
    from where they were drawn."""

    lr_factor: float = 3.0
    """The search meta-trains at this × train.meta_lr (You et al. search at a large rate)."""
    epsilon: float = 0.1
    """Drawn when the newest mask is within this normalised Hamming distance of each of the
    last ``window`` masks (You et al.'s ε)."""
    every: int = 10
    """Outer steps between mask snapshots."""
    window: int = 5
    """Masks the newest is compared with (You et al.'s queue length)."""
    max_search: float = 0.25
    """The search stops after this fraction of train.iterations at the latest; targets not
    drawn by then are drawn there (the method's cost stays bounded)."""

    def validate(self, at: str = "eb_continue") -> None:
        if not 0 < self.lr_factor <= MAX_LR_FACTOR:
            raise UserError(f"{at}.lr_factor must be in (0, {MAX_LR_FACTOR}], got "
                            f"{self.lr_factor}")
        open_unit(f"{at}.epsilon", self.epsilon)
        at_least(f"{at}.every", self.every, 1)
        at_least(f"{at}.window", self.window, 1)
        open_unit(f"{at}.max_search", self.max_search, closed_high=True)


def settings(cfg: Config) -> EbContinueSettings:
    return cfg.section("eb_continue")


class DrawHooks(TargetEarlyBirdHooks):
    """Per target level: the top-magnitude mask every ``every`` steps, kept in a queue of the
    last ``window``; drawn — with the learner's state of that step — when the newest is within
    ``epsilon`` of every mask in the queue; stop when all are drawn."""

    def __init__(self, counts: dict[int, dict[str, int]], eb: EbContinueSettings) -> None:
        super().__init__(counts, eb)
        self.queues: dict[int, deque[Mask]] = {lv: deque(maxlen=eb.window) for lv in counts}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def settled(self, level: int, now: Mask) -> bool:
        queue = self.queues[level]
        near = len(queue) == self.window and max(hamming(now, m) for m in queue) < self.epsilon
        queue.append(now)
        return near

    def draw(self, level: int, now: Mask, ctx: StepContext) -> None:
        super().draw(level, now, ctx)
        self.weights[level] = {k: v.detach().clone() for k, v in ctx.learner.state_dict().items()}

    def state_dict(self) -> dict:
        return {"queues": {lv: list(q) for lv, q in self.queues.items()}, "drawn": self.drawn,
                "drawn_at": self.drawn_at, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.queues = {lv: deque(q, maxlen=self.window) for lv, q in state["queues"].items()}
        self.drawn, self.drawn_at = state["drawn"], state["drawn_at"]
        self.weights = state["weights"]


def run(s: SeedRun) -> None:
    cfg, p, e = s.cfg, s.cfg.prune, settings(s.cfg)
    levels, total = s.target_levels(), cfg.train.iterations
    search = s.dir(0, "eb_continue_search")
    longest = search_iterations(cfg)
    hooks = DrawHooks({lv: s.counts_at(lv) for lv in levels}, e)
    s.run(f"level 0/{s.levels} early-bird search (×{e.lr_factor:g} meta lr)", search,
          setup=s.with_config(train=_faster(cfg)), init=s.theta0(), hooks=hooks, test=False,
          snapshot_at=p.rewind_step(), iterations=longest)
    hooks.load_state_dict(RunDir(search).checkpoint().hooks)  # also for a finished search
    final = s.weights(search)  # where the search stopped: the draw of a target not yet drawn
    for level in levels:
        path = s.dir(level, "eb_continue")
        mask = s.saved_mask(path, lambda lv=level: hooks.drawn.get(lv) or top_magnitude_mask(
            final, s.counts_at(lv)))
        at = hooks.drawn_at.get(level, longest) if p.rewind_step() is None else p.rewind_step()
        start = (s.rewind_target(search) if p.rewind_step() is not None
                 else hooks.weights.get(level, final))
        s.run(f"{s.label(level)} early-bird ticket, trained on", path, background=True,
              init=s.start(start, mask), mask=mask, iterations=max(1, total - at))


def search_iterations(cfg: Config) -> int:
    """The search's length at the latest: ``max_search`` of the budget."""
    return max(1, math.ceil(settings(cfg).max_search * cfg.train.iterations))


def check(cfg: Config) -> None:
    """Late rewinding reads the search's weights after K steps: it must reach K."""
    k = cfg.prune.rewind_step()
    if k is not None and k > search_iterations(cfg):
        raise UserError(f"prune.rewind={cfg.prune.rewind} is past eb_continue's search "
                        f"({search_iterations(cfg)} iterations: eb_continue.max_search × "
                        "train.iterations)")


def _faster(cfg: Config) -> TrainConfig:
    """The search's training section: the meta learning rate × ``lr_factor``."""
    return dataclasses.replace(cfg.train, meta_lr=cfg.train.meta_lr * settings(cfg).lr_factor)


METHOD = Method(
    name="eb_continue",
    help="early-bird masks drawn in a fast dense search, each trained on from its draw step",
    branches=(Branch("eb_continue", "darkorange", prior="eb_continue_search",
                     prior_levels=dense_level_only),
              Branch("eb_continue_search", "tab:gray", model=False)),
    run=run, plan=lambda cfg, controls: 1 + planned_levels(cfg), score_branch="eb_continue",
    settings=EbContinueSettings, check=check,
    search={"lr_factor": Param("eb_continue.lr_factor", 1.0, 10.0, log=True),
            "epsilon": Param("eb_continue.epsilon", 0.02, 0.2, log=True)},
)
