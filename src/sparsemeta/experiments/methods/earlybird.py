"""Early-bird tickets (You et al., 2020): IMP whose levels stop as soon as the next level's
magnitude mask has settled; the ticket of each level is then trained in full from the rewind
point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsemeta.config import Config, at_least, open_unit
from sparsemeta.experiments.methods.base import Branch, Method, SeedRun
from sparsemeta.sparsity.masks import Mask, hamming, prunable_names
from sparsemeta.sparsity.prune import MagnitudeRule
from sparsemeta.training.hooks import StepContext, TrainHooks


@dataclass
class EarlyBirdSettings:
    """Early-bird tickets: a mask is drawn once the magnitude mask stops changing (also the
    settings of the early-bird search at the targets, ``ebtarget``)."""

    epsilon: float = 0.02
    """Normalised Hamming distance below which two successive masks count as the same."""
    every: int = 5
    """Outer steps between mask snapshots."""
    window: int = 5
    """The last ``window`` distances must all be below epsilon."""

    def validate(self, at: str = "earlybird") -> None:
        open_unit(f"{at}.epsilon", self.epsilon)
        at_least(f"{at}.every", self.every, 1)
        at_least(f"{at}.window", self.window, 1)


def settings(cfg: Config) -> EarlyBirdSettings:
    return cfg.section("earlybird")


class EarlyBirdHooks(TrainHooks):
    """Stop once the next level's magnitude mask has stopped changing.

    Every ``every`` steps the mask that pruning now would give is compared with the previous
    one; when the last ``window`` normalised Hamming distances are all below ``epsilon`` the
    ticket is drawn and training stops.
    """

    def __init__(self, rule: MagnitudeRule, settings: EarlyBirdSettings) -> None:
        self.rule = rule
        self.epsilon, self.every, self.window = settings.epsilon, settings.every, settings.window
        self.previous: Mask | None = None
        self.distances: list[float] = []

    def fired(self) -> bool:
        recent = self.distances[-self.window:]
        return len(recent) == self.window and all(d < self.epsilon for d in recent)

    def should_stop(self, ctx: StepContext) -> bool:
        if ctx.step % self.every:
            return False
        params = ctx.params
        current = ctx.mask if ctx.mask is not None else {
            k: torch.ones_like(params[k], dtype=torch.bool) for k in prunable_names(params)}
        nxt = self.rule.apply(params, current)
        if self.previous is not None:
            self.distances.append(hamming(self.previous, nxt))
        self.previous = nxt
        return self.fired()

    def state_dict(self) -> dict:
        return {"previous": self.previous, "distances": list(self.distances)}

    def load_state_dict(self, state: dict) -> None:
        self.previous = state["previous"]
        self.distances = list(state["distances"])


def run(s: SeedRun) -> None:
    p = s.cfg.prune

    def hooks() -> EarlyBirdHooks:
        return EarlyBirdHooks(p.rule(), settings(s.cfg))

    search = s.dir(0, "eb_search")
    s.run(f"level 0/{s.levels} early-bird search", search, init=s.theta0(), hooks=hooks(),
          test=False, snapshot_at=p.rewind_step())

    def next_search(level: int, mask: Mask, start: dict[str, torch.Tensor]) -> Path | None:
        if level == s.levels:
            return None
        path = s.dir(level, "eb_search")
        s.run(f"{s.label(level)} early-bird search", path, init=start, mask=mask, hooks=hooks(),
              test=False)
        return path

    s.imp_levels(search, "earlybird", s.rewind_target(search), next_search)


METHOD = Method(
    name="earlybird",
    help="early-bird tickets: IMP levels stopped once the mask settles",
    branches=(Branch("earlybird", "tab:brown", prior="eb_search"),
              Branch("eb_search", "tab:gray", model=False, prior="eb_search")),
    run=run, plan=lambda cfg, controls: 2 * cfg.prune.num_levels(), score_branch="earlybird",
    settings=EarlyBirdSettings, tune_params=("prune_rate",),
)
