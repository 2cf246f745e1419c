"""Random pruning: random masks (random filters if structured) with IMP's per-layer counts at
every level, trained from θ₀."""

from __future__ import annotations

from sparsemeta.experiments.methods.base import Branch, Method, SeedRun, planned_levels
from sparsemeta.foundations import streams
from sparsemeta.sparsity.prune import random_filter_mask
from sparsemeta.sparsity.rigl import random_mask


def run(s: SeedRun) -> None:
    shapes = {k: m.shape for k, m in s.full.items()}
    make = random_filter_mask if s.filters else random_mask
    for level in s.target_levels():
        path = s.dir(level, "random")
        mask = s.saved_mask(path, lambda lv=level: make(
            shapes, s.counts_at(lv), streams.level_generator(streams.RANDOM_MASK, s.seed, lv)))
        s.run(f"{s.label(level)} random", path, background=True,
              init=s.start(s.theta0(), mask), mask=mask)


METHOD = Method(
    name="random",
    help="random masks at IMP's per-layer counts",
    branches=(Branch("random", "tab:green"),),
    run=run, plan=lambda cfg, controls: planned_levels(cfg), score_branch="random",
    structured=True,
    # the lottery experiment's random control is this same run
    covered_by=lambda methods, controls: "lottery" in methods and "random" in controls,
)
