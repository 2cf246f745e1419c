"""Early-bird tickets drawn straight at the target densities (You et al., 2020, without IMP's
intermediate levels): one dense meta-training watches, for every target, the mask that
one-shot magnitude pruning to IMP's per-layer counts would give; a target's mask is drawn once
it has settled (normalised Hamming distance below ε over a window) and the search stops when all
have. Each drawn mask is rewound like IMP and trained as a ticket."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sparsemeta.experiments.methods import earlybird
from sparsemeta.experiments.methods.base import (
    Branch,
    Method,
    SeedRun,
    dense_level_only,
    planned_levels,
)
from sparsemeta.sparsity.masks import Mask, hamming
from sparsemeta.sparsity.prune import top_magnitude_mask
from sparsemeta.training.hooks import StepContext, TrainHooks
from sparsemeta.training.rundir import RunDir


class Criterion(Protocol):
    """When a mask counts as settled: below ``epsilon``, snapshots every ``every`` steps, over
    ``window`` of them (``earlybird``'s settings; ``eb_continue`` has its own)."""

    epsilon: float
    every: int
    window: int


class TargetEarlyBirdHooks(TrainHooks):
    """Per target level: the top-magnitude mask every ``every`` steps; drawn (kept with its
    step) when its last ``window`` distances are all below ``epsilon``; stop when all are."""

    def __init__(self, counts: dict[int, dict[str, int]], settings: Criterion) -> None:
        self.counts = counts
        self.epsilon, self.every, self.window = settings.epsilon, settings.every, settings.window
        self.previous: dict[int, Mask] = {}
        self.distances: dict[int, list[float]] = {lv: [] for lv in counts}
        self.drawn: dict[int, Mask] = {}
        self.drawn_at: dict[int, int] = {}

    def settled(self, level: int, now: Mask) -> bool:
        """The criterion: the last ``window`` distances between successive masks below ε."""
        if level in self.previous:
            self.distances[level].append(hamming(self.previous[level], now))
        self.previous[level] = now
        recent = self.distances[level][-self.window:]
        return len(recent) == self.window and all(d < self.epsilon for d in recent)

    def draw(self, level: int, now: Mask, ctx: StepContext) -> None:
        self.drawn[level], self.drawn_at[level] = now, ctx.step

    def should_stop(self, ctx: StepContext) -> bool:
        """Every ``every`` steps, each target not yet drawn: its mask now, drawn if settled;
        stop when every target is drawn."""
        if ctx.step % self.every:
            return False
        for level, counts in self.counts.items():
            if level not in self.drawn:
                now = top_magnitude_mask(ctx.params, counts)
                if self.settled(level, now):
                    self.draw(level, now, ctx)
        return len(self.drawn) == len(self.counts)

    def state_dict(self) -> dict:
        return {"previous": self.previous, "distances": self.distances, "drawn": self.drawn,
                "drawn_at": self.drawn_at}

    def load_state_dict(self, state: dict) -> None:
        self.previous, self.distances = state["previous"], state["distances"]
        self.drawn, self.drawn_at = state["drawn"], state["drawn_at"]

    def restore(self, search: Path) -> TargetEarlyBirdHooks:
        """These hooks as a search run's last checkpoint left them (its masks drawn so far)."""
        self.load_state_dict(RunDir(search).checkpoint().hooks)
        return self


def run(s: SeedRun) -> None:
    p = s.cfg.prune
    levels = s.target_levels()
    search = s.dir(0, "eb_target_search")
    hooks = TargetEarlyBirdHooks({lv: s.counts_at(lv) for lv in levels}, earlybird.settings(s.cfg))
    s.run(f"level 0/{s.levels} early-bird search at the targets", search, init=s.theta0(),
          hooks=hooks, test=False, snapshot_at=p.rewind_step())
    # the masks drawn, from the search's last checkpoint (also when it was finished earlier);
    # a target that never settled takes the mask of the search's final weights
    drawn = hooks.restore(search).drawn
    final = s.weights(search)
    start = final if p.rewind == "none" else s.rewind_target(search)
    for level in levels:
        path = s.dir(level, "eb_target")
        mask = s.saved_mask(path, lambda lv=level: drawn.get(lv) or top_magnitude_mask(
            final, s.counts_at(lv)))
        s.run(f"{s.label(level)} early-bird ticket at the target", path,
              init=s.start(start, mask), mask=mask)


METHOD = Method(
    name="ebtarget",
    help="early-bird masks drawn at each target density in one dense run, then trained",
    branches=(Branch("eb_target", "goldenrod", prior="eb_target_search",
                     prior_levels=dense_level_only),
              Branch("eb_target_search", "tab:gray", model=False)),
    run=run, plan=lambda cfg, controls: 1 + planned_levels(cfg),
    score_branch="eb_target",
)
