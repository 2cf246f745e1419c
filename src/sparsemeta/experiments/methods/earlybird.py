"""Early-bird tickets (You et al., 2020): IMP whose levels stop as soon as the next level's
magnitude mask has settled; the ticket of each level is then trained in full from the rewind
point."""

from __future__ import annotations

import torch

from sparsemeta.experiments.methods.base import Branch, Method, SeedRun
from sparsemeta.sparsity.masks import Mask, hamming, prunable_names
from sparsemeta.sparsity.prune import magnitude_prune
from sparsemeta.training.hooks import StepContext, TrainHooks


class EarlyBirdHooks(TrainHooks):
    """Stop once the next level's magnitude mask has stopped changing.

    Every ``every`` steps the mask that pruning now would give is compared with the previous
    one; when the last ``window`` normalised Hamming distances are all below ``epsilon`` the
    ticket is drawn and training stops.
    """

    def __init__(self, rate: float, scope: str, output_rate_factor: float, epsilon: float,
                 every: int, window: int) -> None:
        self.rate, self.scope, self.factor = rate, scope, output_rate_factor
        self.epsilon, self.every, self.window = epsilon, every, window
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
        nxt = magnitude_prune(params, current, self.rate, self.scope, self.factor)
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
    p, e = s.cfg.prune, s.cfg.earlybird

    def hooks() -> EarlyBirdHooks:
        return EarlyBirdHooks(p.rate, p.scope, p.output_rate_factor, e.epsilon, e.every, e.window)

    search = s.dir(0, "eb_search")
    s.run(f"level 0/{s.levels} early-bird search", search, init=s.theta0(), hooks=hooks(),
          test=False, snapshot_at=p.rewind_step())

    def next_search(level: int, mask: Mask, start: dict[str, torch.Tensor]):  # noqa: ANN202
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
    tune_params=("prune_rate",),
)
